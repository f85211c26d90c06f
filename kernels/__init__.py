"""Fused Triton kernels for the VAE ops, imported as `fastvae.kernels`.

- fused_reparam_kl(mu, logvar, eps=None, seed=None) -> (z, kl[B])
- fused_recon_loss(logits, target, kind) -> loss[B]

Parity oracle: `fastvae.losses`. Raw kernels: triton_kernels.py; the
custom-op/autograd layer and the device-based fallback: ops.py.
"""

from fastvae.kernels.ops import fused_recon_loss, fused_reparam_kl, triton_runs_on

__all__ = ["fused_reparam_kl", "fused_recon_loss", "triton_runs_on"]
