"""The objectives (fastvae/losses.py): cyclical annealing, free bits, capacity annealing, IWAE with
DReG, beta-TCVAE, the calibrated Gaussian decoder. Each against float64 by hand, with gradients;
exact on resume; N processes = 1 process."""

import subprocess
import sys

import pytest
import torch

from fastvae import losses
from fastvae.config import load_config
from fastvae.errors import UserError
from fastvae.distributed import global_batch_mean
from fastvae.train import train
from helpers import ROOT, TINY, assert_same_weights, final_weights, tiny_config


def forward_of(model, objective):
    """The training step's forward (fastvae.train_forward) of `model` with `objective` and the eager
    Gaussian bottleneck."""
    from fastvae.bottleneck import GaussianBottleneck
    from fastvae.train_forward import TrainForward

    return TrainForward(model, GaussianBottleneck(), objective)


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
                                       ["loss.objective=iwae", "loss.samples=3", "loss.dreg=true"],
                                       ["loss.objective=tcvae", "loss.recon=mse", "loss.sigma=optimal",
                                        "model.condition=labels"]])
def test_each_objective_trains_and_resumes_exactly(tmp_path, objective):
    train(tiny_config(tmp_path / "straight", *objective, "train.epochs=2"))
    train(tiny_config(tmp_path / "stopped", *objective, "train.epochs=2", "train.max_steps=5"))
    train(tiny_config(tmp_path / "stopped", *objective, "train.epochs=2", "train.resume=auto"))
    assert_same_weights(final_weights(tmp_path / "stopped"), final_weights(tmp_path / "straight"))
    check_logged_terms(tmp_path / "straight", objective)


# What each objective logs beside loss, recon and kl (per step and per epoch), and how its loss is made
# of them (docs/training.md says it in words).
TERMS = {"loss.free_bits=0.3": {"kl_term"}, "loss.capacity=5": {"kl_term"}, "loss.objective=iwae": {"iwae_bound"},
         "loss.objective=tcvae": {"mi", "tc", "dimension_kl", "sigma2"}}


def check_logged_terms(out, objective):
    from fastvae.tracking import STEPS_FILE, read_records

    expected = set().union(*(TERMS.get(setting, set()) for setting in objective))
    for record in read_records(out) + read_records(out, STEPS_FILE):
        logged = set(record) - {"epoch", "step", "loss", "recon", "kl", "beta", "lr", "skipped_batches",
                                "images_per_sec"} - {k for k in record if k.startswith("test_")}
        assert logged == expected, record
        if "iwae_bound" in expected:  # the loss is minus the bound, not recon + kl
            assert record["loss"] == pytest.approx(-record["iwae_bound"], rel=1e-6)
        if "tc" in expected:  # recon_weight 1, beta 1, tc_weight 6 (its default)
            parts = record["recon"] + record["mi"] + record["dimension_kl"] + 6 * record["tc"]
            assert record["loss"] == pytest.approx(parts, rel=1e-5)


def test_free_bits_changes_what_trains_and_the_elbo_does_not():
    """The objective reaches the model: the same start and batch give other gradients with a floor."""
    from fastvae.models import ConvVAE
    from fastvae.objectives import BatchKL, Elbo

    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grads = []
    for objective in (Elbo(), BatchKL(free_bits=1.0)):
        torch.manual_seed(0)
        model = ConvVAE(latent_dim=4)
        torch.manual_seed(2)
        loss = forward_of(model, objective)(x, beta=torch.tensor(1.0)).loss
        loss.backward()
        grads.append(model.to_logvar.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.slow
@pytest.mark.parametrize("objective", [["loss.free_bits=0.3", "loss.kl_cycle_steps=4"],
                                       ["loss.capacity=5", "loss.capacity_steps=4", "loss.capacity_gamma=20"],
                                       ["loss.objective=iwae", "loss.samples=3", "loss.dreg=true"],
                                       ["loss.objective=tcvae", "loss.recon=mse", "loss.sigma=optimal",
                                        "model.condition=labels"]])
def test_objectives_train_the_same_on_2_processes_as_on_one(tmp_path, objective):
    """Free bits (with cyclical annealing) and capacity are terms of the batch's mean KL: the ranks
    average over the global batch (one differentiable all-reduce), so 2 x B/2 equals 1 x B.
    IWAE: per image, keyed per (image, k). beta-TCVAE and the calibrated decoder: their global-batch
    terms, through the whole training path, with a conditional model (each rank its images' labels) (test_two_processes_give_the_gradient_of_one is the sharp
    check: Adam's steps hide small gradient differences)."""
    out = tmp_path / "lc"
    cmd = [sys.executable, str(ROOT / "tools" / "loss_compare.py"), "--config", "mnist", "--nproc", "2", "--steps", "6",
           "--assert-equal", "--out", str(out), "--timeout", "300", *TINY, *objective]
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
    from fastvae.objectives import IWAE

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=3)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ids, seed, step = torch.tensor([5, 9]), torch.tensor(7), 3
    loss, recon, kl, _, _ = forward_of(model, IWAE(samples=4))(x, (seed, noise.row_offsets(ids, 3, step)),
                                                               beta=torch.tensor(1.0))
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
    from fastvae.objectives import BatchKL

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    loss, recon, *_ = forward_of(model, BatchKL(capacity_gamma=0.0))(x, beta=torch.tensor(1.0),
                                                                     capacity=torch.tensor(5.0))
    assert loss.item() == pytest.approx(recon.mean().item(), rel=1e-6)


# ---------------------------------------------------------------- beta-TCVAE and the calibrated decoder


def test_tc_decomposition_against_float64_by_hand():
    """Minibatch-weighted sampling written out as sums of densities, one sample at a time."""
    import math

    g = torch.Generator().manual_seed(0)
    b, d, n = 5, 3, 100
    mu, logvar = (torch.randn(b, d, generator=g, dtype=torch.float64) for _ in range(2))
    z = mu + (0.5 * logvar).exp() * torch.randn(b, d, generator=g, dtype=torch.float64)
    mi, tc, dim_kl = losses.tc_decomposition(z, mu, logvar, n)

    def density(i, j, dims):  # q(z_i[dims] | x_j)
        return math.prod(math.exp(-0.5 * (math.log(2 * math.pi) + logvar[j, k].item()
                                          + (z[i, k] - mu[j, k]).item() ** 2 / math.exp(logvar[j, k].item())))
                         for k in dims)

    for i in range(b):
        log_qz = math.log(sum(density(i, j, range(d)) for j in range(b)) / (n * b))
        log_product = sum(math.log(sum(density(i, j, [k]) for j in range(b)) / (n * b)) for k in range(d))
        log_pz = sum(-0.5 * (math.log(2 * math.pi) + z[i, k].item() ** 2) for k in range(d))
        assert mi[i].item() == pytest.approx(math.log(density(i, i, range(d))) - log_qz, abs=1e-12)
        assert tc[i].item() == pytest.approx(log_qz - log_product, abs=1e-12)
        assert dim_kl[i].item() == pytest.approx(log_product - log_pz, abs=1e-12)


def test_tcvae_with_tc_weight_beta_is_the_one_sample_kl_and_passes_gradcheck():
    g = torch.Generator().manual_seed(2)
    eps = torch.randn(6, 3, generator=g, dtype=torch.float64)
    mu, logvar = (torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    z = mu + (0.5 * logvar).exp() * eps
    one_sample_kl = losses.log_normal(z, mu, logvar) - losses.log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
    terms = losses.tc_decomposition(z, mu, logvar, 50)
    torch.testing.assert_close(losses.tcvae_kl_term(*terms, 2.0, 2.0), 2.0 * one_sample_kl, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda m, lv: losses.tcvae_kl_term(
        *losses.tc_decomposition(m + (0.5 * lv).exp() * eps, m, lv, 50), 0.7, 4.0).mean(), (mu, logvar))


def test_calibrated_gaussian_decoder_against_float64_by_hand():
    import math

    g = torch.Generator().manual_seed(3)
    x_hat, x = (torch.rand(4, 6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sq_err = (x_hat - x).pow(2).sum(1)
    var = losses.optimal_variance(sq_err.mean() / 6)
    nll = losses.gaussian_nll(sq_err, 6, var)
    by_hand = [-sum(math.log(math.exp(-(x_hat[i, p] - x[i, p]).item() ** 2 / (2 * var.item()))
                             / math.sqrt(2 * math.pi * var.item())) for p in range(6)) for i in range(4)]
    torch.testing.assert_close(nll, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # the fitted variance is the likelihood's maximum: any other variance gives a larger NLL
    for other in (0.9 * var, 1.1 * var):
        assert losses.gaussian_nll(sq_err, 6, other).sum() > nll.sum()
    # ... so its gradient is that of the squared errors over 2 var (var held fixed)
    nll.sum().backward()
    held = x_hat.detach().clone().requires_grad_()
    losses.gaussian_nll((held - x.detach()).pow(2).sum(1), 6, var.detach()).sum().backward()
    torch.testing.assert_close(x_hat.grad, held.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a: losses.gaussian_nll((a - x.detach()).pow(2).sum(1), 6,
                                      losses.optimal_variance((a - x.detach()).pow(2).mean())).mean(), (x_hat,))
    # a perfect reconstruction: the floor keeps the loss finite
    zero = torch.zeros(2, dtype=torch.float64)
    assert torch.isfinite(losses.gaussian_nll(zero, 6, losses.optimal_variance(zero.mean()))).all()


def objective_gradients(rank, world, objective, compiled=False):
    """The parameters' gradient of one step on 8 images, shared over `world` processes as DDP does
    (each rank its contiguous share; gradients averaged), and the FutureWarnings that step raised;
    compiled: also the graphs compiled."""
    import warnings

    import torch.distributed as dist

    from fastvae import noise
    from fastvae.models import ConvVAE
    from fastvae.objectives import TCVAE, Elbo
    from fastvae.trainer import compile_counts

    torch.manual_seed(0)
    model = ConvVAE(latent_dim=4)
    forward = forward_of(model, TCVAE(**objective) if "tc_weight" in objective else Elbo(**objective))
    if compiled:
        forward.compile()
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    share, ids = x.chunk(world)[rank], torch.arange(8).chunk(world)[rank]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = forward(share, (torch.tensor(3), noise.row_offsets(ids, 4, 0)), beta=torch.tensor(0.5)).loss
        loss.backward()
    future = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    grads = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()])
    if world > 1:
        dist.all_reduce(grads)
    return (grads / world, compile_counts()) if compiled else (grads / world, future)


@pytest.mark.parametrize("objective", [
    {"tc_weight": 3.0, "dataset_size": 100, "recon_weight": 0.0},  # the TC estimator's gradient alone
    {"tc_weight": 3.0, "dataset_size": 100},
    {"kind": "mse", "optimal_sigma": True},
])
def test_two_processes_give_the_gradient_of_one(tmp_path, objective):
    """beta-TCVAE's q(z) over the global batch (distributed.global_batch) and sigma-VAE's variance of the
    global batch (distributed.global_batch_mean): 2 x 4 images give one process's gradient of 8. (A
    TCVAE estimating q(z) from each rank's own share, or a variance of each rank's own share, fails this.)
    And no rank warns: the global-batch gather is torch's current collective, not a deprecated one."""
    from ranks import on_ranks

    one, _ = objective_gradients(0, 1, objective)
    two = on_ranks(objective_gradients, 2, tmp_path, objective)
    assert one.abs().max() > 0
    for rank_grads, future_warnings in two:
        torch.testing.assert_close(rank_grads, one, rtol=1e-4, atol=1e-6)
        assert future_warnings == []


@pytest.mark.slow
def test_the_global_batch_terms_compile_into_one_graph_on_two_processes(tmp_path):
    """train.compile=true under DDP: the all-gather of the global batch is torch's functional
    collective, traced into the graph (the deprecated torch.distributed.nn ones split it in 6-7)."""
    from ranks import on_ranks

    objective = {"kind": "mse", "optimal_sigma": True, "tc_weight": 3.0, "dataset_size": 100}
    one, _ = objective_gradients(0, 1, objective)
    for grads, counts in on_ranks(objective_gradients, 2, tmp_path, objective, True):
        assert counts == {"compiled_graphs": 1, "graph_breaks": 0}
        torch.testing.assert_close(grads, one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (["loss.objective=tcvae", "loss.free_bits=0.5"], "tcvae replaces the KL term"),
    (["loss.sigma=optimal"], "expected loss.recon=mse, got bce"),
    (["loss.recon=mse", "loss.sigma=optimal", "loss.recon_weight=2"], "expected 1, got 2.0"),
    (["loss.recon=mse", "loss.sigma=optimal", "loss.objective=iwae"], "expected loss.objective=elbo or tcvae"),
    (["loss.objective=tcvae", "loss.tc_weight=-1"], "loss.tc_weight"),
])
def test_bad_tcvae_and_sigma_settings_are_one_line(bad, message):
    with pytest.raises(UserError, match=message):
        load_config("mnist", bad)


# ---------------------------------------------------------------- DReG


def dreg_problem(k=4, b=3, d=2, seed=4):
    """A linear Gaussian decoder in float64: log p(x|z) = -|x - (W z + c)|^2 / 2 per image."""
    g = torch.Generator().manual_seed(seed)
    mu, logvar = (torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    weight = torch.randn(5, d, generator=g, dtype=torch.float64, requires_grad=True)
    x, eps = torch.randn(b, 5, generator=g, dtype=torch.float64), torch.randn(k, b, d, generator=g, dtype=torch.float64)
    return mu, logvar, weight, x, eps


def bound_terms(mu, logvar, weight, x, eps):
    z = mu + (0.5 * logvar).exp() * eps
    return z, -0.5 * (x - z @ weight.T).pow(2).sum(-1)


def test_dreg_gradients_against_float64_by_hand():
    """DReG's value is the bound's; its gradients are the paper's: decoder sum_k w~_k grad log w_k,
    encoder sum_k w~_k^2 (d log w_k / d z_k) dz_k / dphi, log q's parameters held."""
    mu, logvar, weight, x, eps = dreg_problem()
    z, log_px = bound_terms(mu, logvar, weight, x, eps)
    loss = losses.iwae_loss(log_px, z, mu, logvar, dreg_z=z).sum()
    torch.testing.assert_close(loss, losses.iwae_loss(log_px, z, mu, logvar).sum(), rtol=0, atol=1e-12)
    loss.backward()
    # by hand: log w with q's parameters as constants; its gradient in z and in the decoder, per sample
    zs = z.detach().requires_grad_()
    log_w = losses.importance_log_weights(-0.5 * (x - zs @ weight.T).pow(2).sum(-1), zs, mu.detach(),
                                          logvar.detach())
    w = torch.softmax(log_w.detach(), 0)
    dz, = torch.autograd.grad(log_w.sum(), zs, retain_graph=True)
    d_weight, = torch.autograd.grad((w * log_w).sum(), weight)
    sigma = (0.5 * logvar.detach()).exp()
    torch.testing.assert_close(mu.grad, -(w.unsqueeze(-1) ** 2 * dz).sum(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(logvar.grad, -(w.unsqueeze(-1) ** 2 * dz * 0.5 * sigma * eps).sum(0),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(weight.grad, -d_weight, rtol=1e-10, atol=1e-12)


def test_dreg_encoder_gradient_has_the_bounds_expectation_with_less_variance():
    """Averaged over 20,000 draws of eps, DReG's and IWAE's encoder gradients agree (within 4 standard
    errors), and DReG's spread is smaller: an unbiased, lower-variance estimator."""
    mu, logvar, weight, x, _ = dreg_problem(b=1)
    draws = torch.randn(4, 20_000, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    grads = {}
    for name, dreg in (("iwae", False), ("dreg", True)):  # 20,000 independent copies of one image
        m, lv = (t.detach().expand(20_000, 2).clone().requires_grad_() for t in (mu, logvar))
        z = m + (0.5 * lv).exp() * draws  # [K, R, D]
        log_px = -0.5 * (x - z @ weight.detach().T).pow(2).sum(-1)
        losses.iwae_loss(log_px, z, m, lv, dreg_z=z if dreg else None).sum().backward()
        grads[name] = torch.cat([m.grad, lv.grad], 1)  # [R, 4]: one estimate per draw
    mean_diff = grads["dreg"].mean(0) - grads["iwae"].mean(0)
    std_err = (grads["dreg"].var(0) / 20_000 + grads["iwae"].var(0) / 20_000).sqrt()
    assert (mean_diff.abs() < 4 * std_err).all(), (mean_diff, std_err)
    assert (grads["dreg"].var(0) < grads["iwae"].var(0)).all()


def test_bad_dreg_settings_are_one_line():
    for bad in (["loss.dreg=true"], ["loss.objective=iwae", "loss.samples=1", "loss.dreg=true"]):
        with pytest.raises(UserError, match="expected loss.objective=iwae and loss.samples >= 2"):
            load_config("mnist", bad)


def test_the_model_trains_dreg_on_the_samples_it_decodes():
    """loss.dreg=true in the model: the gradient of every parameter is that of the reference DReG
    bound written out from fastvae.noise's eps (the hook sits upstream of the decoder)."""
    from fastvae import noise
    from fastvae.models import ConvVAE
    from fastvae.objectives import IWAE

    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    ids, seed = torch.tensor([5, 9]), torch.tensor(7)
    grads = []
    for by_model in (True, False):
        torch.manual_seed(0)
        model = ConvVAE(latent_dim=3)
        if by_model:
            loss = forward_of(model, IWAE(samples=4, dreg=True))(x, (seed, noise.row_offsets(ids, 3, 2)),
                                                                beta=torch.tensor(1.0)).loss
        else:
            mu, logvar = model.encode(x)
            eps = torch.cat([noise.keyed_normal(seed, noise.row_offsets(ids * 4 + k, 3, 2), 3) for k in range(4)])
            z = mu.repeat(4, 1) + (0.5 * logvar.repeat(4, 1)).exp() * eps  # [K * B, D], k-major
            log_px = -losses.reconstruction_loss(model.decode(z), x.repeat(4, 1, 1, 1), "bce").view(4, 2)
            loss = losses.iwae_loss(log_px, z.view(4, 2, 3), mu, logvar, dreg_z=z).mean()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_dreg_survives_torch_compile():
    """The gradient hook DReG puts on the samples is traced by torch.compile (train.compile=true).
    (A small MLP VAE: what is checked is the hook, not the layers; compiling it is quick.)"""
    from conditional_models import UnconditionalMLP
    from fastvae import noise
    from fastvae.objectives import IWAE

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    key = (torch.tensor(7), noise.row_offsets(torch.arange(4), 3, 2))
    grads = {}
    for name, dreg, compiled in (("eager", True, False), ("compiled", True, True), ("plain", False, False)):
        torch.manual_seed(0)
        model = UnconditionalMLP(1, (28, 28), 3)
        model.latent_dim = 3
        forward = forward_of(model, IWAE(samples=4, dreg=dreg))
        if compiled:
            forward.compile()
        forward(x, key, beta=torch.tensor(1.0)).loss.backward()
        grads[name] = model.encoder.weight.grad
    scale = grads["eager"].abs().max()  # float32 rounding of the fused graph: ~1e-5 of it
    assert (grads["compiled"] - grads["eager"]).abs().max() < 1e-4 * scale
    assert (grads["plain"] - grads["eager"]).abs().max() > 1e-2 * scale  # DReG's encoder gradient differs
