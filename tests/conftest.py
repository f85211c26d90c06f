"""Test-wide setup. TRITON_INTERPRET must be set before any module defining Triton
kernels is imported (else: "RuntimeError: 0 active drivers"), so it is set here, at
collection time. Shared test code lives in tests/support/."""

import os
import sys
import tempfile

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
    from fastvae.run_setup import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture
def python():
    return sys.executable
