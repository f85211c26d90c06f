"""Fused reconstruction loss: the per-sample loss AND its gradient w.r.t. the logits, in one read.

bce: max(x,0) - x*t + log(1 + exp(-|x|))   grad: sigmoid(x) - t
mse: (sigmoid(x) - t)^2                      grad: 2 (s - t) s (1 - s)

Backward is then a per-sample scale of the stored gradient: no second read of
logits and target. Accumulation is float32 whatever the input dtype (float64 for
float64). Where Triton cannot run it is `fastvae.losses` itself. Kernel, launcher, custom op (with its fake and autograd) in this file;
the eager math, used where Triton cannot run, is `fastvae.losses`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvae import losses
from fastvae.kernels.utils import (accumulation_dtype, as_rows, launch_settings, per_sample_dtype, tile_offsets,
                                   tl_accumulation_dtype, triton_runs_on)


@triton.jit
def _forward_kernel(logits_ptr, target_ptr, loss_ptr, grad_ptr, B, N,
                    KIND_BCE: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    row_mask = rows < B
    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=ACC)  # summed across columns once, after the loop
    for start in range(0, N, BLOCK_N):
        mask, offsets = tile_offsets(rows, row_mask, start, N, BLOCK_N)
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
        acc += tl.where(mask, loss, 0.0)
        tl.store(grad_ptr + offsets, grad.to(grad_ptr.dtype.element_ty), mask=mask)
    tl.store(loss_ptr + rows, tl.sum(acc, axis=1).to(loss_ptr.dtype.element_ty), mask=row_mask)


def gradient_dtype(dtype: torch.dtype) -> torch.dtype:
    """The stored gradient's dtype: float32 for fp16 logits, whose small gradients would underflow in
    fp16 before the loss scale multiplies them in backward; else the logits' dtype."""
    return torch.float32 if dtype == torch.float16 else dtype


def channels_last_layout(t: torch.Tensor) -> bool:
    """NHWC in memory (train.memory_format=channels_last), and not also plain row-major (C = 1)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_rows(t: torch.Tensor, nhwc: bool) -> torch.Tensor:
    """[B, N] in the order the elements lie in memory: for NHWC a view (the loss is a sum over each
    image, so the order of its pixels does not matter), else row-major (copied only if strided)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if nhwc else as_rows(t)


def _forward_triton(logits: torch.Tensor, target: torch.Tensor, kind: str):
    nhwc = channels_last_layout(logits)
    if nhwc and not channels_last_layout(target):
        target = target.contiguous(memory_format=torch.channels_last)  # the pixels in the logits' order
    rows_x, rows_t = memory_rows(logits, nhwc), memory_rows(target, nhwc)  # the target keeps its dtype
    B, N = rows_x.shape
    loss = torch.empty(B, device=logits.device, dtype=per_sample_dtype(logits.dtype))
    # the gradient in the logits' own layout: backward hands autograd an NHWC gradient for NHWC logits
    grad = torch.empty_like(logits, dtype=gradient_dtype(logits.dtype),
                            memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    settings = launch_settings(B, N, logits.device)
    _forward_kernel[(triton.cdiv(B, settings["BLOCK_B"]),)](
        rows_x, rows_t, loss, memory_rows(grad, nhwc), B, N, KIND_BCE=kind == "bce",
        ACC=tl_accumulation_dtype(logits.dtype), **settings)
    return loss, grad


@torch.library.custom_op("fastvae::recon_loss", mutates_args=())
def recon_loss_op(logits: torch.Tensor, target: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss[B], dloss/dlogits): the gradient is made in the same pass and kept for backward."""
    return _forward_triton(logits, target, kind)


@recon_loss_op.register_fake
def _(logits, target, kind):
    layout = torch.channels_last if channels_last_layout(logits) else torch.contiguous_format
    return logits.new_empty(logits.shape[0], dtype=per_sample_dtype(logits.dtype)), torch.empty_like(
        logits, dtype=gradient_dtype(logits.dtype), memory_format=layout)


def _setup_context(ctx, inputs, output):
    ctx.logits_dtype = inputs[0].dtype
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, dloss, _dgrad):
    (grad,) = ctx.saved_tensors
    scale = dloss.reshape(-1, *([1] * (grad.ndim - 1)))
    return (grad * scale).to(ctx.logits_dtype), None, None


recon_loss_op.register_autograd(_backward, setup_context=_setup_context)


def fused_recon_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample reconstruction loss summed over all non-batch dims, as
    `fastvae.losses.reconstruction_loss`, accumulated in float32 (float64 for float64 input).
    The target is data: it gets no gradient."""
    if kind not in losses.RECON_KINDS:
        raise ValueError(f"reconstruction kind {kind!r}: expected one of {losses.RECON_KINDS}")
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)}: expected equal shapes")
    if target.requires_grad:
        raise ValueError("fused_recon_loss: target requires grad; expected data (use "
                         "fastvae.losses.reconstruction_loss to differentiate through the target)")
    if not triton_runs_on(logits.device):  # the reference, with plain autograd: the math exists once
        acc = accumulation_dtype(logits.dtype)
        return losses.reconstruction_loss(logits.to(acc), target.to(acc), kind).to(per_sample_dtype(logits.dtype))
    return recon_loss_op(logits, target, kind)[0]
