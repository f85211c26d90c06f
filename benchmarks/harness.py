"""Shared benchmark harness: interleaved repeated timings, medians, ratios, a table, JSON.

Timings on a shared machine swing by +-20% and more, so cases are measured in
the same run, interleaved (round-robin, rotating the order every repeat), and
reported as medians and as ratios to a baseline case.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from fastvae.precision import cpu_bf16_flags

ROOT = Path(__file__).resolve().parents[1]
# max |error| / max |reference| allowed against the float64 reference, per dtype: the kernels' tests
# (tests/support/parity.py) and the benchmarks hold the ops to the same numbers
PARITY_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def max_relative_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: the error relative to the tensor's scale."""
    ref = reference.detach().double()
    err = (actual.detach().double() - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-30)


def celeba_folder(root: Path, images: int) -> Path:
    """A CelebA-format folder of synthetic faces (CelebA cannot be downloaded here), written by the
    dev tool the tests use (tools/celeba_fixture.py), run as a command."""
    tool = ROOT / "tools" / "celeba_fixture.py"
    out = subprocess.run([sys.executable, str(tool), str(root), "--n", str(images)], capture_output=True, text=True,
                         timeout=600, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def random_backbone(net: str, folder: Path) -> str:
    """LPIPS's backbone file with random weights of the real shapes (where no real file is here): the
    tests' writer, tools/random_weights.py, loaded from its file (the benchmarks run as scripts, with
    the repository root not on sys.path, and edit no path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("random_weights", ROOT / "tools" / "random_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.write_random_backbone(net, folder))


def current_rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def peak_rss() -> int:
    """The process's peak RSS (VmHWM), which writing 5 to /proc/self/clear_refs resets to the current RSS."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: dict[str, Callable[[], None]], device: torch.device, repeats: int,
                calls_per_sample: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call for every case: `repeats` samples each, cases taken round-robin."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    sync(device)
    names = list(cases)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            start = time.perf_counter()
            for _ in range(calls_per_sample):
                cases[name]()
            sync(device)
            samples[name].append((time.perf_counter() - start) / calls_per_sample)
    return samples


def summarize(samples: list[float]) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "repeats": len(samples)}


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    cells = [[format(row[k], fmt) if isinstance(row[k], (int, float)) else str(row[k])
              for k, _, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print("  ".join(h.ljust(w) for (_, h, _), w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": cpu_model(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": cpu_bf16_flags(),
            "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def write_json(path: str | None, payload: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps({"machine": machine(), **payload}, indent=2))
        print(f"wrote {path}")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved samples per case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser
