#!/usr/bin/env bash
# README command 2: set up, then run the whole test suite (CI runs exactly this).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --with-slurm
exec .venv/bin/python -m pytest "$@"
