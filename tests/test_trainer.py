"""The Trainer's parts on their own: train_step, TrainState, optimizer builders, config docs and
the resume key lists."""

import os
import subprocess
import sys

import pytest
import torch

from fastvae.checkpoint import list_checkpoints
from fastvae.config import Config, flatten
from fastvae.optim import build_optimizer
from fastvae.train import train
from fastvae.trainer import Trainer
from helpers import ROOT, tiny_config


def test_train_step_is_one_accumulated_optimizer_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.grad_accum_steps=2"))
    batch = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    first = trainer.train_step(batch)
    assert not first["stepped"] and trainer.state.step == 0  # the window is not complete yet
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    second = trainer.train_step(batch)
    assert second["stepped"] and trainer.state.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    assert second["loss"].shape == () and second["recon"].shape == second["kl"].shape == (32,)
    assert second["images"] == 32 and torch.isfinite(second["loss"])


def test_trainer_trains_on_given_datasets(tmp_path):
    from fastvae.data.base import ImageTensorDataset

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    own = ImageTensorDataset(images, torch.arange(64) % 10)
    result = train(tiny_config(tmp_path / "run", "train.epochs=1"), datasets=(own, own))
    assert result["step"] == 2  # 64 images / batch 32, not the 256 of the tiny config's data


def test_unknown_optimizer_is_an_error_not_sgd():
    cfg = Config()
    cfg.optim.name = "lamb"  # past validation, as code (not a config file) could set it
    with pytest.raises(ValueError, match="optim.name 'lamb': expected adam, adamw or sgd"):
        build_optimizer(cfg, torch.nn.Linear(2, 2).parameters())


def test_help_lists_every_key_with_type_default_and_doc():
    proc = subprocess.run([sys.executable, "-m", "fastvae.train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for key in flatten(Config()):
        assert f"\n  {key} = " in proc.stdout, key
    assert '  train.ops = "auto"  (eager | compiled | triton | auto)\n      VAE ops: eager reference' in proc.stdout
    assert "  optim.lr = 0.0005  (float)\n      learning rate" in proc.stdout
    assert "  train.mixed_precision = \"auto\"  (auto | no | bf16 | fp16 | null)" in proc.stdout


def test_run_folder_holds_its_resolved_config_and_shareable_checkpoints(tmp_path):
    from fastvae.config import load_config

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny_config(out, "train.max_steps=2", "optim.lr=1e-3"))
    finally:
        os.umask(old)
    assert load_config(out / "config.yaml") == tiny_config(out, "train.max_steps=2", "optim.lr=1e-3")
    for path in list_checkpoints(out)[-1].iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name  # group and others may read, as with any file


def test_train_step_takes_batches_without_sample_ids(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run"))
    x, y, _ = next(iter(trainer.train_loader))
    assert trainer.train_step((x, y))["stepped"]  # eps from torch's generator instead of keyed ones
