#!/usr/bin/env bash
# The GPU validation kit, one command (benchmarks/gpu_check.py says what it checks):
#   bash benchmarks/gpu_check.sh OUT            on a GPU machine (< 9 min on one H100)
#   bash benchmarks/gpu_check.sh OUT --smoke    on a CPU, tiny shapes under TRITON_INTERPRET=1 (CI runs this)
# Python: $PYTHON, else the project's .venv, else python3 (a GPU machine's own torch + triton,
# with fastvae installed there by `pip install --no-deps -e .`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT [--smoke]" >&2
    exit 2
fi
OUT="$1"
shift
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
exec "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
