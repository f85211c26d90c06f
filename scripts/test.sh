#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (CI runs exactly this).
# One pytest-xdist worker per core (tests that share a resource run on one worker:
# tests/conftest.py); FASTVAE_TEST_WORKERS=N to choose. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m "not slow"` (docs/development.md has the quick loop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm
exec .venv/bin/python -m pytest -n "${FASTVAE_TEST_WORKERS:-$(nproc)}" "$@"
