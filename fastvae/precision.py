"""Which mixed precision a run trains in, and why (`train.mixed_precision`).

- no / bf16 / fp16: that value.
- null: whatever `accelerate launch --mixed_precision` (or `accelerate config`) says.
- auto: the launcher's value when the run was started by `accelerate launch` (it always passes
  one; its default is no), else bf16 where the device computes it natively (CUDA compute
  capability >= 8.0; a CPU with AVX512-BF16 or AMX-BF16), else fp32. On a CPU without those
  instructions bf16 autocast was measured 9x slower than fp32, so it is never guessed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"  # what `accelerate launch` passes to its processes
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_bf16_flags() -> list[str]:
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:  # not Linux: no claim of native bf16
        flags = []
    return [f for f in CPU_BF16_FLAGS if f in flags]


def native_bf16(device_type: str) -> tuple[bool, str]:
    """(does the device run bf16 natively, the evidence in words)."""
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        return (major, minor) >= (8, 0), f"CUDA compute capability {major}.{minor}"
    found = cpu_bf16_flags()
    if found:
        return True, f"this CPU has {'/'.join(found)}"
    return False, f"this CPU has no bf16 instructions ({torch.backends.cpu.get_cpu_capability()})"


def choose(setting: str | None, device_type: str) -> tuple[str | None, str]:
    """(the value for Accelerator(mixed_precision=...), where it came from)."""
    if setting is None:
        return None, "from accelerate launch (train.mixed_precision=null)"
    if setting != "auto":
        return setting, "train.mixed_precision"
    if os.environ.get(LAUNCHER_ENV):
        return os.environ[LAUNCHER_ENV], f"auto: accelerate launch says {os.environ[LAUNCHER_ENV]}"
    native, why = native_bf16(device_type)
    return ("bf16" if native else "no"), f"auto: {why}"
