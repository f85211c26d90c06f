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
