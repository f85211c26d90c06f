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
    from wandb_records import finished_records

    for run in new:
        assert "run" in [rec.WhichOneof("record_type") for rec in finished_records(run)]


def test_offline_run_holds_config_scalar_history_pictures_and_checkpoint(tmp_path):
    from wandb_records import run_contents

    before = set(offline_runs())
    out = tmp_path / "contents"
    train(tiny_config(out, "logger=wandb", "train.epochs=2", "train.log_every=2", "wandb.group=g1",
                      "wandb.tags=[lecture,mnist]", "wandb.name=tiny-run", "wandb.log_checkpoint=true"))
    (run,) = [p for p in offline_runs() if p not in before]
    got = run_contents(run)
    assert got["name"] == "tiny-run" and got["group"] == "g1" and got["tags"] == ["lecture", "mnist"]
    assert got["project"] == "fastvae"
    assert got["config"]["model.latent_dim"] == 2 and got["config"]["data.limit"] == 256
    assert got["config"]["out_dir"] == str(out)
    steps = [h for h in got["history"] if "train/loss" in h]
    assert [h["_step"] for h in steps] == list(range(2, 17, 2))  # every log_every steps of 16
    for h in steps:
        for key in ("train/recon", "train/kl", "train/lr", "train/images_per_sec"):
            assert isinstance(h[key], float), key
        assert h["train/images_per_sec"] > 0
    epochs = [h for h in got["history"] if "epoch/loss" in h]
    assert [h["epoch/epoch"] for h in epochs] == [1, 2]
    # per-epoch pictures: logged as images and present in the run's files
    for name in ("samples", "reconstructions", "latent_scatter"):
        logged = [h for h in got["history"] if f"pictures/{name}/path" in h]
        assert [h["_step"] for h in logged] == [8, 16], name
        for h in logged:
            assert h[f"pictures/{name}/_type"] == "image-file"
            assert (run / "files" / h[f"pictures/{name}/path"]).stat().st_size == h[f"pictures/{name}/size"]
    assert got["artifacts"] == ["tiny-run-checkpoint"]


def test_resumed_run_logs_into_the_same_wandb_run(tmp_path):
    from wandb_records import run_contents

    before = set(offline_runs())
    out = tmp_path / "resumed"
    train(tiny_config(out, "logger=wandb", "train.max_steps=4", "train.checkpoint_every=4", "train.log_every=2"))
    train(tiny_config(out, "logger=wandb", "train.resume=auto", "train.epochs=1", "train.log_every=2"))
    first, second = (run_contents(p) for p in sorted(p for p in offline_runs() if p not in before))
    assert first["run_id"] == second["run_id"]
    assert [h["_step"] for h in second["history"] if "train/loss" in h] == [6, 8]


def test_wandb_not_logged_in_fails_at_once_with_one_line(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_MODE="online",
               NETRC=str(tmp_path / "no-netrc"))
    proc = subprocess.run([sys.executable, "-m", "fastvae.train", "--config", "configs/mnist.yaml", "logger=wandb",
                           f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120, env=env,
                          stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "wandb login" in lines[0] and "WANDB_MODE=offline" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def new_offline_runs(before):
    return sorted(p for p in offline_runs() if p not in before)


def test_wandb_environment_variables_are_fallbacks_the_config_wins_over(tmp_path, monkeypatch):
    from wandb_records import run_contents

    for var, value in {"WANDB_PROJECT": "envproject", "WANDB_NAME": "envname", "WANDB_RUN_GROUP": "envgroup",
                       "WANDB_TAGS": "a,b", "WANDB_RUN_ID": "envrunid1"}.items():
        monkeypatch.setenv(var, value)
    before = set(offline_runs())
    train(tiny_config(tmp_path / "env", "logger=wandb", "train.max_steps=2"))
    train(tiny_config(tmp_path / "cfg", "logger=wandb", "train.max_steps=2", "wandb.project=cfgproject",
                      "wandb.name=cfgname", "wandb.group=cfggroup", "wandb.tags=[c]"))
    from_env, from_cfg = (run_contents(p) for p in new_offline_runs(before))
    assert (from_env["project"], from_env["name"], from_env["group"], from_env["tags"], from_env["run_id"]) == \
        ("envproject", "envname", "envgroup", ["a", "b"], "envrunid1")
    assert (from_cfg["project"], from_cfg["name"], from_cfg["group"], from_cfg["tags"]) == \
        ("cfgproject", "cfgname", "cfggroup", ["c"])


def test_resume_after_a_crash_past_the_checkpoint_logs_no_step_twice(tmp_path):
    import shutil

    from wandb_records import run_contents

    before = set(offline_runs())
    out = tmp_path / "crashed"
    common = ["logger=wandb", "train.epochs=2", "train.log_every=2", "train.checkpoint_every=4", "wandb.log_images=false"]
    train(tiny_config(out, *common, "train.max_steps=12"))
    # as if the run died after logging step 12 but before its checkpoint 12 was written
    shutil.rmtree(list_checkpoints(out)[-1])
    assert list_checkpoints(out)[-1].name == "step_00000008"
    train(tiny_config(out, *common, "train.resume=auto"))
    first, second = (run_contents(p) for p in new_offline_runs(before))
    assert first["run_id"] == second["run_id"]
    steps = [[h["_step"] for h in run["history"] if "train/loss" in h] for run in (first, second)]
    assert steps == [[2, 4, 6, 8, 10, 12], [14, 16]]  # W&B would drop a second 10 and 12: not sent at all
    epochs = [[h["_step"] for h in run["history"] if "epoch/loss" in h] for run in (first, second)]
    assert epochs == [[8], [16]]  # the stop at 12 wrote no epoch record


def test_evaluate_writes_its_json_first_and_logs_to_wandb_only_when_asked(tmp_path):
    import json
    import subprocess
    import sys

    out = tmp_path / "tracked"
    train(tiny_config(out, "logger=wandb", "train.max_steps=2"))
    ckpt = str(list_checkpoints(out)[-1])
    evaluate = [sys.executable, "-m", "fastvae.evaluate", "--checkpoint", ckpt, "--max-images", "20"]
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_CONFIG_DIR=str(home), WANDB_CACHE_DIR=str(home), WANDB_DATA_DIR=str(home),
               NETRC=str(home / "no-netrc"), WANDB_MODE="online")  # online and not logged in
    proc = subprocess.run([*evaluate, "--json", str(tmp_path / "a.json")], capture_output=True, text=True,
                          timeout=180, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2 and "wandb login" in proc.stderr.strip().splitlines()[-1]
    assert json.loads((tmp_path / "a.json").read_text())["images"] == 20  # written before W&B was tried
    proc = subprocess.run([*evaluate, "--no-wandb"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    env["WANDB_MODE"] = "offline"
    proc = subprocess.run([*evaluate, "--wandb"], capture_output=True, text=True, timeout=180, env=env,
                          cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list((out / "wandb").glob("offline-run-*"))  # in the run's folder
    assert not (tmp_path / "wandb").exists()  # not in the current folder
