"""Test-wide setup. TRITON_INTERPRET must be set before any module defining Triton
kernels is imported (else: "RuntimeError: 0 active drivers"), so it is set here, at
collection time. Shared test code lives in tests/support/."""

import os
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# W&B never touches the network or the user's home in tests.
# Each pytest-xdist worker its own folder (tests count the runs in it): a worker inherits the
# environment of the process that started it, so it replaces that one's.
_wandb_dir = tempfile.mkdtemp(prefix="fastvae-wandb-")
for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ[var] = _wandb_dir
    else:
        os.environ.setdefault(var, _wandb_dir)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Under pytest-xdist (scripts/test.sh runs one worker per core) each worker gets its share of the
# cores, and so do the processes its tests start (OMP_NUM_THREADS): no worker oversubscribes them.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, os.cpu_count() or 1) // _workers)
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_threads)


@pytest.fixture(autouse=True)
def worker_threads():
    """Every test starts with its worker's share of the cores, whatever an earlier one set (FFCV's
    import sets torch's threads, for one): results must not depend on which tests ran before."""
    torch.set_num_threads(_threads)
    yield


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


# Test files whose tests all run on one pytest-xdist worker, one after another, and why. (xdist's
# own xdist_group marker does nothing under pytest 9.2: it renames node ids through an attribute
# pytest no longer reads.)
ONE_WORKER = {"tests/test_slurm.py": "one local SLURM cluster for the whole session (tools/local_cluster.py)"}


def pytest_xdist_make_scheduler(config, log):
    """xdist's load scheduling, except that the tests of each ONE_WORKER file form one unit of work."""
    from xdist.scheduler import LoadScopeScheduling

    class OneWorkerFiles(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return path if path in ONE_WORKER else nodeid

    return OneWorkerFiles(config, log)


def pytest_collection_modifyitems(config, items):
    """Longest first, for two pytest-xdist workers to end together: the SLURM tests (one worker runs
    them all, one after another, mostly waiting on the cluster), then the other slow end-to-end tests,
    then the rest, each in collection order. Shared trained runs (tests/support/shared.py) make the
    module fixtures that this order sets up again cheap."""
    def rank(item):
        return 0 if item.get_closest_marker("slurm") else 1 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)
