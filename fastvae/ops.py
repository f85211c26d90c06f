"""Which implementation of the VAE ops a run uses (`train.ops`): the eager reference
(fastvae.losses), the reference under torch.compile, or the fused Triton kernels
(fastvae.kernels). Every eps comes from fastvae.noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from fastvae import losses, noise
from fastvae.errors import UserError


def recon_loss_fp32(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """The reference reconstruction loss, accumulated in float32 whatever the autocast dtype."""
    return losses.reconstruction_loss(logits.float(), target.float(), kind)


def eager_reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, key=None):
    """The reference reparameterization + KL, eps from fastvae.noise (keyed when `key` is given)."""
    return losses.reparam_kl(mu, logvar, noise.draw_eps(mu, key))


@dataclass(frozen=True)
class Ops:
    name: str
    reparam_kl: Callable  # (mu, logvar, noise_key=None) -> (z, kl[B]); noise_key: see fastvae.noise
    recon_loss: Callable  # (logits, target, kind) -> recon[B]
    # a tokenizer's nearest-code lookup: (v, codes, commitment, codebook_weight) -> (z_q, indices, loss[N])
    vector_quantize: Callable = losses.vector_quantize


def select_ops(name: str, device: torch.device) -> Ops:
    """`auto` = triton on CUDA, else eager. `triton` on a device where Triton cannot run
    (CPU without TRITON_INTERPRET=1) runs the fused ops' reference fallback."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "eager"
    if name == "eager":
        return Ops("eager", eager_reparam_kl, recon_loss_fp32)
    if name == "compiled":
        compiled_reparam_kl = torch.compile(losses.reparam_kl)

        def reparam_kl(mu, logvar, key=None):
            # eps drawn eagerly: inductor's own RNG would give other numbers than eager for one seed
            return compiled_reparam_kl(mu, logvar, noise.draw_eps(mu, key))

        return Ops("compiled", reparam_kl, torch.compile(recon_loss_fp32))
    if name == "triton":
        try:
            from fastvae.kernels import fused_recon_loss, fused_reparam_kl, fused_vector_quantize
        except ImportError as err:  # e.g. macOS, where torch comes without triton
            raise UserError(f"train.ops=triton needs the triton package ({err}); expected train.ops=eager "
                            f"or auto on this machine") from None

        def fused(mu, logvar, key=None):  # keyed: the kernel draws each row's eps from its counter
            return fused_reparam_kl(mu, logvar) if key is None else fused_reparam_kl(mu, logvar, seed=key[0],
                                                                                     row_offsets=key[1])

        return Ops("triton", fused, fused_recon_loss, fused_vector_quantize)
    raise ValueError(f"ops {name!r}: expected eager, compiled, triton or auto")
