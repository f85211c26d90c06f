"""fastvae/sizes.py: what a run will allocate, estimated before anything is, and refused in one line
naming the key when it cannot fit (from the command line or from a checkpoint's fastvae.json)."""

import json
import resource
import shutil
import subprocess

import pytest
import torch

import fastvae.sizes as sizes
from fastvae.checkpoint import list_checkpoints
from fastvae.config import load_config
from fastvae.errors import exit_on_user_error
from fastvae.evaluate import main as evaluate_main
from fastvae.train import main as train_main, train
from fastvae.run_setup import reset_accelerate_state
from helpers import ROOT, TINY, tiny_config
from shared import built_once

SIX_GB = 6 * 10**9


@pytest.fixture
def six_gb_free(monkeypatch):
    """The machine of the probe that found these: 6 GB this process may still allocate."""
    monkeypatch.setattr(sizes, "memory_free", lambda device: (SIX_GB, "available on this machine"))


def one_line(capsys, call) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        call()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
    assert len(err) == 1, err
    return exc.value.code, err[0]


def test_the_estimate_counts_parameters_and_activations():
    found = sizes.estimate(load_config("mnist", []))
    model = __import__("fastvae.models", fromlist=["build_model"]).build_model(load_config("mnist", []))
    assert found.parameters == sum(p.numel() for p in model.parameters())
    # at least the encoder's and decoder's largest feature maps of one image, far below a megapixel's worth
    assert 4 * 28 * 28 * 32 < found.activation_bytes_per_image < 4 * 10**6


@pytest.mark.parametrize("overrides, key", [
    (["model.latent_dim=1000000000"], "config key 'model.latent_dim' (1000000000)"),
    (["loss.objective=iwae", "loss.samples=10000", "data.batch_size=8"], "config key 'loss.samples' (10000)"),
    (["data.name=imagefolder", "data.root=/nowhere", "data.channels=3", "data.image_size=[100000,100000]"],
     "config key 'data.image_size' (100000)"),
    (["model.name=vq_autoencoder", "loss.recon=mse", "quantizer.kind=vq", "quantizer.codebook_size=100000000",
      "model.kwargs={block_out_channels: [8, 16], norm_num_groups: 4, latent_channels: 4}"],
     "config key 'quantizer.codebook_size' (100000000)"),  # 6.4 GB: a tokenizer's encoder gives z_e, not (mu, logvar)
])
def test_a_run_too_big_for_the_machine_is_refused_before_anything_is_built(overrides, key, six_gb_free, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    code, line = one_line(capsys, lambda: train_main(["--config", "mnist", *TINY, *overrides, f"out_dir={out}"]))
    assert code == 2 and line.startswith(f"fastvae: error: {key}: this training run needs about "), line
    assert "GB are available on this machine; expected a smaller" in line and not out.exists()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    def build(folder):
        train(tiny_config(folder / "run", "train.max_steps=2"))
        reset_accelerate_state()

    return list_checkpoints(built_once(tmp_path_factory, "tiny_2_steps", build) / "run")[-1]


def asking(tiny_run, tmp_path, change) -> str:
    out = tmp_path / "run"
    shutil.copytree(tiny_run.parent.parent, out)
    ckpt = list_checkpoints(out)[-1]
    meta = json.loads((ckpt / "fastvae.json").read_text())
    change(meta["config"])
    (ckpt / "fastvae.json").write_text(json.dumps(meta))
    return str(ckpt)


HOSTILE = {
    "model.condition_names": lambda c: c["model"].update(condition="labels",
                                                        condition_names=[f"c{i}" for i in range(10**6)]),
    "model.latent_dim": lambda c: c["model"].update(latent_dim=10**9),
    "data.image_size": lambda c: c["data"].update(image_size=[100000, 100000], name="imagefolder", root="/x"),
}


@pytest.mark.parametrize("key", HOSTILE)
def test_a_checkpoint_asking_for_too_much_is_refused_before_allocating(key, tiny_run, six_gb_free, tmp_path, capsys):
    ckpt = asking(tiny_run, tmp_path, HOSTILE[key])
    code, line = one_line(capsys, lambda: evaluate_main(["--checkpoint", ckpt, "--max-images", "4"]))
    assert code == 2 and line.startswith(f"fastvae: error: config key '{key}'"), line
    assert "this model needs about" in line


def test_under_a_real_address_space_limit_the_refusal_is_one_line(tiny_run, tmp_path, python):
    """What the probe ran: a 10^6-class fastvae.json under ulimit -v (here 8 GB, torch maps ~3.3 GB)."""
    ckpt = asking(tiny_run, tmp_path, HOSTILE["model.condition_names"])
    limit = 8 * 10**9
    proc = subprocess.run([python, "-m", "fastvae.evaluate", "--checkpoint", ckpt, "--max-images", "4"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [line for line in proc.stderr.strip().splitlines()
                                                if line.startswith("fastvae: error: config key 'model.condition_names'")]
    assert "left under the address-space limit (ulimit -v)" in proc.stderr


def test_an_allocation_that_still_fails_is_one_line(monkeypatch, tmp_path, capsys):
    import fastvae.trainer as trainer

    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(trainer.Trainer, "train_step", no_memory)
    code, line = one_line(capsys, lambda: exit_on_user_error(train)(tiny_config(tmp_path / "run",
                                                                               "train.max_steps=2")))
    assert code == 6 and line.startswith("fastvae: error: out of memory (DefaultCPUAllocator: can't allocate")


def test_an_unrelated_runtime_error_is_not_called_out_of_memory(monkeypatch, tmp_path):
    import fastvae.trainer as trainer

    monkeypatch.setattr(trainer.Trainer, "train_step", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("shape")))
    with pytest.raises(RuntimeError, match="shape"):
        exit_on_user_error(train)(tiny_config(tmp_path / "run", "train.max_steps=2"))
