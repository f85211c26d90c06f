"""Training end to end on the embedded MNIST subset (in-process, CPU)."""

import json

import pytest
import torch

from fastvae.checkpoint import list_checkpoints, read_meta
from fastvae.loading import load_model
from fastvae.errors import UserError
from fastvae.tracking import read_records
from fastvae.train import train
from helpers import assert_same_weights, final_weights, tiny_config


def read_metrics(out_dir):
    return read_records(out_dir)


def test_short_run_lowers_loss_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    result = train(tiny_config(out, "data.limit=1024", "train.epochs=3", "optim.lr=1e-3"))
    records = read_metrics(out)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [32, 64, 96] and result["step"] == 96
    for r in records:
        assert {"epoch", "step", "loss", "recon", "kl", "images_per_sec", "test_loss"} <= r.keys()
        assert r["images_per_sec"] > 0
    # an untrained decoder costs ~784*log(2)=543 nats; a few epochs must cut that down clearly
    assert records[0]["loss"] < 400
    assert records[-1]["loss"] < records[0]["loss"] - 30
    assert records[-1]["test_loss"] < 260
    for name in ("samples.png", "reconstructions.png", "latent_scatter.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size > 10_000
    assert json.loads((out / "summary.json").read_text())["step"] == 96
    ckpts = list_checkpoints(out)
    assert [c.name for c in ckpts] == ["step_00000064", "step_00000096"]  # keep_checkpoints=2
    meta = read_meta(ckpts[-1])
    assert meta["step"] == 96 and meta["epoch"] == 3 and meta["config"]["model"]["latent_dim"] == 2
    model, cfg, _ = load_model(ckpts[-1])
    with torch.no_grad():
        assert model.decode(torch.zeros(1, 2)).shape == (1, 1, 28, 28)


@pytest.mark.parametrize("stop_at", [5, 8, 11])  # inside epoch 1, at its end, inside epoch 2
def test_resume_gives_identical_parameters(tmp_path, stop_at):
    common = ["train.epochs=2", "model.dropout=0.0"]
    train(tiny_config(tmp_path / "straight", *common))
    reference = final_weights(tmp_path / "straight")

    out = tmp_path / "interrupted"
    first = train(tiny_config(out, *common, f"train.max_steps={stop_at}"))
    assert first["step"] == stop_at
    second = train(tiny_config(out, *common, "train.resume=auto"))
    assert second["step"] == 16
    assert_same_weights(final_weights(out), reference)
    steps = [r["step"] for r in read_metrics(out)]
    assert steps == sorted(steps) and steps[-1] == 16


def test_resume_with_grad_accumulation_and_scheduler(tmp_path):
    common = ["train.epochs=2", "train.grad_accum_steps=2", "optim.scheduler=cosine", "optim.warmup_steps=2",
              "loss.kl_warmup_steps=4"]
    train(tiny_config(tmp_path / "straight", *common))
    out = tmp_path / "interrupted"
    train(tiny_config(out, *common, "train.max_steps=3"))
    assert train(tiny_config(out, *common, "train.resume=auto"))["step"] == 8
    assert_same_weights(final_weights(out), final_weights(tmp_path / "straight"))


def test_resume_from_explicit_path_and_incompatible_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4"))
    ckpt = list_checkpoints(out)[-1]
    assert train(tiny_config(tmp_path / "other", f"train.resume={ckpt}", "train.max_steps=6"))["step"] == 6
    with pytest.raises(UserError, match="was trained with model.latent_dim=2; expected it to match this run's 3"):
        train(tiny_config(tmp_path / "third", f"train.resume={ckpt}", "model.latent_dim=3"))
    with pytest.raises(UserError, match=f"checkpoint '{tmp_path / 'nope'}' not found"):
        train(tiny_config(tmp_path / "fourth", f"train.resume={tmp_path / 'nope'}"))


def test_partial_checkpoint_is_never_picked(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4"))
    # a crash mid-write leaves a hidden temporary directory without fastvae.json
    tmp = out / "checkpoints" / ".tmp-step_00000006"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert [c.name for c in list_checkpoints(out)] == ["step_00000004"]
    assert train(tiny_config(out, "train.resume=auto", "train.max_steps=6"))["step"] == 6


def test_batch_larger_than_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"data.batch_size=512 x 1 process\(es\) is larger than the 256"):
        train(tiny_config(tmp_path / "run", "data.batch_size=512"))


def test_bf16_mixed_precision_trains(tmp_path):
    result = train(tiny_config(tmp_path / "run", "train.max_steps=4", "train.mixed_precision=bf16"))
    assert result["step"] == 4
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())


def test_compiled_ops_match_eager_ops():
    from fastvae.ops import select_ops

    eager, compiled = select_ops("eager", torch.device("cpu")), select_ops("compiled", torch.device("cpu"))
    mu = torch.randn(8, 5, requires_grad=True)
    logvar = torch.randn(8, 5, requires_grad=True)
    logits = torch.randn(8, 1, 28, 28, requires_grad=True)
    target = torch.rand(8, 1, 28, 28)
    results = []
    for ops in (eager, compiled):
        torch.manual_seed(3)  # both draw eps from the global RNG: same seed, same eps
        z, kl = ops.reparam_kl(mu, logvar)
        recon = ops.recon_loss(logits, target, "bce") + ops.recon_loss(logits, target, "mse")
        grads = torch.autograd.grad((z.sum() + kl.sum() + recon.sum()), (mu, logvar, logits))
        results.append((z, kl, recon, *grads))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compiled_ops_follow_the_eager_loss(tmp_path):
    train(tiny_config(tmp_path / "eager", "train.epochs=1", "train.ops=eager"))
    train(tiny_config(tmp_path / "compiled", "train.epochs=1", "train.ops=compiled"))
    a, b = read_metrics(tmp_path / "eager")[0], read_metrics(tmp_path / "compiled")[0]
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert b["kl"] == pytest.approx(a["kl"], rel=1e-3)


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    result = train(tiny_config(tmp_path / "run", "train.max_steps=3", "train.compile=true"))
    assert result["step"] == 3
    model, _, _ = load_model(list_checkpoints(tmp_path / "run")[-1])  # saved unwrapped: loads into a plain model
    assert model.latent_dim == 2
