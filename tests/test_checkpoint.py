"""Checkpoints (fastvae/checkpoint.py): what they hold, atomic writes, damage, resume rules."""

import dataclasses

import pytest
import torch

from fastvae.checkpoint import TrainState, list_checkpoints, read_meta
import fastvae.checkpoint as checkpoint_module
from fastvae.checkpoint import load_model, problem
from fastvae.config import RESUME_MAY_DIFFER, RESUME_MUST_MATCH, Config, flatten, from_dict, to_dict
from fastvae.errors import UserError
from fastvae.train import train
from fastvae.trainer import Trainer
from helpers import tiny_config, tree_snapshot


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


def test_resume_lists_name_every_config_key_once():
    keys = list(flatten(Config()))
    assert sorted(keys) == sorted([*RESUME_MUST_MATCH, *RESUME_MAY_DIFFER])
    assert len(set(RESUME_MUST_MATCH) | set(RESUME_MAY_DIFFER)) == len(keys)


def test_crash_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4"))
    before = tree_snapshot(out / "checkpoints")
    real_fsync = checkpoint_module._fsync_tree

    def crash_mid_write(root):
        if root.name.startswith(".tmp-"):  # files written, not yet renamed: the worst moment
            raise OSError("injected crash during checkpoint write")
        real_fsync(root)

    monkeypatch.setattr(checkpoint_module, "_fsync_tree", crash_mid_write)
    with pytest.raises(OSError, match="injected crash"):
        train(tiny_config(out, "train.max_steps=6", "train.resume=auto"))
    monkeypatch.setattr(checkpoint_module, "_fsync_tree", real_fsync)
    assert (out / "checkpoints" / ".tmp-step_00000006").is_dir()  # the partial write is there...
    assert [c.name for c in list_checkpoints(out)] == ["step_00000004"]  # ...and is not a checkpoint
    after = {k: v for k, v in tree_snapshot(out / "checkpoints").items() if not k.startswith(".tmp-")}
    assert after == before  # the good checkpoint is byte for byte what it was
    assert problem(out / "checkpoints" / "step_00000004") is None
    load_model(out / "checkpoints" / "step_00000004")
    assert train(tiny_config(out, "train.max_steps=6", "train.resume=auto"))["step"] == 6


def test_truncated_newest_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4", "train.checkpoint_every=2"))
    newest = list_checkpoints(out)[-1]
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "model.safetensors has 1000 bytes" in problem(newest)
    result = train(tiny_config(out, "train.max_steps=5", "train.resume=auto"))
    assert result["step"] == 5
    assert f"skipping checkpoint {newest}: file model.safetensors has 1000 bytes" in capsys.readouterr().out
    with pytest.raises(UserError, match=f"checkpoint '{newest}' cannot be resumed: file model.safetensors has"):
        train(tiny_config(tmp_path / "other", f"train.resume={newest}"))
