"""Raw Triton kernels for the VAE ops. Pure kernels: no torch autograd here (see ops.py).

Layout: every kernel works on row-major [B, N] views (one row per sample) and
takes a tile of BLOCK_B rows x BLOCK_N columns per step, looping over columns,
so one program handles several samples (few programs: cheap on the CPU
interpreter) and any width (loop: no limit on N). Math is done in the ACC
dtype: float32 for fp32/bf16/fp16 storage, float64 for float64 (gradcheck).
"""

import triton
import triton.language as tl


@triton.jit
def _load_eps(eps_ptr, seed, offsets, mask, HAS_EPS: tl.constexpr, ACC: tl.constexpr):
    """eps from memory, or regenerated from Philox(seed, element index): same numbers in fwd and bwd."""
    if HAS_EPS:
        return tl.load(eps_ptr + offsets, mask=mask, other=0.0).to(ACC)
    return tl.randn(seed, offsets).to(ACC)


@triton.jit
def _tile(rows, row_mask, start, n_cols, BLOCK: tl.constexpr):
    """(mask, offsets) of the [BLOCK_B, BLOCK] tile at column `start` of a row-major [B, n_cols] tensor."""
    cols = start + tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return mask, rows[:, None].to(tl.int64) * n_cols + cols[None, :]


@triton.jit
def reparam_kl_fwd_kernel(mu_ptr, logvar_ptr, eps_ptr, z_ptr, kl_ptr, seed, B, D,
                          HAS_EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """z = mu + exp(logvar/2) * eps ; kl[b] = -0.5 * sum_j (1 + logvar - mu^2 - exp(logvar))."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    kl = tl.zeros((BLOCK_B,), dtype=ACC)
    for start in range(0, D, BLOCK_D):
        mask, offsets = _tile(rows, row_mask, start, D, BLOCK_D)
        mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(ACC)
        eps = _load_eps(eps_ptr, seed, offsets, mask, HAS_EPS, ACC)
        std = tl.exp(0.5 * logvar)
        z = mu + std * eps
        tl.store(z_ptr + offsets, z.to(z_ptr.dtype.element_ty), mask=mask)
        # masked lanes hold mu = logvar = 0, whose KL term is exactly 0
        kl += tl.sum(1.0 + logvar - mu * mu - std * std, axis=1)
    tl.store(kl_ptr + rows, (-0.5 * kl).to(kl_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def reparam_kl_bwd_kernel(dz_ptr, dkl_ptr, mu_ptr, logvar_ptr, eps_ptr, dmu_ptr, dlogvar_ptr, seed, B, D,
                          HAS_EPS: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """dmu = dz + dkl*mu ; dlogvar = dz*eps*0.5*exp(logvar/2) + dkl*0.5*(exp(logvar) - 1)."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    dkl = tl.load(dkl_ptr + rows, mask=row_mask, other=0.0).to(ACC)[:, None]
    for start in range(0, D, BLOCK_D):
        mask, offsets = _tile(rows, row_mask, start, D, BLOCK_D)
        dz = tl.load(dz_ptr + offsets, mask=mask, other=0.0).to(ACC)
        mu = tl.load(mu_ptr + offsets, mask=mask, other=0.0).to(ACC)
        logvar = tl.load(logvar_ptr + offsets, mask=mask, other=0.0).to(ACC)
        eps = _load_eps(eps_ptr, seed, offsets, mask, HAS_EPS, ACC)
        std = tl.exp(0.5 * logvar)
        dmu = dz + dkl * mu
        dlogvar = 0.5 * dz * eps * std + 0.5 * dkl * (std * std - 1.0)
        tl.store(dmu_ptr + offsets, dmu.to(dmu_ptr.dtype.element_ty), mask=mask)
        tl.store(dlogvar_ptr + offsets, dlogvar.to(dlogvar_ptr.dtype.element_ty), mask=mask)


@triton.jit
def recon_loss_fwd_kernel(logits_ptr, target_ptr, loss_ptr, grad_ptr, B, N,
                          KIND_BCE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per-row loss sum AND d(loss)/d(logits), in one read of logits and target.

    bce: max(x,0) - x*t + log(1 + exp(-|x|))        grad: sigmoid(x) - t
    mse: (sigmoid(x) - t)^2                           grad: 2 (s - t) s (1 - s)
    """
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    acc = tl.zeros((BLOCK_B,), dtype=ACC)
    for start in range(0, N, BLOCK_N):
        mask, offsets = _tile(rows, row_mask, start, N, BLOCK_N)
        x = tl.load(logits_ptr + offsets, mask=mask, other=0.0).to(ACC)
        t = tl.load(target_ptr + offsets, mask=mask, other=0.0).to(ACC)
        # exp of -|x| never overflows; where() (not maximum) keeps NaN inputs NaN
        e = tl.exp(-tl.abs(x))
        s = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))  # sigmoid(x), stable both ways
        if KIND_BCE:
            loss = tl.where(x > 0, x, 0.0) - x * t + tl.log(1.0 + e)
            grad = s - t
        else:
            diff = s - t
            loss = diff * diff
            grad = 2.0 * diff * s * (1.0 - s)
        acc += tl.sum(tl.where(mask, loss, 0.0), axis=1)
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + rows, acc.to(loss_ptr.dtype.element_ty), mask=row_mask)
