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


PROGRAMS_PER_SM = 2  # enough programs in flight to hide memory latency on every SM


def launch_settings(n_rows: int, n_cols: int, device: torch.device) -> dict:
    """BLOCK_B x BLOCK_N tile of one program, and num_warps, for the device the op runs on."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
    return tile_settings(n_rows, n_cols, sms)


def tile_settings(n_rows: int, n_cols: int, sms: int | None) -> dict:
    """The tile for a GPU of `sms` SMs, or for the interpreter (sms None).

    On a GPU: at most 4096 elements per tile (registers), and no more rows per program than leave
    PROGRAMS_PER_SM programs for every SM, so a [256, 200] latent still fills an H100's 132 SMs;
    warps grow with the tile as in Liger-Kernel's calculate_settings. Under the interpreter each
    program instance costs about a millisecond: 16384-element tiles, so fewer and bigger programs.
    (tools/compile_kernels.py compiles every tile the launchers pick for sm_80 and sm_90.)"""
    max_tile = 4096 if sms else 16384
    block_n = min(triton.next_power_of_2(max(n_cols, 1)), max_tile)
    block_b = max(1, min(triton.next_power_of_2(max(n_rows, 1)), max_tile // block_n))
    if sms:
        rows_to_fill = triton.next_power_of_2(max(1, triton.cdiv(n_rows, sms * PROGRAMS_PER_SM)))
        block_b = max(1, min(block_b, rows_to_fill))
    tile = block_b * block_n
    num_warps = 16 if tile >= 8192 else 8 if tile >= 2048 else 4
    return {"BLOCK_B": block_b, "BLOCK_N": block_n, "num_warps": num_warps}


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
