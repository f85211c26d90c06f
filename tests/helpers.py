"""Small shared helpers for tests that train."""

from pathlib import Path

from safetensors.torch import load_file

from fastvae.checkpoint import list_checkpoints
from fastvae.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

# A tiny MNIST run: 256 real images, batch 32 -> 8 steps per epoch.
TINY = ["data.limit=256", "data.batch_size=32", "train.log_every=4", "train.samples=16"]


def tiny_config(out_dir, *overrides):
    return load_config(CONFIGS / "mnist.yaml", [*TINY, f"out_dir={out_dir}", *overrides])


def final_weights(out_dir):
    return load_file(str(list_checkpoints(out_dir)[-1] / "model.safetensors"))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].equal(b[k]), f"tensor {k} differs"
