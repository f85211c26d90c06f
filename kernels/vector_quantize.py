"""Fused nearest-code lookup of a vector quantizer: for every vector the nearest of K codes, the code
itself and its squared distance, in one pass that never writes the [N, K] distance matrix.

Each program holds BLOCK_N vectors and walks the codebook in BLOCK_K-code tiles: the tile's distances
||v||^2 - 2 v.e + ||e||^2 (the dot product in BLOCK_D slices, so any D fits in registers) are reduced to
a running (min, argmin) at once; the first code wins a tie, as torch.argmin in the eager reference.
Then the winning code is gathered and ||v - e||^2 computed from it (not from the expansion, which
cancels). Memory: O(N + K x D), against the O(N x K) of `torch.cdist` + argmin.

Autograd (torch.library.register_autograd): the straight-through estimator (dz_q/dv = identity), the
commitment term's gradient to v and, for a learned codebook, the codebook term's gradient to the
gathered codes, scattered with index_add (O(N x D), no one-hot). l2-normalized and low-dimensional
lookups are the caller's v and codes (fastvae.quantizers.VectorQuantizer normalizes and projects them).

Kernel, launcher, custom op (its fake and autograd) in this file; the eager reference, used where
Triton cannot run, is fastvae.losses.vector_quantize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae.kernels.utils import triton_runs_on
from fastvae.losses import vector_quantize


@triton.jit
def _nearest_code_kernel(v_ptr, codes_ptr, code_norms_ptr, index_ptr, q_ptr, distance_ptr, N, K, D,
                         ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_base = rows.to(tl.int64) * D
    v_norms = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        v = tl.load(v_ptr + row_base[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < D)[None, :],
                    other=0.0).to(ACC)
        v_norms += tl.sum(v * v, 1)
    best = tl.full((BLOCK_N,), float("inf"), dtype=ACC)
    best_index = tl.zeros((BLOCK_N,), dtype=tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_mask = codes < K
        dots = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = (cols < D)[None, :]
            v = tl.load(v_ptr + row_base[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask, other=0.0)
            e = tl.load(codes_ptr + codes.to(tl.int64)[:, None] * D + cols[None, :], mask=code_mask[:, None] & col_mask,
                        other=0.0)
            dots = tl.dot(v.to(ACC), tl.trans(e.to(ACC)), dots, input_precision="ieee")  # fp32 exact, not tf32
        e_norms = tl.load(code_norms_ptr + codes, mask=code_mask, other=0.0).to(ACC)
        distances = v_norms[:, None] - 2 * dots + e_norms[None, :]
        distances = tl.where(code_mask[None, :], distances, float("inf"))
        tile_best, tile_index = tl.min(distances, 1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_index = tl.where(better, tile_index.to(tl.int64) + k0, best_index)
    tl.store(index_ptr + rows, best_index, mask=row_mask)
    squared = tl.zeros((BLOCK_N,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        v = tl.load(v_ptr + row_base[:, None] + cols[None, :], mask=mask, other=0.0).to(ACC)
        q = tl.load(codes_ptr + best_index[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC)
        tl.store(q_ptr + row_base[:, None] + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        squared += tl.sum((v - q) * (v - q), 1)
    tl.store(distance_ptr + rows, squared.to(distance_ptr.dtype.element_ty), mask=row_mask)


def tile_settings(n_vectors: int, code_dim: int, on_gpu: bool) -> dict:
    """BLOCK_N vectors x BLOCK_K codes per step, the dot product in BLOCK_D slices (tl.dot needs >= 16 on
    each side). GPU: 64 x 64 tiles in 16- or 32-wide slices, 8 warps: about 200 registers and no spill on
    sm_80 / sm_90, where 4 warps or 64-wide slices spill (tools/compile_kernels.py checks it; the tile is
    not tuned on a GPU yet). Interpreter: each program costs milliseconds, so 128-vector programs."""
    block_d = min(32, max(16, triton.next_power_of_2(code_dim)))
    block_n = 64 if on_gpu else 128
    return {"BLOCK_N": block_n, "BLOCK_K": 64, "BLOCK_D": block_d, "num_warps": 8}


def _nearest_codes_triton(v: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v, codes = v.contiguous(), codes.contiguous()
    n, d = v.shape
    code_norms = codes.pow(2).sum(1)
    indices = torch.empty(n, dtype=torch.int64, device=v.device)
    q, distance = torch.empty_like(v), v.new_empty(n)
    settings = tile_settings(n, d, v.device.type == "cuda")
    acc = tl.float64 if v.dtype == torch.float64 else tl.float32
    _nearest_code_kernel[(triton.cdiv(n, settings["BLOCK_N"]),)](v, codes, code_norms, indices, q, distance,
                                                                  n, codes.shape[0], d, ACC=acc, **settings)
    return indices, q, distance


# ---------------------------------------------------------------- custom op + autograd


@torch.library.custom_op("fastvae::vector_quantize", mutates_args=())
def vector_quantize_op(v: torch.Tensor, codes: torch.Tensor, commitment: float,
                       codebook_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q [N, D], indices [N], loss [N] = (codebook_weight + commitment) x ||v - e||^2 / D)."""
    indices, q, distance = _nearest_codes_triton(v, codes)
    return q, indices, distance * ((codebook_weight + commitment) / v.shape[1])


@vector_quantize_op.register_fake
def _(v, codes, commitment, codebook_weight):
    return torch.empty_like(v), v.new_empty(v.shape[0], dtype=torch.int64), v.new_empty(v.shape[0])


def _setup_context(ctx, inputs, output):
    v, codes, commitment, codebook_weight = inputs
    q, indices, _ = output
    ctx.save_for_backward(v, q, indices)
    ctx.commitment, ctx.codebook_weight, ctx.codebook_size = commitment, codebook_weight, codes.shape[0]


def _backward(ctx, dq, dindices, dloss):
    """Straight-through: dv = dq; plus d(commitment x ||v - sg(e)||^2 / D)/dv and, to the codes,
    d(codebook_weight x ||sg(v) - e||^2 / D)/de summed over the vectors that chose each code."""
    v, q, indices = ctx.saved_tensors
    scaled = (v - q) * (dloss * (2.0 / v.shape[1]))[:, None]
    dv = (dq if dq is not None else torch.zeros_like(v)) + ctx.commitment * scaled
    dcodes = None
    if ctx.needs_input_grad[1]:
        dcodes = q.new_zeros(ctx.codebook_size, v.shape[1]).index_add_(0, indices, scaled, alpha=-ctx.codebook_weight)
    return dv, dcodes, None, None


vector_quantize_op.register_autograd(_backward, setup_context=_setup_context)


def fused_vector_quantize(v: torch.Tensor, codes: torch.Tensor, commitment: float = 0.25,
                          codebook_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z_q straight-through [N, D], indices [N], loss per vector [N]) for vectors v [N, D] and codes [K, D]:
    loss = codebook_weight x ||sg(v) - e||^2 / D + commitment x ||v - sg(e)||^2 / D (codebook_weight 0 for
    an EMA codebook). Half inputs are computed in float32. Where Triton cannot run, the eager reference."""
    if v.ndim != 2 or codes.ndim != 2 or v.shape[1] != codes.shape[1]:
        raise ValueError(f"v {tuple(v.shape)} and codes {tuple(codes.shape)}: expected [N, D] and [K, D]")
    if v.dtype in (torch.float16, torch.bfloat16):
        v = v.float()
    codes = codes.to(v.dtype)
    if not triton_runs_on(v.device):
        return vector_quantize(v, codes, commitment, codebook_weight)
    return vector_quantize_op(v, codes, float(commitment), float(codebook_weight))
