"""The Trainer's parts on their own: train_step, TrainState, optimizer builders, config docs and
the resume key lists."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from fastvae.checkpoint import TrainState, list_checkpoints, read_meta
from fastvae.config import RESUME_MAY_DIFFER, RESUME_MUST_MATCH, Config, flatten, from_dict, to_dict
from fastvae.errors import UserError
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


def test_checkpoints_hold_the_train_state(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=5"))
    meta = read_meta(list_checkpoints(out)[-1])
    assert TrainState.from_meta(meta) == TrainState(step=5, epoch=0, batch_in_epoch=5, wandb_run_id=None,
                                                    global_batch=32)
    assert {f.name for f in dataclasses.fields(TrainState)} <= meta.keys()


def test_resume_with_another_global_batch_continues_at_the_same_image(tmp_path, capsys):
    """E.g. a requeued job on another number of nodes: 3 batches of 32 trained, then batches of 16
    (as 1 x 16, or 2 processes x 8) train the epoch's other 160 images, each once."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=3"))  # 256 images, 8 batches of 32 per epoch: stopped mid-epoch
    resumed = Trainer(tiny_config(out, "data.batch_size=16", "train.resume=auto"))
    assert (resumed.state.batch_in_epoch, resumed.state.global_batch) == (6, 16)
    assert "resuming 96 images into epoch 1: 6 global batches of 16 (the checkpoint's global batch was 32)" \
        in capsys.readouterr().out
    order = resumed.train_loader.plan.order(0)
    rest = torch.cat([batch[2] for batch in resumed._remaining_batches()])
    assert torch.equal(rest, order[96:])
    with pytest.raises(UserError, match="stopped 96 images into epoch 1 .* no whole number of this run's global "
                                        "batches of 64"):
        Trainer(tiny_config(out, "data.batch_size=64", "train.resume=auto"))
    old = TrainState(step=3, batch_in_epoch=3)  # a checkpoint from before global_batch was recorded
    assert old.rebatch(16) is None and old.batch_in_epoch == 3


def test_unknown_optimizer_is_an_error_not_sgd():
    cfg = Config()
    cfg.optim.name = "lamb"  # past validation, as code (not a config file) could set it
    with pytest.raises(ValueError, match="optim.name 'lamb': expected adam, adamw or sgd"):
        build_optimizer(cfg, torch.nn.Linear(2, 2).parameters())


def test_resume_lists_name_every_config_key_once():
    keys = list(flatten(Config()))
    assert sorted(keys) == sorted([*RESUME_MUST_MATCH, *RESUME_MAY_DIFFER])
    assert len(set(RESUME_MUST_MATCH) | set(RESUME_MAY_DIFFER)) == len(keys)


def test_resume_refuses_a_key_that_must_match_and_allows_the_others(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=2"))
    with pytest.raises(UserError, match="was trained with data.drop_last=True; expected it to match this run's False"):
        train(tiny_config(out, "train.resume=auto", "data.drop_last=false"))
    resumed = train(tiny_config(out, "train.resume=auto", "train.max_steps=3", "loss.beta=0.5", "optim.lr=1e-3"))
    assert resumed["step"] == 3


def test_config_of_an_older_checkpoint_with_a_retired_key_still_loads():
    old = to_dict(Config())
    old["train"]["record_sample_ids"] = True  # written by fastvae 0.1.0
    assert from_dict(old) == Config()


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
