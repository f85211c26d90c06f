"""Fused Triton kernels for the VAE ops, imported as `fastvae.kernels`.

- fused_reparam_kl(mu, logvar, eps=None, seed=None) -> (z, kl[B])   (reparam_kl.py)
- fused_recon_loss(logits, target, kind) -> loss[B]                 (recon_loss.py)
- fused_vector_quantize(v, codes, commitment, codebook_weight)
      -> (z_q, indices, loss[N])                                      (vector_quantize.py)

One file per op: its Triton kernels, launcher, torch.library custom op, fake
kernel and autograd. Parity oracle and CPU fallback: `fastvae.losses` (`fastvae.quantizers` for the lookup).
Under TRITON_INTERPRET=1 (set before this package is imported) the kernels run
on CPU tensors.
"""

from fastvae.kernels.recon_loss import fused_recon_loss
from fastvae.kernels.reparam_kl import fused_reparam_kl
from fastvae.kernels.vector_quantize import fused_vector_quantize
from fastvae.kernels.utils import triton_runs_on

__all__ = ["fused_reparam_kl", "fused_recon_loss", "fused_vector_quantize", "triton_runs_on"]
