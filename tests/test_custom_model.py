"""A user's own model (docs/custom_model.md's example, and bad ones) gets all of fastvae.

The page's commands and code are read from the page and run as written, so the page cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fastvae.checkpoint import list_checkpoints
from fastvae.train import main, train
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config
from test_reliability import TRAIN, finish, newest_step, run_until

PAGE = ROOT / "docs" / "custom_model.md"
EXAMPLE = ROOT / "docs" / "examples"
MODEL = ["model.name=my_vae:MLPVAE", "model.latent_dim=8", "model.kwargs.hidden=64"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1",
       "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def page_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", PAGE.read_text(), re.S)


@pytest.fixture
def on_path(monkeypatch):
    """The example's folder importable, as `cd docs/examples` makes it for the commands."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    yield
    sys.modules.pop("my_vae", None)


def test_the_page_shows_the_example_file_as_it_is():
    assert page_blocks("python")[0] == (EXAMPLE / "my_vae.py").read_text()


@pytest.mark.slow
def test_the_page_runs_as_written(tmp_path):
    """Every command of the page in a copy of docs/examples, then its Python code."""
    shutil.copytree(EXAMPLE, tmp_path / "docs" / "examples", ignore=shutil.ignore_patterns("runs", "__pycache__"))
    (commands,) = page_blocks("bash")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "were not passed to `accelerate launch`" not in proc.stderr  # quiet multi-process runs
    runs = tmp_path / "docs" / "examples" / "runs"
    assert "fastvae: resumed from" in proc.stdout
    assert json.loads((runs / "my_vae_2proc" / "summary.json").read_text())["ranks_agree"] is True
    assert "export PYTHONPATH=" in proc.stdout and str(tmp_path / "docs" / "examples") in proc.stdout
    assert not (runs / "my_vae_slurm").exists()  # a dry run writes nothing
    generated = sorted(p.name for p in (runs / "my_vae" / "generated").iterdir())
    assert any(n.startswith("samples") for n in generated) and any(n.startswith("interpolation") for n in generated)
    report = json.loads((runs / "my_vae" / "eval.json").read_text())
    assert report["iwae_samples"] == 50 and report["latent_dim"] == 8
    code = page_blocks("python")[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "docs" / "examples", env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_resume_is_bit_identical(tmp_path, on_path):
    train(tiny_config(tmp_path / "straight", *MODEL, "train.epochs=2"))
    train(tiny_config(tmp_path / "stopped", *MODEL, "train.epochs=2", "train.max_steps=5"))
    train(tiny_config(tmp_path / "stopped", *MODEL, "train.epochs=2", "train.resume=auto"))
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "straight"))
    meta = json.loads((list_checkpoints(tmp_path / "straight")[-1] / "fastvae.json").read_text())
    assert meta["config"]["model"]["name"] == "my_vae:MLPVAE" and meta["config"]["model"]["kwargs"] == {"hidden": 64}


def test_triton_ops_follow_the_eager_ops(tmp_path, on_path):
    eager = train(tiny_config(tmp_path / "eager", *MODEL, "train.max_steps=4", "train.ops=eager"))
    fused = train(tiny_config(tmp_path / "triton", *MODEL, "train.max_steps=4", "train.ops=triton"))
    assert fused["param_checksum"] == pytest.approx(eager["param_checksum"], rel=1e-4)


@pytest.mark.slow
def test_compiled_step_trains_the_example(tmp_path, on_path):
    plain = train(tiny_config(tmp_path / "eager", *MODEL, "train.max_steps=3"))
    compiled = train(tiny_config(tmp_path / "compiled", *MODEL, "train.max_steps=3", "train.compile=true"))
    assert compiled["param_checksum"] == pytest.approx(plain["param_checksum"], rel=1e-4)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    """Run from the example's folder, as a user would: `python -m` imports my_vae from there."""
    common = [*TRAIN, *MODEL, "train.epochs=2", "train.checkpoint_every=1"]
    finish([*common, f"out_dir={tmp_path / 'straight'}"], cwd=EXAMPLE)
    proc = run_until([*common, f"out_dir={tmp_path / 'killed'}"], tmp_path / "killed", 6, cwd=EXAMPLE)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert newest_step(tmp_path / "killed") < 16
    finish([*common, f"out_dir={tmp_path / 'killed'}", "train.resume=auto"], cwd=EXAMPLE)
    assert_same_weights(final_weights(tmp_path / "killed"), final_weights(tmp_path / "straight"))


@pytest.mark.slow
def test_two_processes_train_what_one_trains(tmp_path):
    out = tmp_path / "lc"
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--config", "mnist", "--nproc", "2", "--steps", "6",
           "--assert-equal", "--out", str(out), "--timeout", "300", *TINY, *MODEL]
    proc = subprocess.run(cmd, cwd=EXAMPLE, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_wandb_offline_run_of_the_example(tmp_path, on_path):
    from wandb_records import run_contents

    offline_runs = lambda: set(Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*"))  # noqa: E731
    before = offline_runs()
    train(tiny_config(tmp_path / "run", *MODEL, "train.max_steps=4", "logger=wandb"))
    (run,) = offline_runs() - before
    got = run_contents(run)
    assert got["config"]["model.name"] == "my_vae:MLPVAE" and got["config"]["model.kwargs"] == {"hidden": 64}
    assert any("train/loss" in h for h in got["history"])


BAD_MODELS = '''
import torch
from torch import nn
import fastvae
from my_vae import MLPVAE


class NotAVAE(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()


class UnequalShapes(MLPVAE):
    def encode(self, x):
        mu, logvar = super().encode(x)
        return mu, logvar[:, :1]


class WrongDecoderShape(MLPVAE):
    def decode(self, z):
        return super().decode(z)[:, :, :14]


class OneOutput(MLPVAE):
    def encode(self, x):
        return super().encode(x)[0]


class FailsOnTheSize(fastvae.VAE):
    def __init__(self, latent_dim):
        super().__init__()
        self.to_mu, self.to_logvar = nn.Linear(100, latent_dim), nn.Linear(100, latent_dim)

    def encode(self, x):
        return self.to_mu(x.flatten(1)), self.to_logvar(x.flatten(1))
'''

BAD = {
    "module not importable": ("no_such_module:MyVAE", "module 'no_such_module' cannot be imported"),
    "class missing": ("bad_models:Missing", "module 'bad_models' has no 'Missing'"),
    "not a fastvae.VAE": ("bad_models:NotAVAE", "NotAVAE is not a subclass of fastvae.VAE"),
    "kwargs rejected": ("my_vae:MLPVAE", "the constructor rejected"),
    "mu and logvar differ": ("bad_models:UnequalShapes", "encode gave mu (2, 8) and logvar (2, 1)"),
    "decoder shape": ("bad_models:WrongDecoderShape", "decode gave (2, 1, 14, 28) for 2 images of 1x28x28"),
    "encode gives one tensor": ("bad_models:OneOutput", "encode returned Tensor; expected a pair (mu, logvar)"),
    "a layer fails on the size": ("bad_models:FailsOnTheSize", "failed on 2 images of 1x28x28 (RuntimeError: "),
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_model_is_one_line_exit_2_and_writes_nothing(case, tmp_path, on_path, monkeypatch, capsys):
    (tmp_path / "bad_models.py").write_text(BAD_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    name, message = BAD[case]
    extra = ["model.kwargs.width=3"] if case == "kwargs rejected" else []
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["--config", "mnist", *TINY, f"model.name={name}", "model.latent_dim=8", *extra, f"out_dir={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    sys.modules.pop("bad_models", None)
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("fastvae: error: "), err
    assert message in err[0], err[0]
    assert not out.exists()


def test_a_checkpoint_from_before_model_kwargs_loads_and_resumes(tmp_path):
    """Checkpoints of 875e167 hold no model.kwargs: they load and resume as before."""
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=3"))
    meta_path = list_checkpoints(out)[-1] / "fastvae.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["model"]["kwargs"]
    meta_path.write_text(json.dumps(meta))
    from fastvae.loading import load

    assert type(load(meta_path.parent, "cpu").model).__name__ == "ConvVAE"
    assert train(tiny_config(out, "train.max_steps=5", "train.resume=auto"))["step"] == 5
