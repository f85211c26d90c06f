"""The tokenizer model (fastvae/models/vq_autoencoder.py) trained end to end: its quantizer's state
(codebook, EMA sums, usage window, restart generator) resumes exactly and is what one process holds on
2 processes; evaluation and pictures work on its discrete latent; bad settings are one line."""

import json
import subprocess
import sys

import pytest
import torch

from fastvae.config import load_config
from fastvae.errors import UserError
from fastvae.tracking import read_records
from fastvae.train import train
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config

pytest.importorskip("diffusers")

TOKENIZER = ["model.name=vq_autoencoder", "loss.recon=mse",
             "model.kwargs={block_out_channels: [8, 16], norm_num_groups: 4, latent_channels: 4, "
             "mid_block_add_attention: false}"]
QUANTIZERS = {
    "vq_l2_lowdim_ema_restart": ["quantizer.kind=vq", "quantizer.codebook_size=64", "quantizer.code_dim=2",
                                 "quantizer.l2=true", "quantizer.ema_decay=0.9", "quantizer.restart_after=2"],
    "fsq": ["quantizer.kind=fsq", "quantizer.levels=[5, 5, 3, 3]"],
    "lfq": ["quantizer.kind=lfq", "quantizer.entropy_weight=0.1", "quantizer.temperature=0.5"],
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_a_tokenizer_trains_logs_its_codes_and_resumes_exactly(tmp_path, name):
    """An epoch of 8 steps straight vs stopped at step 5 and resumed: the same weights and codebook state,
    bit for bit (the state is the model's: model.safetensors); the epoch row carries usage and perplexity."""
    common = [*TOKENIZER, *QUANTIZERS[name], "train.epochs=1"]
    train(tiny_config(tmp_path / "straight", *common))
    train(tiny_config(tmp_path / "stopped", *common, "train.max_steps=5"))
    train(tiny_config(tmp_path / "stopped", *common, "train.resume=auto"))
    straight = final_weights(tmp_path / "straight")
    assert_same_weights(final_weights(tmp_path / "stopped"), straight)
    assert any(key.startswith("quantizer.") for key in straight) or name in ("fsq", "lfq")  # (no state)
    record = read_records(tmp_path / "straight")[-1]
    assert 0 < record["usage"] <= 1 and record["perplexity"] >= 1 and record["test_kl"] == 0.0
    assert (tmp_path / "straight" / "samples.png").is_file() and (tmp_path / "straight" / "reconstructions.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("name, steps", [("vq_l2_lowdim_ema_restart", 2), ("lfq", 3)])
def test_two_processes_train_the_tokenizer_one_process_trains(tmp_path, name, steps):
    """EMA + restart (candidates from the gathered global batch, a restart at step 2) and LFQ's batch
    entropy through the whole training path: 2 x 16 equals 1 x 32 (losses, final weights, codebook and
    EMA sums, loss_compare). The VQ run stops at 2 steps: after that, float32 rounding that Adam has
    amplified in the weights flips a nearest code now and then (a whole vector moves between two EMA
    sums); the exact check of every state update is tests/test_quantizers.py's, in float64."""
    out = tmp_path / "lc"
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--config", "mnist", "--nproc", "2", "--steps",
           str(steps),
           "--assert-equal", "--out", str(out), "--timeout", "300", *TINY, *TOKENIZER, *QUANTIZERS[name]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "2x16" / "summary.json").read_text())
    assert summary["ranks_agree"] is True


@pytest.mark.parametrize("overrides, message", [
    (["model.name=vq_autoencoder"], "'quantizer.kind': model.name=vq_autoencoder is a tokenizer"),
    (["quantizer.kind=vq"], "'quantizer.kind': conv_vae has a Gaussian latent"),
    ([*TOKENIZER, "quantizer.kind=vq", "quantizer.codebook_size=1"], "codebook_size 1: expected at least 2 codes"),
    ([*TOKENIZER, "quantizer.kind=fsq", "quantizer.levels=[8, 1, 5, 5]"], "each at least 2"),
    ([*TOKENIZER, "quantizer.kind=vq", "quantizer.code_dim=9"], "code_dim 9: expected 1 to the latent's 4"),
    ([*TOKENIZER, "quantizer.kind=lfq", "quantizer.entropy_weight=-1"], "'quantizer.entropy_weight': expected a "
                                                                         "value >= 0"),
])
def test_bad_tokenizer_settings_are_one_line(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        train(load_config("mnist", [*TINY, *overrides, "train.max_steps=1", f"out_dir={tmp_path / 'run'}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
    """A tiny VQ tokenizer, trained once per session."""
    from fastvae.checkpoint import list_checkpoints
    from fastvae.run_setup import reset_accelerate_state
    from shared import built_once

    def build(folder):
        train(tiny_config(folder / "run", *TOKENIZER, *QUANTIZERS["vq_l2_lowdim_ema_restart"], "train.max_steps=3"))
        reset_accelerate_state()

    return list_checkpoints(built_once(tmp_path_factory, "vq_tiny_run", build) / "run")[-1]


def test_tokenize_writes_shards_two_processes_write_the_same_and_decode_draws_them(vq_run, tmp_path, capsys):
    """fastvae tokenize: indices in the smallest type (64 codes: uint8) with each image's index, in
    shards; under accelerate launch on 2 processes the files are byte for byte one process's; `generate
    decode --tokens` draws them back as the reconstructions; a file that does not fit is one line."""
    from safetensors.torch import load_file, save_file

    from fastvae.generate import main as generate
    from fastvae.launch.processes import accelerate_launch

    args = ["--checkpoint", str(vq_run), "--split", "test", "--max-images", "25", "--shard-size", "10"]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}  # one thread each: the same float rounding
    one = subprocess.run([sys.executable, "-m", "fastvae.tokenize", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-2000:]
    manifest = json.loads((tmp_path / "one" / "tokens.json").read_text())
    assert manifest["files"] == [f"tokens-0000{k}.safetensors" for k in range(3)] and manifest["codebook_size"] == 64
    shard = load_file(str(tmp_path / "one" / "tokens-00002.safetensors"))
    assert shard["indices"].dtype == torch.uint8 and shard["indices"].shape == (5, 14, 14)
    assert shard["image_index"].tolist() == list(range(20, 25))
    proc = subprocess.run(accelerate_launch(["-m", "fastvae.tokenize", *args, "--out", str(tmp_path / "two")], 2),
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in manifest["files"]:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    written = generate(["decode", "--checkpoint", str(vq_run), "--tokens", str(tmp_path / "one" / "tokens-00000.safetensors"),
                        "--n", "4", "--out", str(tmp_path / "pictures")])
    assert written[0].name == "decoded_tokens.png" and written[0].is_file()
    bad = tmp_path / "bad.safetensors"
    save_file({"indices": torch.full((2, 14, 14), 64, dtype=torch.int32)}, str(bad))
    with pytest.raises(SystemExit) as exc:
        generate(["decode", "--checkpoint", str(vq_run), "--tokens", str(bad), "--out", str(tmp_path / "p2")])
    assert exc.value.code == 2 and "holds index 64; expected 0 to 63" in capsys.readouterr().err


@pytest.mark.slow
def test_the_fused_lookup_trains_what_the_eager_lookup_trains(tmp_path):
    """train.ops=triton puts fastvae.kernels' nearest-code op in the quantizer (the interpreter here): the
    same steps as eager up to float rounding, for a learned codebook (its gradient is the op's backward)."""
    from fastvae.tracking import STEPS_FILE

    common = [*TOKENIZER, "quantizer.kind=vq", "quantizer.codebook_size=64", "train.max_steps=3", "train.log_every=1"]
    for ops in ("eager", "triton"):
        train(tiny_config(tmp_path / ops, *common, f"train.ops={ops}"))
    eager, fused = read_records(tmp_path / "eager", STEPS_FILE), read_records(tmp_path / "triton", STEPS_FILE)
    assert len(eager) == len(fused) == 3
    for e, f in zip(eager, fused):
        for key in ("loss", "recon", "usage", "perplexity"):
            assert f[key] == pytest.approx(e[key], rel=1e-4), key


def test_a_plain_vq_tokenizer_exports_to_diffusers_vqmodel_and_starts_a_run_from_one(tmp_path, capsys):
    """fastvae export writes a VQModel folder (safetensors) whose from_pretrained model reconstructs as the
    checkpoint does (eval: the same codes and pixels); model.pretrained=that folder rebuilds the
    architecture (an embed_dim other than latent_channels too) and its weights and codebook; FSQ / l2 VQ
    tokenizers are one line."""
    from diffusers import VQModel

    from fastvae.checkpoint import list_checkpoints
    from fastvae.export import main as export
    from fastvae.loading import load
    from fastvae.models import build_model
    from fastvae.models import resolve_pretrained

    common = [*TOKENIZER, "quantizer.kind=vq", "quantizer.codebook_size=32", "model.kwargs.embed_dim=3",
              "train.max_steps=2"]
    train(tiny_config(tmp_path / "run", *common))
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    export(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "vqmodel"), "--no-ema"])
    assert "VQModel.from_pretrained" in capsys.readouterr().out
    theirs = VQModel.from_pretrained(str(tmp_path / "vqmodel")).eval()
    ours = load(checkpoint, "cpu", ema=False).model.eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latent = ours.quantizer(ours.encode(x))
        torch.testing.assert_close(theirs(x * 2 - 1).sample, ours.decode(latent.z), rtol=1e-4, atol=1e-5)
        _, _, (_, _, indices) = theirs.quantize(theirs.quant_conv(theirs.encoder(x * 2 - 1)))
        assert torch.equal(indices.flatten(), latent.posterior.flatten())

    cfg = tiny_config(tmp_path / "fine_tune", *TOKENIZER, "quantizer.kind=vq", f"model.pretrained={tmp_path / 'vqmodel'}")
    resolve_pretrained(cfg)
    assert cfg.model.kwargs["embed_dim"] == 3 and cfg.quantizer.codebook_size == 32
    model = build_model(cfg)
    from fastvae.models import load_pretrained

    load_pretrained(model, cfg.model.pretrained)
    for name, value in ours.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.", "post_quant_conv.", "decoder.", "quantizer.codebook")):
            assert torch.equal(model.state_dict()[name], value), name
    assert train(tiny_config(tmp_path / "fine_tune", *TOKENIZER, "quantizer.kind=vq", "train.max_steps=1",
                             f"model.pretrained={tmp_path / 'vqmodel'}"))["step"] == 1

    train(tiny_config(tmp_path / "fsq", *TOKENIZER, *QUANTIZERS["fsq"], "train.max_steps=1"))
    with pytest.raises(SystemExit) as stop:
        export(["--checkpoint", str(list_checkpoints(tmp_path / "fsq")[-1]), "--out", str(tmp_path / "no")])
    assert stop.value.code != 0 and "expected a plain codebook" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()
