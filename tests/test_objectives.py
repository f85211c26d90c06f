"""KL schedules and floors (fastvae/losses.py): cyclical annealing, free bits, capacity annealing.
Each against float64 by hand, with gradients; exact on resume; N processes = 1 process."""

import subprocess
import sys

import pytest
import torch

from fastvae import losses
from fastvae.config import load_config
from fastvae.errors import UserError
from fastvae.ops import global_batch_mean
from fastvae.train import train
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config


@pytest.mark.parametrize("step, weight", [(0, 0.0), (25, 1.0), (50, 2.0), (99, 2.0), (100, 0.0), (125, 1.0),
                                          (260, 2.0)])
def test_cyclical_beta_restarts_its_ramp_every_cycle(step, weight):
    assert losses.kl_weight(2.0, step, 0, cycle_steps=100, cycle_ramp=0.5) == pytest.approx(weight, abs=0)


def test_capacity_grows_linearly_then_holds():
    assert [losses.capacity_at(s, 25.0, 100) for s in (0, 40, 100, 1000)] == [0.0, 10.0, 25.0, 25.0]
    assert losses.capacity_at(3, 25.0, 0) == 25.0


def test_kl_terms_against_float64_by_hand():
    kl = torch.tensor([0.1, 0.7, 2.0], dtype=torch.float64)
    assert losses.kl_term(kl, 2.0).item() == pytest.approx(2.0 * 2.8, abs=1e-15)
    assert losses.kl_term(kl, 2.0, free_bits=0.5).item() == pytest.approx(2.0 * (0.5 + 0.7 + 2.0), abs=1e-15)
    assert losses.kl_term(kl, 2.0, capacity=torch.tensor(5.0, dtype=torch.float64), gamma=10.0).item() == \
        pytest.approx(10.0 * 2.2, abs=1e-13)


@pytest.mark.parametrize("term", ["free bits", "capacity"])
def test_kl_term_gradients_pass_gradcheck_through_the_closed_form_kl(term):
    g = torch.Generator().manual_seed(0)
    mu, logvar = (torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kwargs = {"free_bits": 0.6} if term == "free bits" else {"capacity": torch.tensor(1.5, dtype=torch.float64),
                                                            "gamma": 3.0}

    def loss(m, lv):
        return losses.kl_term(losses.kl_divergence_per_dim(m, lv).mean(0), 1.3, **kwargs)

    assert torch.autograd.gradcheck(loss, (mu, logvar))
    # free bits: a dimension under the floor gets no gradient at all
    if term == "free bits":
        low = torch.zeros(3, 2, dtype=torch.float64, requires_grad=True)
        losses.kl_term(losses.kl_divergence_per_dim(low, low).mean(0), 1.0, free_bits=0.5).backward()
        assert torch.equal(low.grad, torch.zeros_like(low))


def test_global_batch_mean_of_one_process_is_the_mean():
    values = torch.arange(12.0).view(4, 3)
    assert torch.equal(global_batch_mean(values), values.mean(0))


@pytest.mark.parametrize("bad, message", [
    (["loss.kl_cycle_steps=10", "loss.kl_warmup_steps=5"], "both schedule beta"),
    (["loss.free_bits=0.5", "loss.capacity=10"], "both replace the KL term"),
    (["loss.kl_cycle_ramp=1.5"], "expected a share of the cycle in (0, 1]"),
])
def test_bad_combinations_are_one_line(bad, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(")", "\\)").replace("[", "\\[")):
        load_config("mnist", bad)


@pytest.mark.parametrize("objective", [["loss.kl_cycle_steps=6", "loss.kl_cycle_ramp=0.5"],
                                       ["loss.free_bits=0.3"], ["loss.capacity=5", "loss.capacity_steps=8",
                                                                "loss.capacity_gamma=20"],
                                       ["loss.objective=iwae", "loss.samples=3"]])
def test_each_objective_trains_and_resumes_exactly(tmp_path, objective):
    train(tiny_config(tmp_path / "straight", *objective, "train.epochs=2"))
    train(tiny_config(tmp_path / "stopped", *objective, "train.epochs=2", "train.max_steps=5"))
    train(tiny_config(tmp_path / "stopped", *objective, "train.epochs=2", "train.resume=auto"))
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "straight"))


def test_free_bits_changes_what_trains_and_the_elbo_does_not():
    """The objective reaches the model: the same start and batch give other gradients with a floor."""
    from fastvae.models import ConvVAE
    from fastvae.models.base import Objective

    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grads = []
    for objective in (Objective(), Objective(free_bits=1.0)):
        torch.manual_seed(0)
        model = ConvVAE(latent_dim=4)
        model.use_objective(objective)
        torch.manual_seed(2)
        loss, _, _ = model(x, beta=torch.tensor(1.0))
        loss.backward()
        grads.append(model.to_logvar.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.slow
@pytest.mark.parametrize("objective", [["loss.free_bits=0.3"], ["loss.objective=iwae", "loss.samples=3"]])
def test_objectives_train_the_same_on_2_processes_as_on_one(tmp_path, objective):
    """Free bits (and capacity, through the same ops.global_batch_mean) are terms of the batch's mean KL:
    the ranks average over the global batch (one differentiable all-reduce), so 2 x B/2 equals 1 x B.
    IWAE: per image, keyed per (image, k)."""
    out = tmp_path / "lc"
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--config", "mnist", "--nproc", "2", "--steps", "6",
           "--assert-equal", "--out", str(out), "--port", "29545", "--timeout", "300", *TINY, *objective]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


# ---------------------------------------------------------------- IWAE training


def test_iwae_loss_against_float64_by_hand():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    z = mu + (0.5 * logvar).exp() * torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    log_px = -torch.rand(4, 3, generator=g, dtype=torch.float64) * 50
    log_w = log_px + losses.log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - losses.log_normal(z, mu, logvar)
    by_hand = -torch.log(torch.exp(log_w).mean(0))
    torch.testing.assert_close(losses.iwae_loss(log_px, z, mu, logvar), by_hand, rtol=1e-12, atol=1e-12)
    # K = 1: the single-sample ELBO; and for the same samples the bound is never looser than their ELBOs
    torch.testing.assert_close(losses.iwae_loss(log_px[:1], z[:1], mu, logvar), -log_w[0], rtol=0, atol=1e-12)
    assert (losses.iwae_loss(log_px, z, mu, logvar) <= -log_w.mean(0) + 1e-12).all()


def test_iwae_loss_gradients_pass_gradcheck():
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(3, 2, 4, generator=g, dtype=torch.float64)
    log_px = -torch.rand(3, 2, generator=g, dtype=torch.float64)
    mu, logvar = (torch.randn(2, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(
        lambda m, lv: losses.iwae_loss(log_px, m + (0.5 * lv).exp() * eps, m, lv, beta=0.7), (mu, logvar))


def test_the_model_trains_the_reference_bound_with_keyed_samples():
    """K samples per image from one call of the reparameterization op, sample k of image i keyed as
    the virtual sample i * K + k: equal to the bound computed by hand from fastvae.noise's eps."""
    from fastvae import noise
    from fastvae.models import ConvVAE
    from fastvae.models.base import Objective

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=3)
    model.use_objective(Objective(iwae_samples=4))
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ids, seed, step = torch.tensor([5, 9]), torch.tensor(7), 3
    loss, recon, kl = model(x, (seed, noise.row_offsets(ids, 3, step)), beta=torch.tensor(1.0))
    with torch.no_grad():
        mu, logvar = model.encode(x)
        eps = torch.stack([noise.keyed_normal(seed, noise.row_offsets(ids * 4 + k, 3, step), 3) for k in range(4)])
        z = mu + (0.5 * logvar).exp() * eps
        log_px = -losses.reconstruction_loss(model.decode(z.view(8, 3)), x.repeat(4, 1, 1, 1), "bce").view(4, 2)
        want = losses.iwae_loss(log_px, z, mu, logvar).mean()
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-4)
    assert recon.shape == kl.shape == (2,)


def test_iwae_with_one_sample_is_the_elbo_run(tmp_path):
    a = train(tiny_config(tmp_path / "elbo", "train.max_steps=4"))
    b = train(tiny_config(tmp_path / "iwae1", "train.max_steps=4", "loss.objective=iwae", "loss.samples=1"))
    assert a["param_checksum"] == b["param_checksum"]


@pytest.mark.parametrize("bad, message", [
    (["loss.objective=iwae", "loss.samples=0"], "config key 'loss.samples': expected a value >= 1"),
    (["loss.samples=3"], "samples are for loss.objective=iwae"),
    (["loss.objective=iwae", "loss.samples=3", "loss.free_bits=0.5"], "iwae weighs samples"),
])
def test_bad_iwae_settings_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        load_config("mnist", bad)


def test_a_capacity_gamma_of_zero_weighs_the_kl_term_by_zero():
    """loss.capacity_gamma=0 is a valid setting (>= 0): the KL term vanishes, it does not become gamma 1."""
    from fastvae.models import ConvVAE
    from fastvae.models.base import Objective

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4)
    model.use_objective(Objective(capacity_gamma=0.0))
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss, recon, _ = model(x, beta=torch.tensor(1.0), capacity=torch.tensor(5.0))
    assert loss.item() == pytest.approx(recon.mean().item(), rel=1e-6)
