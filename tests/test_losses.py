"""The eager reference against the lecture's numbers and torch.distributions."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence as dist_kl

from fastvae import losses


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p) - torch.log1p(-p)


def test_bce_reproduces_lecture_terms():
    # The lecture's worked terms: -0.8*log(0.7) and -0.2*log(0.1)
    assert -0.8 * math.log(0.7) == pytest.approx(0.285340, abs=1e-6)
    assert -0.2 * math.log(0.1) == pytest.approx(0.460517, abs=1e-6)
    # ...and BCE(y, p) = -(y log p + (1-y) log(1-p)) from logits, summed over pixels
    target = torch.tensor([[0.8, 0.2]], dtype=torch.float64)
    p = torch.tensor([[0.7, 0.1]], dtype=torch.float64)
    expected = (-0.8 * math.log(0.7) - 0.2 * math.log(0.3)) + (-0.2 * math.log(0.1) - 0.8 * math.log(0.9))
    got = losses.reconstruction_loss(logit(p), target, "bce")
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert got.item() == pytest.approx(0.285340 + 0.240795 + 0.460517 + 0.084288, abs=2e-6)


def test_bce_binary_target_matches_log_probability():
    target = torch.tensor([[1.0, 0.0, 1.0]], dtype=torch.float64)
    p = torch.tensor([[0.7, 0.1, 0.9]], dtype=torch.float64)
    expected = -(math.log(0.7) + math.log(0.9) + math.log(0.9))
    assert losses.reconstruction_loss(logit(p), target, "bce").item() == pytest.approx(expected, abs=1e-12)


def test_recon_sums_over_all_non_batch_dims():
    torch.manual_seed(0)
    logits = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    target = torch.rand(3, 2, 4, 5, dtype=torch.float64)
    bce = losses.reconstruction_loss(logits, target, "bce")
    mse = losses.reconstruction_loss(logits, target, "mse")
    for i in range(3):
        manual_bce = -(target[i] * torch.log(torch.sigmoid(logits[i]))
                       + (1 - target[i]) * torch.log(1 - torch.sigmoid(logits[i]))).sum()
        assert bce[i].item() == pytest.approx(manual_bce.item(), rel=1e-10)
        assert mse[i].item() == pytest.approx(((torch.sigmoid(logits[i]) - target[i]) ** 2).sum().item(),
                                              rel=1e-12)


def test_bce_is_finite_for_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0]])
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    out = losses.reconstruction_loss(logits, target, "bce")
    assert torch.isfinite(out).all()
    assert out.item() == pytest.approx(200.0, rel=1e-6)


def test_unknown_recon_kind_is_rejected():
    with pytest.raises(ValueError, match="expected one of"):
        losses.reconstruction_loss(torch.zeros(1, 1), torch.zeros(1, 1), "l1")


def test_kl_matches_torch_distributions():
    torch.manual_seed(1)
    mu = torch.randn(16, 7, dtype=torch.float64)
    logvar = torch.randn(16, 7, dtype=torch.float64)
    ours = losses.kl_divergence(mu, logvar)
    ref = dist_kl(Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))).sum(1)
    assert ours.shape == (16,)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_kl_is_zero_for_the_prior():
    assert losses.kl_divergence(torch.zeros(2, 5), torch.zeros(2, 5)).abs().max().item() == 0.0


def test_reparameterized_samples_have_the_right_mean_and_std():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    mu = torch.tensor([[1.5, -2.0]]).expand(n, 2)
    logvar = torch.tensor([[math.log(0.25), math.log(4.0)]]).expand(n, 2)
    z = losses.reparameterize(mu, logvar, torch.randn(n, 2, generator=g))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.5, -2.0]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 2.0]), atol=0.02, rtol=0)


def test_gradients_flow_through_z_to_mu_and_logvar():
    mu = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(4, 3, dtype=torch.float64)
    z = losses.reparameterize(mu, logvar, eps)
    z.sum().backward()
    torch.testing.assert_close(mu.grad, torch.ones_like(mu))
    torch.testing.assert_close(logvar.grad, 0.5 * torch.exp(0.5 * logvar.detach()) * eps)
    assert torch.autograd.gradcheck(lambda m, lv: losses.reparameterize(m, lv, eps), (mu, logvar))
    assert torch.autograd.gradcheck(losses.kl_divergence, (mu, logvar))


def test_reparam_kl_computes_in_fp32_and_draws_eps():
    mu = torch.zeros(1000, 4, dtype=torch.bfloat16)
    logvar = torch.zeros(1000, 4, dtype=torch.bfloat16)
    z, kl = losses.reparam_kl(mu, logvar)
    assert z.dtype == torch.float32 and kl.dtype == torch.float32
    assert 0.9 < z.std().item() < 1.1
    eps = torch.ones(1000, 4)
    z, _ = losses.reparam_kl(mu, logvar, eps)
    assert torch.equal(z, eps)


def test_vae_loss_and_kl_warmup():
    recon = torch.tensor([10.0, 20.0])
    kl = torch.tensor([1.0, 3.0])
    assert losses.vae_loss(recon, kl, recon_weight=2.0, beta=0.5).item() == pytest.approx(2 * 15 + 0.5 * 2)
    assert losses.kl_weight(1.0, 0, 0) == 1.0
    assert losses.kl_weight(2.0, 0, 100) == 0.0
    assert losses.kl_weight(2.0, 50, 100) == pytest.approx(1.0)
    assert losses.kl_weight(2.0, 500, 100) == 2.0
