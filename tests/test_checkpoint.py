"""Checkpoints (fastvae/checkpoint.py): what they hold, atomic writes, damage, resume rules."""

import dataclasses
import errno
import hashlib
import io
import json
import shutil

import pytest
import torch

from fastvae.checkpoint import TrainState, list_checkpoints, read_meta
import fastvae.checkpoint as checkpoint_module
from fastvae.checkpoint import problem
from fastvae.loading import load_model
from fastvae.config import RESUME_MAY_DIFFER, RESUME_MUST_MATCH, Config, flatten, from_dict, to_dict
from fastvae.errors import UserError
from fastvae.train import main, train
from fastvae.trainer import Trainer
from fastvae.evaluate import main as evaluate_main
from fastvae.run_setup import reset_accelerate_state
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config, tree_snapshot
from shared import built_once


def test_checkpoints_hold_the_train_state(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=5"))
    meta = read_meta(list_checkpoints(out)[-1])
    assert TrainState.from_meta(meta) == TrainState(step=5, epoch=0, batch_in_epoch=5, wandb_run_id=None,
                                                    global_batch=32, epoch_sums=meta["epoch_sums"])
    assert meta["epoch_sums"]["ranks"][0][3] == 5 * 32  # mid-epoch: the epoch's sums so far
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
    resumed.close()  # out_dir is this Trainer's until then
    with pytest.raises(UserError, match="stopped 96 images into epoch 1 .* no whole number of this run's global "
                                        "batches of 64"):
        Trainer(tiny_config(out, "data.batch_size=64", "train.resume=auto"))
    old = TrainState(step=3, batch_in_epoch=3)  # a checkpoint from before global_batch was recorded
    assert old.rebatch(16) is None and old.batch_in_epoch == 3


@pytest.mark.parametrize("batch, steps_left", [(16, 8 + 16), (64, 2 + 4)])
def test_a_resume_with_another_batch_size_says_and_takes_the_steps_it_will_take(tmp_path, capsys, batch, steps_left):
    """4 batches of 32 (128 images into epoch 1 of 2), then batches of 16 or 64: the start line and the
    progress bar count the steps this run takes, and the run ends with the second epoch (with batches
    of 64 the old count, 2 epochs x 4 steps = 8, ended it at step 8, before the epoch's end)."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.epochs=2", "train.max_steps=4"))
    capsys.readouterr()
    result = train(tiny_config(out, "train.epochs=2", f"data.batch_size={batch}", "train.resume=auto"))
    printed = capsys.readouterr()
    assert f"{steps_left} steps (step 4 to {4 + steps_left}) ->" in printed.out
    assert (result["step"], result["epoch"]) == (4 + steps_left, 2)
    bar = [part for part in printed.err.replace("\r", "\n").splitlines() if part.startswith("train:")][-1]
    assert f"100%" in bar and f" {4 + steps_left}/{4 + steps_left} " in bar, bar


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


def test_a_full_disk_during_a_checkpoint_write_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    """ENOSPC at the worst moment (files written, not yet renamed): the partial folder is removed, the
    good checkpoint is byte for byte what it was, and the run says which one that is (exit 4)."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4"))
    before = tree_snapshot(out / "checkpoints")
    real_fsync = checkpoint_module._fsync_tree

    def disk_full(root):
        if root.name.startswith(".tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(root)

    monkeypatch.setattr(checkpoint_module, "_fsync_tree", disk_full)
    with pytest.raises(SystemExit) as exc:
        main(["--config", "mnist", *TINY, "train.max_steps=6", "train.resume=auto", f"out_dir={out}"])
    monkeypatch.setattr(checkpoint_module, "_fsync_tree", real_fsync)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]  # not the bar
    assert exc.value.code == 4 and len(err) == 1, err
    assert "could not write checkpoint" in err[0] and "No space left on device" in err[0]
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step_00000004'}" in err[0]
    assert not (out / "checkpoints" / ".tmp-step_00000006").exists()
    assert tree_snapshot(out / "checkpoints") == before
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


# ---------------------------------------------------------------- trust: what a checkpoint may hold


class WritesAFileWhenUnpickled:
    """A pickle that would run code: unpickling it creates `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def tamper(ckpt, name: str, data: bytes) -> None:
    """Replace a file of a checkpoint and update its manifest, as an attacker with write access would."""
    (ckpt / name).write_bytes(data)
    meta = json.loads((ckpt / "fastvae.json").read_text())
    meta["files"][name] = len(data)
    meta["sha256"][name] = hashlib.sha256(data).hexdigest()
    (ckpt / "fastvae.json").write_text(json.dumps(meta))


def refused(args, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
    assert exc.value.code == 2 and len(err) == 1, err
    assert "\x1b" not in err[0] and len(err[0]) < 400, err[0]
    return err[0]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    def build(folder):
        train(tiny_config(folder / "run", "train.max_steps=3", "optim.scheduler=cosine"))
        reset_accelerate_state()

    return built_once(tmp_path_factory, "tiny_cosine_3_steps", build) / "run"


@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_no_code_runs_from_a_checkpoint(name, good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    sentinel = tmp_path / "code_ran"
    buffer = io.BytesIO()
    torch.save({"state": WritesAFileWhenUnpickled(sentinel)}, buffer)
    tamper(ckpt, name, buffer.getvalue())
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", "optim.scheduler=cosine", "train.resume=auto",
                    f"out_dir={out}"], capsys)
    assert not sentinel.exists()
    assert f"{name}' refused: it is not plain tensors and numbers" in line, line


def test_the_schedule_resumes_from_json_and_nothing_is_pickled(good_run):
    ckpt = list_checkpoints(good_run)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    assert meta["format"] == 2 and meta["scheduler"]["last_epoch"] == 3
    assert not (ckpt / "custom_checkpoint_0.pkl").exists()
    assert set(meta["sha256"]) == set(meta["files"]) == {p.name for p in ckpt.iterdir()} - {"fastvae.json"}


def test_changed_weights_behind_an_intact_header_are_refused(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-100:-90] = b"\xff" * 10  # a few weight bytes: NaN-like floats, same size, header intact
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", f"train.resume={ckpt}", f"out_dir={out}"], capsys)
    assert "model.safetensors does not match its sha256" in line
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--checkpoint", str(ckpt), "--max-images", "10"])
    assert exc.value.code == 2 and "does not match its sha256" in capsys.readouterr().err


def test_auto_resume_stops_at_damaged_checkpoints_and_deletes_none(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    for ckpt in list_checkpoints(out):
        (ckpt / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes()[:100])
    before = tree_snapshot(out)
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", "train.resume=auto", f"out_dir={out}"], capsys)
    assert "train.resume=auto found only damaged checkpoints" in line
    assert tree_snapshot(out) == before


def test_a_file_the_manifest_does_not_list_is_refused(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    (ckpt / "extra.pkl").write_bytes(b"anything")
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", f"train.resume={ckpt}", f"out_dir={out}"], capsys)
    assert "it holds extra.pkl, which its fastvae.json does not list" in line


BAD_META = {
    "step a string": lambda m: m.update(step="abc"),
    "epoch a string": lambda m: m.update(epoch="1"),
    "negative position": lambda m: m.update(batch_in_epoch=-5),
    "step 1e30": lambda m: m.update(step=1e30),
    "step a bool": lambda m: m.update(step=True),
    "files a list": lambda m: m.update(files=["model.safetensors"]),
    "no config": lambda m: m.pop("config"),
    "config a list": lambda m: m.update(config=[1, 2]),
    "the file a list": None,
    "a file outside": lambda m: m["files"].update({"../x": 1}),
}


@pytest.mark.parametrize("case", BAD_META)
def test_a_bad_manifest_is_one_line_exit_2_and_changes_nothing(case, good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    if BAD_META[case] is None:
        meta = [meta]
    else:
        BAD_META[case](meta)
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    before = tree_snapshot(out)
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", f"train.resume={ckpt}",
                    f"out_dir={tmp_path / 'fresh'}"], capsys)
    assert "fastvae.json" in line, line
    assert tree_snapshot(out) == before and not (tmp_path / "fresh").exists()
    with pytest.raises(SystemExit) as exc:
        evaluate_main(["--checkpoint", str(ckpt), "--max-images", "10"])
    assert exc.value.code == 2


def test_a_checkpoint_from_before_format_2_resumes_exactly(tmp_path):
    """Format 1 (875e167 and before): the schedule pickled by accelerate, no sha256. Made from a format 2
    checkpoint here; it resumes to the parameters of an uninterrupted run (also checked against a
    checkpoint 875e167 wrote: the session note of this change)."""
    common = ["train.epochs=1", "optim.scheduler=cosine"]
    train(tiny_config(tmp_path / "straight", *common, "train.max_steps=6"))
    out = tmp_path / "old"
    train(tiny_config(out, *common, "train.max_steps=3"))
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    torch.save(meta.pop("scheduler"), ckpt / "custom_checkpoint_0.pkl")
    meta.pop("sha256")
    meta["format"] = 1
    meta["files"]["custom_checkpoint_0.pkl"] = (ckpt / "custom_checkpoint_0.pkl").stat().st_size
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    train(tiny_config(out, *common, "train.max_steps=6", "train.resume=auto"))
    assert_same_weights(final_weights(out), final_weights(tmp_path / "straight"))


def test_an_out_dir_that_turns_read_only_mid_run_is_one_line(tmp_path, monkeypatch, capsys):
    import fastvae.tracking as tracking

    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4", "train.log_every=2"))
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).endswith("steps.jsonl"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(tracking, "open", read_only, raising=False)
    with pytest.raises(SystemExit) as exc:
        main(["--config", "mnist", *TINY, "train.max_steps=8", "train.log_every=2", "train.resume=auto",
              f"out_dir={out}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
    assert exc.value.code == 4 and len(err) == 1, err
    assert f"could not write {out / 'steps.jsonl'} (Read-only file system); the last good checkpoint is " \
           f"{out / 'checkpoints' / 'step_00000004'}" in err[0]


# ---------------------------------------------------------------- trust: the code a checkpoint names


MARKER_MODULE = '''from pathlib import Path
Path(__file__).with_name("{name}_was_imported").write_text("code ran")
from fastvae.models import ConvVAE as X
'''


def naming(good_run, tmp_path, model_name: str):
    """A copy of the good run whose fastvae.json names `model_name` (the manifest cannot cover that
    file), and a module beside it that leaves a marker file when imported."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    meta["config"]["model"]["name"] = model_name
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    (tmp_path / "evilmod.py").write_text(MARKER_MODULE.format(name="evilmod"))
    return ckpt


def one_line_exit_2(capsys, call) -> str:
    with pytest.raises(SystemExit) as exc:
        call()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
    assert exc.value.code == 2 and len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("command", ["generate", "evaluate", "fastvae.load"])
def test_a_checkpoint_naming_a_module_imports_nothing_without_consent(command, good_run, tmp_path, monkeypatch,
                                                                     capsys):
    import sys

    from fastvae.loading import load
    from fastvae.errors import exit_on_user_error
    from fastvae.generate import main as generate_main

    ckpt = naming(good_run, tmp_path, "evilmod:X")
    monkeypatch.chdir(tmp_path)  # where the module is importable from, as `python -m` would have it
    monkeypatch.syspath_prepend(str(tmp_path))
    calls = {"generate": lambda: generate_main(["sample", "--checkpoint", str(ckpt), "--n", "4", "--out", "g"]),
             "evaluate": lambda: evaluate_main(["--checkpoint", str(ckpt), "--max-images", "4"]),
             "fastvae.load": lambda: exit_on_user_error(load)(ckpt, "cpu")}
    line = one_line_exit_2(capsys, calls[command])
    assert "model.name 'evilmod:X' is code outside fastvae (module 'evilmod') and was not imported" in line
    assert "--trust-model evilmod" in line
    assert not (tmp_path / "evilmod_was_imported").exists() and "evilmod" not in sys.modules
    # consent: the user names the module, and it loads (its import is what writes the marker)
    assert type(load(ckpt, "cpu", trust_model="evilmod").model).__name__ == "ConvVAE"
    assert (tmp_path / "evilmod_was_imported").exists()
    sys.modules.pop("evilmod", None)


def test_a_standard_library_module_named_by_a_checkpoint_is_not_imported(good_run, tmp_path, capsys):
    import sys

    ckpt = naming(good_run, tmp_path, "this:X")  # `import this` prints the Zen of Python
    sys.modules.pop("this", None)
    line = one_line_exit_2(capsys, lambda: evaluate_main(["--checkpoint", str(ckpt), "--max-images", "4"]))
    assert "module 'this'" in line and "this" not in sys.modules
    assert "Beautiful is better" not in capsys.readouterr().out


def test_a_module_inside_a_checkpoint_folder_is_never_imported(good_run, tmp_path, monkeypatch, capsys):
    """A namespace-package path through runs/.../step_N/ to a module the checkpoint brings: refused
    even when the user names it."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    (ckpt / "evil.py").write_text(MARKER_MODULE.format(name="evil"))
    name = f"run.checkpoints.{ckpt.name}.evil"
    meta = json.loads((ckpt / "fastvae.json").read_text())
    meta["config"]["model"]["name"] = f"{name}:X"
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    monkeypatch.chdir(tmp_path)
    line = one_line_exit_2(capsys, lambda: evaluate_main(["--checkpoint", str(ckpt), "--max-images", "4",
                                                          "--trust-model", name]))
    assert f"lies inside the checkpoint folder '{ckpt}' and was not imported" in line
    assert not (ckpt / "evil_was_imported").exists()


@pytest.mark.slow
def test_accelerate_launch_of_evaluate_imports_nothing_without_consent(good_run, tmp_path, python):
    import subprocess

    from fastvae.launch.processes import accelerate_launch

    ckpt = naming(good_run, tmp_path, "evilmod:X")
    proc = subprocess.run(accelerate_launch(["-m", "fastvae.evaluate", "--checkpoint", str(ckpt), "--max-images",
                                             "4"], processes=1), cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "ACCELERATE_USE_CPU": "1"})
    assert proc.returncode != 0
    assert "and was not imported; expected --trust-model evilmod" in proc.stderr
    assert not (tmp_path / "evilmod_was_imported").exists()


@pytest.mark.parametrize("case", ["nested arrays", "an integer of 5,001 digits"])
def test_a_hostile_manifest_is_one_line_not_a_traceback(case, good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    text = (ckpt / "fastvae.json").read_text()
    hostile = "[" * 100_000 if case == "nested arrays" else text.replace('"step": 3', '"step": ' + "9" * 5001)
    (ckpt / "fastvae.json").write_text(hostile)
    line = one_line_exit_2(capsys, lambda: evaluate_main(["--checkpoint", str(ckpt), "--max-images", "4"]))
    assert f"checkpoint file '{ckpt / 'fastvae.json'}' is corrupt" in line


def test_a_manifest_claiming_format_1_with_format_2_content_is_refused(good_run, tmp_path, capsys):
    """The hashes catch damage, not an attacker who edits fastvae.json (docs/reliability.md); a
    manifest edited to claim the hash-less format 1 while keeping format 2's schedule is refused."""
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    meta.pop("sha256")
    meta["format"] = 1
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", f"train.resume={ckpt}",
                    f"out_dir={tmp_path / 'fresh'}"], capsys)
    assert "format is 1; expected 2 for a manifest with sha256 or the schedule's state" in line


def test_a_checkpoint_file_that_is_a_link_is_refused(good_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(good_run, out)
    ckpt = list_checkpoints(out)[-1]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(ckpt / "model.safetensors", outside)
    (ckpt / "model.safetensors").symlink_to(outside)
    line = refused(["--config", "mnist", *TINY, "train.max_steps=5", f"train.resume={ckpt}",
                    f"out_dir={tmp_path / 'fresh'}"], capsys)
    assert "model.safetensors is a link (refused: a checkpoint loads only files of its own folder)" in line
    line = one_line_exit_2(capsys, lambda: evaluate_main(["--checkpoint", str(ckpt), "--max-images", "4"]))
    assert "has no model.safetensors of its own (missing, or a link)" in line


# ---------------------------------------------------------------- checkpoints of earlier versions

# Written by main at 5358976 (2026-12-06), whose discriminator keys were loss.disc_*, with
#   python -m fastvae.train --config mnist model.name=kl_autoencoder "model.kwargs={block_out_channels: [4, 8],
#     norm_num_groups: 4, latent_channels: 1}" loss.objective=ldm loss.beta=1e-6 loss.lpips_weights=VGG
#     loss.disc_weight=0.5 loss.disc_start=1 disc.channels=4 disc.layers=2 disc.norm=none data.limit=32
#     data.batch_size=16 train.max_steps=2 train.epochs=1 train.samples=4 train.ema_decay=0.9 train.mixed_precision=no
FORMAT2_RUN = ROOT / "tests" / "fixtures" / "format2_ldm_run"
FORMAT2_TODAY = ["model.name=kl_autoencoder", "model.kwargs={block_out_channels: [4, 8], norm_num_groups: 4, "
                 "latent_channels: 1}", "loss.objective=ldm", "loss.beta=1e-6", "disc.weight=0.5", "disc.start=1",
                 "disc.channels=4", "disc.layers=2", "disc.norm=none", "data.limit=32", "data.batch_size=16",
                 "train.epochs=2", "train.samples=4", "train.ema_decay=0.9"]


def test_a_checkpoint_of_the_previous_main_loads_resumes_and_evaluates(tmp_path, tmp_path_factory):
    """Its loss.disc_* keys are read back as disc.*: it loads (with its EMA), evaluates, and a run with
    today's keys resumes it (the discriminator's weights and optimizer included) and trains on."""
    from kl_runs import lpips_weights

    pytest.importorskip("diffusers")
    run = tmp_path / "run"
    shutil.copytree(FORMAT2_RUN, run)
    checkpoint = list_checkpoints(run)[-1]
    assert problem(checkpoint) is None and "disc_weight" in read_meta(checkpoint)["config"]["loss"]
    model, cfg, _ = load_model(checkpoint)
    assert (cfg.disc.weight, cfg.disc.start, cfg.disc.loss) == (0.5, 1, "hinge") and model.latent_dim == 14 * 14
    report = evaluate_main(["--checkpoint", str(checkpoint), "--max-images", "8", "--json", str(tmp_path / "e.json")])
    assert report["images"] == 8 and report["psnr_db"] > 0
    result = train(tiny_config(run, *FORMAT2_TODAY, f"loss.lpips_weights={lpips_weights(tmp_path_factory)}",
                               "train.resume=auto", "train.max_steps=3"))
    assert result["step"] == 3
    assert set(read_meta(list_checkpoints(run)[-1])["config"]["disc"]) >= {"weight", "start", "factor", "loss"}


# ---------------------------------------------------------------- outputs never go into checkpoints

def test_no_output_goes_into_a_checkpoint_or_over_a_file_it_did_not_write(good_run, tmp_path, capsys):
    """evaluate --json, generate --out and export --out pointing into a checkpoint (or over a file of
    another kind, through a link, with a newline) stop before any work, in one line with exit 2; the
    checkpoint is untouched and still resumes."""
    from fastvae.evaluate import main as evaluate
    from fastvae.export import main as export
    from fastvae.generate import main as generate

    shutil.copytree(good_run, tmp_path / "run")
    ckpt = list_checkpoints(tmp_path / "run")[-1]
    before = tree_snapshot(ckpt)
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    cases = [
        (evaluate, ["--checkpoint", str(ckpt), "--json", str(ckpt / "model.safetensors")], "is inside the checkpoint"),
        (evaluate, ["--checkpoint", str(ckpt), "--json", str(ckpt / "eval.json")], "is inside the checkpoint"),
        (evaluate, ["--checkpoint", str(ckpt), "--json", str(tmp_path / "notes.txt")], "was not written by this"),
        (evaluate, ["--checkpoint", str(ckpt), "--json", str(tmp_path)], "is a folder; expected a file path"),
        (generate, ["sample", "--checkpoint", str(ckpt), "--out", str(ckpt)], "is inside the checkpoint"),
        (generate, ["sample", "--checkpoint", str(ckpt), "--out", str(tmp_path / "notes.txt")], "is a file"),
        (export, ["--checkpoint", str(ckpt), "--out", str(ckpt / "exported")], "is inside the checkpoint"),
        (export, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "link")], "is a link"),
        (export, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "notes.txt" / "x")], "is a file; expected a folder"),
        (export, ["--checkpoint", str(ckpt), "--out", str(tmp_path / "a\nb")], "without control characters"),
    ]
    for command, argv, message in cases:
        with pytest.raises(SystemExit) as exc:
            command(argv)
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and message in err and len(err.splitlines()) == 1, (argv, err)
    assert tree_snapshot(ckpt) == before and problem(ckpt) is None
    report = tmp_path / "eval.json"
    evaluate(["--checkpoint", str(ckpt), "--max-images", "8", "--json", str(report)])
    evaluate(["--checkpoint", str(ckpt), "--max-images", "8", "--json", str(report)])  # its own report: replaced


def test_a_stopped_and_resumed_run_writes_the_epoch_rows_of_an_uninterrupted_one(tmp_path):
    """2 epochs of 8 steps, stopped at step 5 (train.max_steps) and resumed: no row for the part before
    the stop, and epoch 1's row (its loss, recon, kl over all 8 steps, the held-out numbers) is the
    uninterrupted run's, bit for bit; the checkpoint at the stop holds the epoch's sums so far."""
    from fastvae.tracking import read_records

    train(tiny_config(tmp_path / "straight", "train.epochs=2"))
    train(tiny_config(tmp_path / "stopped", "train.epochs=2", "train.max_steps=5"))
    assert not (tmp_path / "stopped" / "metrics.jsonl").exists()  # no row for a part of an epoch
    sums = read_meta(list_checkpoints(tmp_path / "stopped")[-1])["epoch_sums"]
    assert len(sums["ranks"]) == 1 and sums["ranks"][0][3] == 5 * 32  # images so far, one rank
    train(tiny_config(tmp_path / "stopped", "train.epochs=2", "train.resume=auto"))
    straight, resumed = read_records(tmp_path / "straight"), read_records(tmp_path / "stopped")
    assert [r["epoch"] for r in resumed] == [1, 2]
    for a, b in zip(straight, resumed):
        for key in a:
            if key != "images_per_sec":
                assert a[key] == b[key], key
