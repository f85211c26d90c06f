"""Test-wide setup. TRITON_INTERPRET must be set before any module defining Triton
kernels is imported (else: "RuntimeError: 0 active drivers"), so it is set here, at
collection time. Shared test code lives in tests/support/."""

import os
import sys
import tempfile

_tests = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(_tests, "support"), os.path.join(os.path.dirname(_tests), "tools")]

os.environ.setdefault("TRITON_INTERPRET", "1")
# W&B never touches the network or the user's home in tests.
_wandb_dir = tempfile.mkdtemp(prefix="fastvae-wandb-")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    os.environ.setdefault(var, _wandb_dir)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))



@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each in-process run starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def python():
    return sys.executable
