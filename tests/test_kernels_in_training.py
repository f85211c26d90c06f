"""The fused ops inside a model: torch.compile without graph breaks, and training with ops=triton."""


import pytest
import torch

from fastvae.kernels import fused_recon_loss, fused_reparam_kl
from fastvae.models import ConvVAE
from fastvae.ops import select_ops
from fastvae.tracking import read_records
from fastvae.train import train
from helpers import tiny_config


def make_step(model, seed=None):
    model.reparam_kl = lambda mu, logvar: fused_reparam_kl(mu, logvar, seed=seed)

    def step(x):
        logits, _, _, kl = model(x)
        return fused_recon_loss(logits, x, "bce").mean() + kl.mean()

    return step


def test_compiled_step_with_fused_ops_has_no_graph_breaks():
    torch._dynamo.reset()
    x = torch.rand(8, 1, 28, 28)
    for seed in (None, 5):  # seed drawn inside the graph, or fixed
        explanation = torch._dynamo.explain(make_step(ConvVAE(latent_dim=2), seed))(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_compiled_step_matches_eager_forward_and_backward():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4)
    x = torch.rand(8, 1, 28, 28)
    step = make_step(model, seed=5)
    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        model.zero_grad()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_c, grads_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_select_ops_triton_uses_the_fused_kernels():
    ops = select_ops("triton", torch.device("cpu"))
    assert ops.name == "triton" and ops.recon_loss is fused_recon_loss
    assert select_ops("auto", torch.device("cpu")).name == "eager"  # auto: triton on CUDA only


def epoch_records(out_dir):
    return read_records(out_dir)


def test_triton_training_draws_the_eager_noise_and_matches_eager(tmp_path):
    # training keys every sample's eps (fastvae.noise): the kernel draws in-kernel the Philox numbers
    # the eager ops compute in torch, so the two runs differ only by float rounding
    for ops in ("eager", "triton"):
        train(tiny_config(tmp_path / ops, "train.epochs=2", f"train.ops={ops}"))
    eager, fused = epoch_records(tmp_path / "eager"), epoch_records(tmp_path / "triton")
    assert len(eager) == len(fused) == 2
    for e, f in zip(eager, fused):
        for key in ("loss", "recon", "test_loss"):
            assert f[key] == pytest.approx(e[key], rel=1e-4), key
        assert f["kl"] == pytest.approx(e["kl"], rel=1e-3, abs=1e-4)  # KL is ~0.1 early on: rounding shows
    assert fused[-1]["loss"] < fused[0]["loss"]
