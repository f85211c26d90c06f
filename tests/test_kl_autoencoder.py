"""The latent-diffusion KL autoencoder (fastvae/models/kl_autoencoder.py) trained end to end: diffusers'
format in and out, the discriminator and EMA in checkpoints and exact on resume and on 2 processes, bad
input in one line. (Its loss: tests/test_objectives_ldm.py; the critic, LPIPS: their own test files.)"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from fastvae import losses
from fastvae.checkpoint import list_checkpoints
from fastvae.loading import load
from fastvae.config import load_config
from fastvae.errors import UserError
from fastvae.train import main as train_main, train
from fastvae.run_setup import reset_accelerate_state
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config
from kl_runs import KL_MODEL, kl_overrides, lpips_weights
from shared import built_once

pytest.importorskip("diffusers")


# ---------------------------------------------------------------- the loss, against LDM's own arithmetic


# ---------------------------------------------------------------- the model and diffusers' format


def test_the_model_is_diffusers_autoencoderkl_with_a_flattened_spatial_latent():
    from diffusers import AutoencoderKL

    from fastvae.models import build_model

    model = build_model(load_config("mnist", KL_MODEL)).eval()
    assert model.latent_shape == (2, 14, 14) and model.latent_dim == 392
    reference = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                              up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                              norm_num_groups=4, latent_channels=2)
    reference.load_state_dict(model.vae.state_dict())
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        posterior = reference.encode(x * 2 - 1).latent_dist
        assert torch.equal(mu, posterior.mean.flatten(1)) and torch.equal(logvar, posterior.logvar.flatten(1))
        # (float32 rounding: the latent arrives flattened and reshaped, not as the moments' strided slice)
        torch.testing.assert_close(model.decode(mu), reference.decode(posterior.mean).sample, rtol=1e-4, atol=1e-5)
        # the fastvae ELBO's closed-form KL is diffusers' posterior.kl(), per image
        _, _, _, kl = model(x)
        torch.testing.assert_close(losses.kl_divergence(mu, logvar), posterior.kl(), rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def kl_run(tmp_path_factory):
    """4 steps without the discriminator, 2 with it, an EMA of the weights (trained once per session)."""
    def build(folder):
        train(tiny_config(folder / "run", *kl_overrides(tmp_path_factory, "train.max_steps=6", "train.ema_decay=0.9",
                                                        "train.log_every=1")))
        reset_accelerate_state()

    return list_checkpoints(built_once(tmp_path_factory, "kl_tiny_run", build) / "run")[-1]


def test_a_run_logs_ldms_terms_and_checkpoints_both_networks_and_the_ema(kl_run):
    from fastvae.tracking import STEPS_FILE, read_records

    names = {p.name for p in kl_run.iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer_1.bin", "ema.safetensors"} <= names
    meta = json.loads((kl_run / "fastvae.json").read_text())
    assert meta["ema_updates"] == 6 and meta["config"]["model"]["name"] == "kl_autoencoder"
    steps = {r["step"]: r for r in read_records(kl_run.parent.parent, STEPS_FILE)}
    assert "d_loss" not in steps[2] and {"nll", "lpips", "logvar", "pixel"} <= set(steps[2])  # disc_start=2: the
    # third step (state.step 2 when it starts) is the first with the critic
    assert {"d_loss", "g_loss", "d_weight", "logits_real", "logits_fake"} <= set(steps[6])


def test_the_ema_is_litemas_and_loads_unless_asked_not_to(kl_run):
    from safetensors.torch import load_file

    from fastvae.ema import EMA

    model = nn.Linear(2, 1)
    ema = EMA(model, 0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight += 1.0
    ema.update(model)  # LitEma: n = 1, decay min(0.9, 2 / 11)
    torch.testing.assert_close(ema.shadow[0], start - (1 - 2 / 11) * (start - model.weight))
    averaged = load_file(str(kl_run / "ema.safetensors"))
    with_ema, without = load(kl_run, "cpu"), load(kl_run, "cpu", ema=False)
    name = "vae.decoder.conv_out.weight"
    assert torch.equal(dict(with_ema.model.named_parameters())[name], averaged[name])
    assert not torch.equal(dict(without.model.named_parameters())[name], averaged[name])


def test_generate_and_evaluate_work_on_the_autoencoder(kl_run, tmp_path):
    from fastvae.evaluate import main as evaluate_main
    from fastvae.generate import main as generate_main

    for command in (["reconstruct", "--n", "4"], ["interpolate", "--indices", "0", "1", "--steps", "3"],
                    ["sample", "--n", "4"]):
        assert all(p.is_file() for p in generate_main([*command, "--checkpoint", str(kl_run), "--out", str(tmp_path)]))
    report = evaluate_main(["--checkpoint", str(kl_run), "--max-images", "8", "--json", str(tmp_path / "e.json"),
                            "--ssim", "--lpips"])  # LPIPS with the run's loss.lpips_weights
    assert report["latent_dim"] == 392 and report["likelihood"] == "mse" and 0 < report["psnr_db"] < 60
    assert -1 < report["ssim"] < 1 and report["lpips"] > 0


def diffusers_folder(path, **config):
    from diffusers import AutoencoderKL

    torch.manual_seed(7)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), norm_num_groups=4,
                        latent_channels=2, **config)
    vae.save_pretrained(str(path), safe_serialization=True)
    return vae


def test_fine_tuning_from_a_diffusers_folder_then_exporting_round_trips(tmp_path, tmp_path_factory):
    """Start from a local diffusers folder (architecture read from its config.json, weights from its
    safetensors), fine-tune the decoder alone, export, and diffusers' from_pretrained reconstructs as
    fastvae's evaluation of it does."""
    from diffusers import AutoencoderKL

    from fastvae.export import main as export_main
    from fastvae.sampling import reconstruct_images
    from fastvae.trainer import Trainer

    start = diffusers_folder(tmp_path / "sd-vae", scaling_factor=0.5)
    overrides = [*kl_overrides(tmp_path_factory, "train.max_steps=3"), f"model.pretrained={tmp_path / 'sd-vae'}",
                 "model.train_decoder_only=true", "model.kwargs={}", "disc.weight=0", "disc.start=0"]
    trainer = Trainer(tiny_config(tmp_path / "ft", *overrides))
    assert trainer.cfg.model.kwargs["block_out_channels"] == [8, 16] and trainer.cfg.model.kwargs["scaling_factor"] == 0.5
    assert_same_weights(trainer.raw_model.vae.state_dict(), start.state_dict())  # the folder's weights to start
    trainer.fit()
    reset_accelerate_state()
    tuned = final_weights(tmp_path / "ft")
    assert torch.equal(tuned["vae.encoder.conv_in.weight"], start.state_dict()["encoder.conv_in.weight"])
    assert not torch.equal(tuned["vae.decoder.conv_out.weight"], start.state_dict()["decoder.conv_out.weight"])
    ckpt = list_checkpoints(tmp_path / "ft")[-1]
    export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "exported")])
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == ["config.json",
                                                                       "diffusion_pytorch_model.safetensors"]
    theirs = AutoencoderKL.from_pretrained(str(tmp_path / "exported"))
    ours = load(ckpt, "cpu")
    x = torch.stack([ours.split("test")[i][0] for i in range(6)])
    with torch.no_grad():
        by_fastvae = reconstruct_images(ours.model, x)  # z = mu, images as fastvae's evaluation draws them
        by_diffusers = (theirs.decode(theirs.encode(x * 2 - 1).latent_dist.mode()).sample.clamp(-1, 1) + 1) / 2
    assert (by_fastvae - by_diffusers).abs().max() < 1e-5  # measured: ~1e-6 (float32 rounding)
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["scaling_factor"] == 0.5
    # resuming needs no folder: the checkpoint records the architecture and holds the weights
    shutil.rmtree(tmp_path / "sd-vae")
    resumed = train(tiny_config(tmp_path / "ft", *overrides, "train.resume=auto", "train.max_steps=4"))
    assert resumed["step"] == 4


class WritesAFileWhenUnpickled:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def bad_folder(tmp_path, case: str):
    folder = tmp_path / "folder"
    diffusers_folder(folder)
    if case == "only a pickle":
        (folder / "diffusion_pytorch_model.safetensors").unlink()
        (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(WritesAFileWhenUnpickled(tmp_path / "ran")))
    elif case == "another class":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DModel"}))
    elif case == "in_channels as text":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "in_channels": "1"}))
    elif case == "a tensor of another shape":
        from safetensors.torch import load_file, save_file

        weights = folder / "diffusion_pytorch_model.safetensors"
        state = load_file(str(weights))
        state["decoder.conv_out.weight"] = torch.zeros(1, 2, 3, 3)
        save_file(state, str(weights))
    elif case == "a NaN scaling factor":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "scaling_factor": float("nan")}))
    return folder


def bad_lpips(tmp_path, tmp_path_factory, case: str) -> None:
    """tmp/CASE.pth: the backbone file with NaN weights, int64 weights, or an int where a tensor belongs."""
    state = torch.load(lpips_weights(tmp_path_factory), weights_only=True)
    first = "features.0.weight"
    state[first] = {"nan": state[first] * float("nan"), "int64": state[first].long(), "intdict": 3}[case]
    torch.save(state, tmp_path / f"{case}.pth")


@pytest.mark.parametrize("case, overrides, message", [
    ("only a pickle", ["model.pretrained={folder}"],
     "has no diffusion_pytorch_model.safetensors (only the pickle diffusion_pytorch_model.bin, which is never read"),
    ("another class", ["model.pretrained={folder}"], "holds a 'UNet2DModel'; expected an AutoencoderKL folder"),
    ("", ["model.pretrained={tmp}/nowhere"], "/nowhere' not found; expected a diffusers AutoencoderKL folder"),
    ("a NaN scaling factor", ["model.pretrained={folder}"], "config.json': scaling_factor is not a finite number"),
    ("", ["loss.logvar_init=1e30"], "config key 'loss.logvar_init': expected a value < 30"),
    ("", ["model.kwargs.norm_num_groups=0"], "norm_num_groups 0: expected a positive integer"),
    ("", ["model.kwargs.block_out_channels='32,64'"], "block_out_channels '32,64': expected a list of 1 to 8"),
    ("in_channels as text", ["model.pretrained={folder}"], "in_channels is '1' (str); expected an integer"),
    ("a tensor of another shape", ["model.pretrained={folder}"], "decoder.conv_out.weight is [1, 2, 3, 3], the "
                                                                  "configured AutoencoderKL has"),
    ("nan", ["loss.lpips_weights={tmp}/nan.pth"], "features.0.weight holds torch.float32 values that are not all"),
    ("int64", ["loss.lpips_weights={tmp}/int64.pth"], "features.0.weight holds torch.int64 values"),
    ("intdict", ["loss.lpips_weights={tmp}/intdict.pth"], "has no features.0.weight of the vgg backbone's shape"),
    ("", ["loss.lpips_weights={tmp}/none.pth"], "LPIPS's vgg backbone weights not found: expected '"),
    ("", ["model.kwargs.block_out_channels=[8, 16, 16, 16]"], "data.image_size 28x28 is not divisible by the "
                                                               "autoencoder's factor 8"),
    ("", ["model.train_decoder_only=true"], "'model.train_decoder_only': fine-tuning the decoder alone keeps an"),
    ("", ["disc.weight=0"], "'disc.start': 2 starts a discriminator that does not exist"),
    ("", ["loss.lpips_weights={tmp}/pickled.pth"], "LPIPS backbone file '"),
    ("", ["disc.layers=5"], "'disc.layers': a 64-channel PatchGAN cannot take 28x28 images"),
])
def test_bad_autoencoder_input_is_one_line_and_runs_nothing(case, overrides, message, tmp_path, tmp_path_factory,
                                                            capsys):
    if case in ("nan", "int64", "intdict"):
        bad_lpips(tmp_path, tmp_path_factory, case)
    folder = bad_folder(tmp_path, case) if case and case not in ("nan", "int64", "intdict") else tmp_path
    (tmp_path / "pickled.pth").write_bytes(pickle.dumps(WritesAFileWhenUnpickled(tmp_path / "ran")))
    given = [o.format(folder=folder, tmp=tmp_path) for o in overrides]
    if "model.pretrained" in given[0]:
        given.append("model.kwargs={}")
    with pytest.raises(SystemExit) as exc:
        train_main(["--config", "mnist", *TINY, *kl_overrides(tmp_path_factory), *given, "train.max_steps=1",
                    f"out_dir={tmp_path / 'run'}"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastvae: ")]
    assert exc.value.code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------- exact: resume, and N processes with the critic


def test_resume_with_both_optimizers_the_discriminator_and_the_ema_is_bit_identical(tmp_path, tmp_path_factory):
    """With LeCam on (its moving averages are the discriminator's buffers, in model_1.safetensors)."""
    common = [*kl_overrides(tmp_path_factory, "train.ema_decay=0.99", "train.checkpoint_every=1"), "train.epochs=1",
              "data.limit=96", "disc.lecam_weight=0.01"]
    train(tiny_config(tmp_path / "straight", *common))
    train(tiny_config(tmp_path / "stopped", *common, "train.max_steps=4"))  # stops once the critic has trained
    train(tiny_config(tmp_path / "stopped", *common, "train.resume=auto"))
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        from safetensors.torch import load_file

        a, b = (load_file(str(list_checkpoints(tmp_path / run)[-1] / name)) for run in ("stopped", "straight"))
        assert_same_weights(a, b)
        assert name != "model_1.safetensors" or a["lecam_ema"].abs().sum() > 0


@pytest.mark.slow
def test_two_processes_train_the_autoencoder_one_trains_with_the_discriminator(tmp_path, tmp_path_factory):
    """1 x 16 vs 2 x 8 through tools/loss_compare.py --assert-equal: the critic active from step 2 (its
    batch statistics synchronized, the adaptive weight from global gradient norms), and the EMA."""
    out = tmp_path / "lc"
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--config", "mnist", "--nproc", "2", "--steps", "5",
           "--out", str(out), "--json", str(out) + ".json", "--assert-equal", "--timeout", "300", *TINY,
           *kl_overrides(tmp_path_factory, "train.ema_decay=0.99")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=700,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "lc.json").read_text())
    assert result["max_loss_rel_diff"] < 1e-4 and [r["step"] for r in result["steps"]] == list(range(1, 6))


def test_gradient_checkpointing_trains_the_same_weights(tmp_path, tmp_path_factory):
    """diffusers' own switch (train.gradient_checkpointing): activations recomputed in the backward pass,
    the same step."""
    common = [*kl_overrides(tmp_path_factory, "train.max_steps=3"), "disc.weight=0", "disc.start=0"]
    train(tiny_config(tmp_path / "plain", *common))
    train(tiny_config(tmp_path / "checkpointed", *common, "train.gradient_checkpointing=true"))
    for name, value in final_weights(tmp_path / "plain").items():
        torch.testing.assert_close(final_weights(tmp_path / "checkpointed")[name], value, rtol=1e-5, atol=1e-6)


def test_the_shipped_configs_build_their_models_and_the_cpu_one_trains(tmp_path, tmp_path_factory):
    """configs/kl_autoencoder.yaml trains as shipped (two steps of it); kl_f8 / kl_f8_16ch are LDM's and
    Flux's sizes (counted on the meta device: 83.7M parameters, the REFERENCES figure for kl-f8)."""
    from fastvae.sizes import estimate

    assert round(estimate(load_config("kl_f8", ["data.root=x"]), trace=False).parameters / 1e6, 1) == 83.7
    assert round(estimate(load_config("kl_f8_16ch", ["data.root=x"]), trace=False).parameters / 1e6, 1) == 83.8
    # its model, loss and optimizer as shipped; MNIST's 500 test images instead of Fashion-MNIST's 10,000
    # (the end-of-run pictures encode up to 5,000 of them: 20 s here for nothing this test checks)
    result = train(load_config("kl_autoencoder", [f"loss.lpips_weights={lpips_weights(tmp_path_factory)}",
                                                  "data.name=mnist", "data.limit=64", "train.max_steps=2",
                                                  "train.samples=4", f"out_dir={tmp_path / 'run'}"]))
    assert result["step"] == 2


def test_export_writes_with_the_users_umask_and_a_stopped_export_leaves_nothing(kl_run, tmp_path, monkeypatch,
                                                                                  capsys):
    import fastvae.models.kl_autoencoder as kl_module
    from fastvae.export import main as export_main

    ckpt = kl_run
    old = os.umask(0o022)
    try:
        out = export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "shared")])
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755 and (out / "config.json").stat().st_mode & 0o777 == 0o644

    def interrupted(model, folder):  # SIGTERM and Ctrl-C arrive as KeyboardInterrupt mid-write
        (folder / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(kl_module, "export_diffusers", interrupted)
    with pytest.raises(SystemExit, match="export stopped"):
        export_main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "stopped")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"]  # no hidden temporary folder, no --out


def test_a_pretrained_folders_architecture_wins_over_a_config_file_but_not_over_the_command_line(tmp_path, capsys):
    """`--config kl_f8`-style: the file's model.kwargs give way to the folder's (said in one line); a
    key typed on the command line that differs from the folder is refused, naming it."""
    from fastvae.models import resolve_pretrained

    folder = tmp_path / "folder"
    diffusers_folder(folder)  # 8 / 16 channels, 4 groups, 2 latent channels
    config = tmp_path / "big.yaml"
    config.write_text("model:\n  name: kl_autoencoder\n  kwargs: {block_out_channels: [32, 64], norm_num_groups: 32}\n")
    cfg = load_config(config, [f"model.pretrained={folder}"])
    resolve_pretrained(cfg)
    assert (cfg.model.kwargs["block_out_channels"], cfg.model.kwargs["norm_num_groups"]) == ([8, 16], 4)
    assert "model.pretrained's architecture replaces the config file's model.kwargs: block_out_channels=[8, 16]" \
        in capsys.readouterr().out
    typed = load_config(config, [f"model.pretrained={folder}", "model.kwargs.block_out_channels=[32, 64]"])
    with pytest.raises(UserError, match="config key 'model.kwargs.block_out_channels': \\[32, 64\\], but"):
        resolve_pretrained(typed)


@pytest.mark.slow
def test_a_compiled_adversarial_step_trains_what_the_eager_one_trains(tmp_path, tmp_path_factory, monkeypatch):
    """train.compile=true with the discriminator active from step 0: LPIPS's and the discriminator's
    backward once each (autograd.grad calls are graph breaks), the last layer a graph of its own (its
    weight's gradients, asked twice, run its backward alone); the same losses as the eager step. Through
    AOT autograd without Inductor's C++ (aot_eager: the same graphs and compiled backward, minutes less)."""
    from fastvae.tracking import STEPS_FILE, read_records

    compile_module = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_module(self, backend="aot_eager"))

    # without LPIPS (loss.perceptual_weight=0: the same graph breaks, a fraction of the compile time)
    common = [*kl_overrides(tmp_path_factory, "train.max_steps=2"), "disc.start=0", "train.log_every=1",
              "loss.perceptual_weight=0"]
    train(tiny_config(tmp_path / "eager", *common))
    train(tiny_config(tmp_path / "compiled", *common, "train.compile=true"))
    eager, compiled = read_records(tmp_path / "eager", STEPS_FILE), read_records(tmp_path / "compiled", STEPS_FILE)
    assert len(eager) == len(compiled) == 2 and all("d_weight" in r for r in compiled)
    # the first step from the same weights: float rounding only (AOT's decompositions); after an Adam step
    # a little more (the adaptive weight is a ratio of gradient norms)
    for e, c, rel in zip(eager, compiled, (1e-5, 1e-3)):
        for key in ("loss", "nll", "g_loss", "d_weight", "d_loss"):
            assert c[key] == pytest.approx(e[key], rel=rel, abs=1e-6), (key, e, c)
    # (under bf16 autocast: tests/test_objectives_ldm.py::test_the_one_backward_way_compiles_under_autocast)
