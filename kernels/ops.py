"""Thin autograd / custom-op layer over the raw kernels in triton_kernels.py.

Each op is a `torch.library.custom_op` with a fake (meta) implementation and a
registered autograd formula, so torch.compile traces through it without a graph
break. The same op runs the Triton kernel where Triton can run (CUDA, or CPU
tensors under TRITON_INTERPRET=1) and the reference math elsewhere: chosen from
the tensor's device, never guessed.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from fastvae import losses

try:
    import triton
except ImportError:  # e.g. macOS: the reference math still works
    triton = None

RECON_KINDS = losses.RECON_KINDS
SEED_HIGH = 2**31 - 1


def triton_runs_on(device: torch.device) -> bool:
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def _kernels():
    # Imported on first use: TRITON_INTERPRET is read when the @triton.jit functions are defined.
    from fastvae.kernels import triton_kernels

    return triton_kernels


def _acc_dtype(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_N): a tile of at most 4096 elements on GPU (registers); 16384 under the
    interpreter, where each program instance costs ~1 ms, so fewer and bigger is faster."""
    max_tile = 4096 if device.type == "cuda" else 16384
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_tile)
    block_b = max(1, min(triton.next_power_of_2(max(n_rows, 1)), max_tile // block_n))
    return block_b, block_n


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-sample sums are float32 for half inputs (fp32 accumulation), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _seeded_eps(seed: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Fallback eps: a torch generator keyed by the seed (other numbers than Philox, same contract)."""
    g = torch.Generator(device=like.device).manual_seed(int(seed.item()))
    return torch.randn(like.shape, generator=g, device=like.device, dtype=torch.float32)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    # The interpreter reads memory as if contiguous (PLATFORM.md): always hand it row-major data.
    return t.reshape(t.shape[0], -1).contiguous()


# ---------------------------------------------------------------- reparameterization + KL


@torch.library.custom_op("fastvae::reparam_kl", mutates_args=())
def reparam_kl_op(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor],
                  seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = mu.shape
    if not triton_runs_on(mu.device):
        e = eps.float() if eps is not None else _seeded_eps(seed, mu)
        acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
        z = losses.reparameterize(mu.to(acc), logvar.to(acc), e.to(acc))
        return z.to(mu.dtype), losses.kl_divergence(mu.to(acc), logvar.to(acc)).to(_stat_dtype(mu.dtype))
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps_c = eps.contiguous() if eps is not None else mu  # placeholder pointer, never read
    z = torch.empty_like(mu)
    kl = torch.empty(B, device=mu.device, dtype=_stat_dtype(mu.dtype))
    block_b, block_d = _tile(B, D, mu.device)
    _kernels().reparam_kl_fwd_kernel[(triton.cdiv(B, block_b),)](
        mu, logvar, eps_c, z, kl, int(seed.item()), B, D, HAS_EPS=eps is not None,
        ACC=_acc_dtype(mu.dtype), BLOCK_B=block_b, BLOCK_D=block_d)
    return z, kl


@reparam_kl_op.register_fake
def _(mu, logvar, eps, seed):
    return torch.empty_like(mu), mu.new_empty(mu.shape[0], dtype=_stat_dtype(mu.dtype))


@torch.library.custom_op("fastvae::reparam_kl_backward", mutates_args=())
def reparam_kl_backward_op(dz: torch.Tensor, dkl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                           eps: Optional[torch.Tensor], seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, D = mu.shape
    if not triton_runs_on(mu.device):
        acc = torch.float64 if mu.dtype == torch.float64 else torch.float32
        e = (eps if eps is not None else _seeded_eps(seed, mu)).to(acc)
        m, lv, g, k = mu.to(acc), logvar.to(acc), dz.to(acc), dkl.to(acc)[:, None]
        std = torch.exp(0.5 * lv)
        return (g + k * m).to(mu.dtype), (0.5 * g * e * std + 0.5 * k * (std * std - 1.0)).to(logvar.dtype)
    dz, dkl, mu, logvar = dz.contiguous(), dkl.contiguous(), mu.contiguous(), logvar.contiguous()
    eps_c = eps.contiguous() if eps is not None else mu
    dmu, dlogvar = torch.empty_like(mu), torch.empty_like(logvar)
    block_b, block_d = _tile(B, D, mu.device)
    _kernels().reparam_kl_bwd_kernel[(triton.cdiv(B, block_b),)](
        dz, dkl, mu, logvar, eps_c, dmu, dlogvar, int(seed.item()), B, D, HAS_EPS=eps is not None,
        ACC=_acc_dtype(mu.dtype), BLOCK_B=block_b, BLOCK_D=block_d)
    return dmu, dlogvar


@reparam_kl_backward_op.register_fake
def _(dz, dkl, mu, logvar, eps, seed):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _reparam_setup_context(ctx, inputs, output):
    mu, logvar, eps, seed = inputs
    ctx.save_for_backward(mu, logvar, eps, seed)  # eps is None when drawn in-kernel: nothing stored


def _reparam_backward(ctx, dz, dkl):
    mu, logvar, eps, seed = ctx.saved_tensors
    dmu, dlogvar = reparam_kl_backward_op(dz, dkl, mu, logvar, eps, seed)
    return dmu, dlogvar, None, None  # eps is noise and seed an integer: no gradients


reparam_kl_op.register_autograd(_reparam_backward, setup_context=_reparam_setup_context)


def fused_reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                     seed: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl[B]) in one pass over mu and logvar.

    eps given: z = mu + exp(logvar/2) * eps. eps None: drawn inside the kernel from
    Philox keyed by `seed` (drawn from torch's global generator when None, so
    torch.manual_seed and checkpointed RNG state make it reproducible) and
    regenerated in backward instead of stored.
    """
    if mu.shape != logvar.shape or mu.ndim != 2:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}: expected equal [B, D] shapes")
    if eps is not None and eps.shape != mu.shape:
        raise ValueError(f"eps {tuple(eps.shape)}: expected the shape of mu {tuple(mu.shape)}")
    if eps is not None:
        eps, seed_t = eps.detach(), torch.zeros((), dtype=torch.int64)  # unused: draw nothing
    elif seed is None:
        seed_t = torch.randint(0, SEED_HIGH, (), dtype=torch.int64)
    else:
        seed_t = torch.tensor(int(seed) % SEED_HIGH, dtype=torch.int64)
    return reparam_kl_op(mu, logvar, eps, seed_t)


# ---------------------------------------------------------------- reconstruction loss


@torch.library.custom_op("fastvae::recon_loss", mutates_args=())
def recon_loss_op(logits: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[B], dloss/dlogits): the gradient is made in the same pass and kept for backward."""
    if not triton_runs_on(logits.device):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        x, t = logits.to(acc), target.to(acc)
        s = torch.sigmoid(x)
        grad = s - t if kind == "bce" else 2.0 * (s - t) * s * (1.0 - s)  # closed forms, as in the kernel
        loss = losses.reconstruction_loss(x, t, kind)
        return loss.to(_stat_dtype(logits.dtype)), grad.to(logits.dtype).contiguous()
    rows_x, rows_t = _as_rows(logits), _as_rows(target)  # target keeps its dtype: cast in-kernel
    B, N = rows_x.shape
    loss = torch.empty(B, device=logits.device, dtype=_stat_dtype(logits.dtype))
    grad = torch.empty_like(rows_x)
    block_b, block_n = _tile(B, N, logits.device)
    _kernels().recon_loss_fwd_kernel[(triton.cdiv(B, block_b),)](
        rows_x, rows_t, loss, grad, B, N, KIND_BCE=kind == "bce", ACC=_acc_dtype(logits.dtype),
        BLOCK_B=block_b, BLOCK_N=block_n)
    return loss, grad.view(logits.shape)


@recon_loss_op.register_fake
def _(logits, target, kind):
    return logits.new_empty(logits.shape[0], dtype=_stat_dtype(logits.dtype)), torch.empty_like(
        logits, memory_format=torch.contiguous_format)


def _recon_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _recon_backward(ctx, dloss, _dgrad):
    (grad,) = ctx.saved_tensors
    # backward is a scale of the stored gradient: no second read of logits and target
    scale = dloss.reshape(-1, *([1] * (grad.ndim - 1)))
    return (grad * scale).to(grad.dtype), None, None


recon_loss_op.register_autograd(_recon_backward, setup_context=_recon_setup_context)


def fused_recon_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample reconstruction loss summed over all non-batch dims, as
    `fastvae.losses.reconstruction_loss`, accumulated in float32 (float64 for float64 input).
    The target is data: it gets no gradient."""
    if kind not in RECON_KINDS:
        raise ValueError(f"reconstruction kind {kind!r}: expected one of {RECON_KINDS}")
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected equal shapes")
    if target.requires_grad:
        raise ValueError("fused_recon_loss: target requires grad; expected data (use "
                         "fastvae.losses.reconstruction_loss to differentiate through the target)")
    return recon_loss_op(logits, target, kind)[0]
