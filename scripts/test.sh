#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (CI runs exactly this).
# pytest-xdist workers: one per core and one more, which runs while other tests wait (SLURM jobs,
# collective timeouts) and would leave a core idle (docs/development.md has the timings); the tests
# that share a resource run on one worker (tests/conftest.py). FASTVAE_TEST_WORKERS=N to choose.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"` (the quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm
exec .venv/bin/python -m pytest -n "${FASTVAE_TEST_WORKERS:-$(( $(nproc) + 1 ))}" "$@"
