"""What both fused ops share: where Triton runs, tile sizes, accumulation dtypes.

Triton runs on CUDA tensors, and on CPU tensors under TRITON_INTERPRET=1 (the
interpreter CI tests with). Everywhere else the ops compute with the eager
reference in `fastvae.losses`: chosen from the tensor's device, never guessed.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def triton_runs_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def block_shape(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_ROWS, BLOCK_COLS) of one program's tile: at most 4096 elements on a GPU (registers);
    16384 under the interpreter, where each program instance costs about a millisecond, so fewer
    and bigger programs are faster."""
    max_tile = 4096 if device.type == "cuda" else 16384
    block_cols = min(triton.next_power_of_2(max(n_cols, 1)), max_tile)
    block_rows = max(1, min(triton.next_power_of_2(max(n_rows, 1)), max_tile // block_cols))
    return block_rows, block_cols


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other input is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulation_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def per_sample_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-sample sums are float32 for half inputs (fp32 accumulation), else the input dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """A row-major [B, N] view, copied if needed: the interpreter reads memory as if it were
    contiguous and does not check strides, so strided input would silently give wrong numbers."""
    return t.reshape(t.shape[0], -1).contiguous()


@triton.jit
def tile_offsets(rows, row_mask, start, n_cols, BLOCK: tl.constexpr):
    """(mask, offsets) of the [rows, BLOCK] tile at column `start` of a row-major [B, n_cols] tensor."""
    cols = start + tl.arange(0, BLOCK)
    mask = row_mask[:, None] & (cols < n_cols)[None, :]
    return mask, rows[:, None].to(tl.int64) * n_cols + cols[None, :]
