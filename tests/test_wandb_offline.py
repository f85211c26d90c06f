"""logger=wandb offline: no network, no hang, and the runs land on disk."""

import os
from pathlib import Path

from fastvae.checkpoint import list_checkpoints
from fastvae.evaluate import main as evaluate_main
from fastvae.train import train
from helpers import tiny_config


def offline_runs():
    return sorted(Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*"))


def test_training_and_evaluation_log_to_offline_wandb(tmp_path):
    assert os.environ["WANDB_MODE"] == "offline"
    before = set(offline_runs())
    out = tmp_path / "tracked"
    train(tiny_config(out, "logger=wandb", "train.max_steps=4", "train.log_every=1"))
    evaluate_main(["--checkpoint", str(list_checkpoints(out)[-1]), "--max-images", "20"])
    new = [p for p in offline_runs() if p not in before]
    assert len(new) == 2  # the training run and its evaluation run
    for run in new:
        files = list(run.glob("*.wandb"))
        assert files and files[0].stat().st_size > 0
