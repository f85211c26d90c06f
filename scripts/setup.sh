#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 / Python 3.11 machine: system packages,
# a virtual environment in .venv, and fastvae with its pinned dependencies.
# Safe to run again: every step is skipped when already done. Without root (or apt) it
# installs what pip can and says what it skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${FASTVAE_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages: real Fashion-MNIST (IDX files; no downloads at run time), and what
# pip needs to build FFCV (opencv4.pc, libturbojpeg.pc, pkg-config).
APT_PACKAGES=(dataset-fashion-mnist libopencv-dev libturbojpeg0-dev pkg-config)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: skipped (needs root and apt-get): ${missing[*]}: FFCV is not installed without its" \
             "build headers, and configs/fashion_mnist.yaml needs data.root; MNIST, imagefolder and CelebA work" >&2
    fi
fi

# Every extra where FFCV can be built, else all but [ffcv].
if pkg-config --exists opencv4 libturbojpeg 2>/dev/null; then extras="all"; else extras="wandb,slurm,ldm,metrics,tensorboard,mlflow,test"; fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency list or the extras changed (pyproject.toml is the single source).
stamp="$VENV/.fastvae-setup"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $extras"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$VENV/bin/python" -c "import fastvae, torch, accelerate" 2>/dev/null; then
    echo "setup: installing fastvae[$extras] and its pinned dependencies into $VENV (torch from the local wheel cache)"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e ".[$extras]"
    echo "$want" > "$stamp"
fi

# --with-slurm (the test command): the Debian packages of the local one-node SLURM cluster the
# launcher tests run against; tools/local_cluster.py holds the list, and the tests start
# and stop the daemons. Without root or apt it only warns: those tests then skip.
if [ "${1:-}" = "--with-slurm" ]; then
    "$VENV/bin/python" tools/local_cluster.py install
fi
