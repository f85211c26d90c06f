"""Small shared helpers for tests: paths, the tiny run's config, weights, bounded waiting."""

import hashlib
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastvae.checkpoint import list_checkpoints
from fastvae.config import load_config
from fastvae.data.base import ImageTensorDataset
from fastvae.data.memory import MemoryTrainLoader, in_memory_tensors

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"

# A tiny MNIST run: 256 real images, batch 32 -> 8 steps per epoch, fp32.
TINY = ["data.limit=256", "data.batch_size=32", "train.log_every=4", "train.samples=16",
        "train.mixed_precision=no"]  # fp32 whatever the CPU (auto would pick bf16 on some)


def tiny_config(out_dir, *overrides):
    return load_config(CONFIGS / "mnist.yaml", [*TINY, f"out_dir={out_dir}", *overrides])


def final_weights(out_dir):
    return load_file(str(list_checkpoints(out_dir)[-1] / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"tensor {k} differs"


def wait_until(what: str, ok, timeout: float, poll: float = 0.5, give_up=None) -> None:
    """Poll `ok()` until it is true; after `timeout` seconds (or when `give_up()` returns a reason)
    fail the test saying what was awaited."""
    deadline = time.monotonic() + timeout
    while not ok():
        reason = give_up() if give_up else None
        if reason:
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


def tree_snapshot(root: Path) -> dict:
    """Every file under root with a hash of its bytes: 'nothing changed' is an equality."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


CPU = torch.device("cpu")


def tiny_image_dataset(n=100):
    """n random 1x4x4 uint8 images, labels 0-6: for loader and shard tests."""
    g = torch.Generator().manual_seed(0)
    return ImageTensorDataset(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(n) % 7)


def tiny_memory_loader(data, batch=8, **kw):
    return MemoryTrainLoader(in_memory_tensors(data), batch, seed=3, device=CPU, **kw)
