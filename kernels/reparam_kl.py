"""Fused reparameterization + KL: z = mu + exp(logvar / 2) * eps and the per-sample KL in one pass.

eps is either given, or drawn inside the kernel from Philox keyed by (seed, element
index) and regenerated in backward instead of being stored. The seed is a tensor on
the op's device, read by the kernel itself: no host sync, and a CUDA graph replay
that draws a new seed on the device gets new eps.

Kernels, launcher, custom op (with its fake and autograd) in this file; the eager
math, used where Triton cannot run, is `fastvae.losses`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fastvae import losses, noise
from fastvae.kernels.utils import (accumulation_dtype, launch_settings, per_sample_dtype, tile_offsets,
                                   tl_accumulation_dtype, triton_runs_on)

SEED_HIGH = 2**31 - 1  # seeds drawn when none is given: [0, SEED_HIGH)
SEED_LIMIT = 2**63  # a given seed is used as it is, an int64 Philox key: the numbers fastvae.noise draws


# ---------------------------------------------------------------- Triton kernels


@triton.jit
def _row_counters(row_offsets_ptr, rows, row_mask, D, HAS_ROWS: tl.constexpr):
    """Each row's (index of its element 0, stream): given per row as [B, 2] (fastvae.noise.row_offsets),
    else (row x D, 0)."""
    if HAS_ROWS:
        first = tl.load(row_offsets_ptr + rows.to(tl.int64) * 2, mask=row_mask, other=0)
        stream = tl.load(row_offsets_ptr + rows.to(tl.int64) * 2 + 1, mask=row_mask, other=0)
        return first, stream
    return rows.to(tl.int64) * D, rows.to(tl.int64) * 0


@triton.jit
def _eps(eps_ptr, seed, offsets, row_start, stream, start, mask, HAS_EPS: tl.constexpr, HAS_ROWS: tl.constexpr,
         ACC: tl.constexpr, BLOCK_N: tl.constexpr):
    """eps from memory, or regenerated from Philox: the same numbers in fwd and bwd. Keyed rows draw at
    counter words (low(i), stream, high(i), 0) for element index i (fastvae.noise: 2^64 elements per
    stream); un-keyed ones at tl.randn's counter i."""
    if HAS_EPS:
        return tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(ACC)
    index = row_start[:, None] + (start + tl.arange(0, BLOCK_N))[None, :]
    if HAS_ROWS:
        c0 = index.to(tl.uint32)  # the low word (int64 -> uint32 keeps the low 32 bits)
        r0, r1, _, _ = tl.philox(seed, c0, (stream[:, None] + index * 0).to(tl.uint32), (index >> 32).to(tl.uint32),
                                 c0 * 0)
        normal, _ = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(r0), tl.uint_to_uniform_float(r1))
        return normal.to(ACC)
    return tl.randn(seed, index).to(ACC)


@triton.jit
def _forward_kernel(mu_ptr, logvar_ptr, eps_ptr, seed_ptr, row_offsets_ptr, z_ptr, kl_ptr, B, D,
                    HAS_EPS: tl.constexpr, HAS_ROWS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """z = mu + exp(logvar/2) * eps ; kl[b] = -0.5 * sum_j (1 + logvar - mu^2 - exp(logvar))."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    seed = tl.load(seed_ptr)
    row_start, stream = _row_counters(row_offsets_ptr, rows, row_mask, D, HAS_ROWS)
    kl = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)  # summed across columns once, after the loop
    for start in range(0, D, BLOCK_N):
        mask, offsets = tile_offsets(rows, row_mask, start, D, BLOCK_N)
        mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(ACC)
        std = tl.exp(0.5 * logvar)
        z = mu + std * _eps(eps_ptr, seed, offsets, row_start, stream, start, mask, HAS_EPS, HAS_ROWS, ACC, BLOCK_N)
        tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)
        # masked lanes hold mu = logvar = 0, whose KL term is exactly 0
        kl += 1.0 + logvar - mu * mu - std * std
    tl.store(kl_ptr + rows, (-0.5 * tl.sum(kl, axis=1)).to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _backward_kernel(dz_ptr, dkl_ptr, mu_ptr, logvar_ptr, eps_ptr, seed_ptr, row_offsets_ptr, dmu_ptr,
                     dlogvar_ptr, B, D, HAS_EPS: tl.constexpr, HAS_ROWS: tl.constexpr, ACC: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """dmu = dz + dkl*mu ; dlogvar = dz*eps*0.5*exp(logvar/2) + dkl*0.5*(exp(logvar) - 1)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    seed = tl.load(seed_ptr)
    row_start, stream = _row_counters(row_offsets_ptr, rows, row_mask, D, HAS_ROWS)
    dkl = tl.load(dkl_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
    for start in range(0, D, BLOCK_N):
        mask, offsets = tile_offsets(rows, row_mask, start, D, BLOCK_N)
        dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(ACC)
        std = tl.exp(0.5 * logvar)
        dmu = dz + dkl * mu
        eps = _eps(eps_ptr, seed, offsets, row_start, stream, start, mask, HAS_EPS, HAS_ROWS, ACC, BLOCK_N)
        dlogvar = 0.5 * dz * eps * std + 0.5 * dkl * (std * std - 1.0)
        tl.store(dmu_ptr + offsets, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlogvar_ptr + offsets, dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------- launchers


def _launch(kernel, B: int, D: int, device, *args, has_eps: bool, has_rows: bool, dtype: torch.dtype) -> None:
    settings = launch_settings(B, D, device)
    kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](*args, B, D, HAS_EPS=has_eps, HAS_ROWS=has_rows,
                                                   ACC=tl_accumulation_dtype(dtype), **settings)


def _forward_triton(mu, logvar, eps, seed, row_offsets):
    mu, logvar = mu.contiguous(), logvar.contiguous()
    eps_arg = eps.contiguous() if eps is not None else mu  # a placeholder pointer, never read
    rows_arg = row_offsets.contiguous() if row_offsets is not None else seed  # the same
    z = torch.empty_like(mu)
    kl = torch.empty(mu.shape[0], device=mu.device, dtype=per_sample_dtype(mu.dtype))
    _launch(_forward_kernel, *mu.shape, mu.device, mu, logvar, eps_arg, seed, rows_arg, z, kl,
            has_eps=eps is not None, has_rows=row_offsets is not None, dtype=mu.dtype)
    return z, kl


def _backward_triton(dz, dkl, mu, logvar, eps, seed, row_offsets):
    dz, dkl, mu, logvar = dz.contiguous(), dkl.contiguous(), mu.contiguous(), logvar.contiguous()
    eps_arg = eps.contiguous() if eps is not None else mu
    rows_arg = row_offsets.contiguous() if row_offsets is not None else seed
    dmu, dlogvar = torch.empty_like(mu), torch.empty_like(logvar)
    _launch(_backward_kernel, *mu.shape, mu.device, dz, dkl, mu, logvar, eps_arg, seed, rows_arg, dmu, dlogvar,
            has_eps=eps is not None, has_rows=row_offsets is not None, dtype=mu.dtype)
    return dmu, dlogvar


# ---------------------------------------------------------------- reference fallback (no Triton here)


def _reference(mu, logvar, eps, seed: Optional[int], row_offsets):
    """fastvae.losses with plain autograd (the math exists once, in eager form). Without eps: the
    kernel's own Philox numbers (fastvae.noise) when rows are keyed, else a torch generator keyed
    by the seed (other numbers than Philox, same contract: one seed, one eps), or torch's global
    generator; eps is then kept by autograd instead of regenerated."""
    acc = accumulation_dtype(mu.dtype)
    if eps is None and row_offsets is not None:
        eps = noise.keyed_normal(seed, row_offsets, mu.shape[1])
    elif eps is None:
        generator = torch.Generator(mu.device).manual_seed(int(seed)) if seed is not None else None
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32)
    m, lv = mu.to(acc), logvar.to(acc)
    z = losses.reparameterize(m, lv, eps.detach().to(acc))
    return z.to(mu.dtype), losses.kl_divergence(m, lv).to(per_sample_dtype(mu.dtype))


# ---------------------------------------------------------------- custom ops + autograd


@torch.library.custom_op("fastvae::reparam_kl", mutates_args=())
def reparam_kl_op(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor], seed: torch.Tensor,
                  row_offsets: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_triton(mu, logvar, eps, seed, row_offsets)


@reparam_kl_op.register_fake
def _(mu, logvar, eps, seed, row_offsets):
    return torch.empty_like(mu), mu.new_empty(mu.shape[0], dtype=per_sample_dtype(mu.dtype))


@torch.library.custom_op("fastvae::reparam_kl_backward", mutates_args=())
def reparam_kl_backward_op(dz: torch.Tensor, dkl: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                           eps: Optional[torch.Tensor], seed: torch.Tensor,
                           row_offsets: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward_triton(dz, dkl, mu, logvar, eps, seed, row_offsets)


@reparam_kl_backward_op.register_fake
def _(dz, dkl, mu, logvar, eps, seed, row_offsets):
    return torch.empty_like(mu), torch.empty_like(logvar)


def _setup_context(ctx, inputs, output):
    mu, logvar, eps, seed, row_offsets = inputs
    ctx.save_for_backward(mu, logvar, eps, seed, row_offsets)  # eps is None when drawn in-kernel: nothing stored


def _backward(ctx, dz, dkl):
    mu, logvar, eps, seed, row_offsets = ctx.saved_tensors
    dmu, dlogvar = reparam_kl_backward_op(dz, dkl, mu, logvar, eps, seed, row_offsets)
    return dmu, dlogvar, None, None, None  # eps is noise, seed and counters integers: no gradients


reparam_kl_op.register_autograd(_backward, setup_context=_setup_context)


def fused_reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: Optional[torch.Tensor] = None,
                     seed=None, row_offsets: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z, kl[B]) in one pass over mu and logvar (the reference math where Triton cannot run).

    eps given: z = mu + exp(logvar/2) * eps. eps None: drawn inside the kernel from
    Philox keyed by `seed` and regenerated in backward instead of stored. Without a
    seed, one is drawn from torch's generator of mu's device, on that device: so
    torch.manual_seed and checkpointed RNG state reproduce it, and no host sync is needed.
    `seed` may be an int or an int64 tensor on mu's device (read by the kernel: no host sync).
    row_offsets (int64 [B, 2], fastvae.noise.row_offsets: each row's first element index and stream):
    the numbers fastvae.noise.keyed_normal gives, so a sample's eps does not depend on its batch.
    """
    if mu.shape != logvar.shape or mu.ndim != 2:
        raise ValueError(f"mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}: expected equal [B, D] shapes")
    if eps is not None and eps.shape != mu.shape:
        raise ValueError(f"eps {tuple(eps.shape)}: expected the shape of mu {tuple(mu.shape)}")
    if row_offsets is not None and (seed is None or row_offsets.shape != (mu.shape[0], 2)):
        raise ValueError(f"row_offsets {tuple(row_offsets.shape)}: expected [B, 2] = [{mu.shape[0]}, 2] "
                         f"(fastvae.noise.row_offsets) and a seed")
    if not triton_runs_on(mu.device):
        return _reference(mu, logvar, eps, seed, row_offsets)
    if eps is not None:
        eps, seed_t = eps.detach(), torch.zeros((), dtype=torch.int64, device=mu.device)  # unused: draw nothing
        row_offsets = None
    elif seed is None:
        seed_t = torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device=mu.device)
    elif isinstance(seed, torch.Tensor):
        seed_t = seed.to(device=mu.device, dtype=torch.int64).reshape(())
    else:
        if not 0 <= int(seed) < SEED_LIMIT:
            raise ValueError(f"seed {seed}: expected 0 <= seed < 2^63")
        seed_t = torch.tensor(int(seed), dtype=torch.int64, device=mu.device)  # no reduction: one seed rule
    if row_offsets is not None:
        row_offsets = row_offsets.to(torch.int64)
    return reparam_kl_op(mu, logvar, eps, seed_t, row_offsets)
