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


def global_batch_mean(values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] averaged over the global batch of all processes, differentiably: the ranks'
    (sum, count) gathered (global_batch) and summed, whose backward sums the gradients over ranks,
    so that DDP's average of the ranks' gradients is the gradient one process with the whole batch
    gets (as GlooSyncBatchNorm does). One process: the plain mean."""
    if not several_processes():
        return values.mean(0)
    local = torch.cat([values.sum(0).flatten(), values.new_full((1,), values.shape[0])])
    total = global_batch(local.unsqueeze(0)).sum(0)
    return (total[:-1] / total[-1]).view(values.shape[1:])


def global_batch(values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] of every process concatenated in rank order [N * B, ...], differentiably: an
    all-gather whose backward is a reduce-scatter (each rank gets the sum of every rank's gradient
    of its rows). torch's functional collective, which torch.compile traces into the graph (the
    torch.distributed.nn.functional ones are deprecated and break it). Every rank must hold B
    rows (data.drop_last=true). One process: the values themselves."""
    if not several_processes():
        return values
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(values.contiguous(), 0, dist.group.WORLD)


def several_processes() -> bool:
    """Whether this process is one of several in an initialized process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def eager_reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, key=None):
    """The reference reparameterization + KL, eps from fastvae.noise (keyed when `key` is given)."""
    return losses.reparam_kl(mu, logvar, noise.draw_eps(mu, key))


@dataclass(frozen=True)
class Ops:
    name: str
    reparam_kl: Callable  # (mu, logvar, noise_key=None) -> (z, kl[B]); noise_key: see fastvae.noise
    recon_loss: Callable  # (logits, target, kind) -> recon[B]


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
            from fastvae.kernels import fused_recon_loss, fused_reparam_kl
        except ImportError as err:  # e.g. macOS, where torch comes without triton
            raise UserError(f"train.ops=triton needs the triton package ({err}); expected train.ops=eager "
                            f"or auto on this machine") from None

        def fused(mu, logvar, key=None):  # keyed: the kernel draws each row's eps from its counter
            return fused_reparam_kl(mu, logvar) if key is None else fused_reparam_kl(mu, logvar, seed=key[0],
                                                                                     row_offsets=key[1])

        return Ops("triton", fused, fused_recon_loss)
    raise ValueError(f"ops {name!r}: expected eager, compiled, triton or auto")
