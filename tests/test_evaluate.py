"""Evaluation against a model whose log-likelihood is known in closed form."""

import json
import subprocess
import math

import pytest
import torch

from fastvae.evaluation import Likelihood, evaluate_model, evaluate_sums, fitted_likelihood, iwae_bound
from fastvae.evaluate import main
from fastvae.models.base import VAE

SIGMA2 = 0.001  # a sharp Gaussian decoder: the latent matters, so the bounds are far from trivial
TRAIN_SIGMA2 = 0.5  # the variance at which the MSE training loss is the Gaussian NLL (minus a constant)


class LinearGaussianVAE(VAE):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, SIGMA2 I) with the mean written as sigmoid(logits):
    log p(x) = log N(x; b, W W^T + SIGMA2 I) exactly. The encoder is the exact posterior,
    deliberately spoiled (mean shrunk, variance inflated) so the bounds are strict."""

    def __init__(self, W, b, shrink=0.6, inflate=3.0, dead_dims=0, sigma2=SIGMA2):
        super().__init__()
        self.W, self.b = W, b
        self.latent_dim = W.shape[1] + dead_dims
        self.dead_dims = dead_dims
        self.shrink, self.inflate = shrink, inflate
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # gives the model a dtype
        d = W.shape[1]
        self.sigma2 = sigma2
        self.post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / sigma2)

    def encode(self, x):
        flat = x.flatten(1).double()
        mu = (flat - self.b) @ self.W @ self.post_cov.T / self.sigma2 * self.shrink
        logvar = torch.log(torch.diagonal(self.post_cov) * self.inflate).expand_as(mu)
        if self.dead_dims:  # collapsed units: the posterior is the prior whatever x is
            zeros = torch.zeros(len(x), self.dead_dims, dtype=torch.float64)
            mu, logvar = torch.cat([mu, zeros], 1), torch.cat([logvar, zeros], 1)
        return mu, logvar

    def decode(self, z):
        mean = z[:, : self.W.shape[1]].double() @ self.W.T + self.b
        return torch.logit(mean).view(-1, 1, 2, 3)  # sigmoid(logits) = the linear mean


def make_problem(n=40, seed=0, sigma2=SIGMA2, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 2, generator=g, dtype=torch.float64) * scale
    b = torch.full((6,), 0.5, dtype=torch.float64)
    cov = W @ W.T + sigma2 * torch.eye(6, dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(b, covariance_matrix=cov)
    x = (b + torch.randn(n, 6, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(cov).T).clamp(0.0, 1.0)
    exact = dist.log_prob(x)  # pixels kept in [0, 1] like images; the bound holds for any x
    return W, b, x.view(n, 1, 2, 3), exact


def test_iwae_converges_to_the_true_log_likelihood_from_below():
    W, b, x, exact = make_problem()
    model = LinearGaussianVAE(W, b)
    likelihood = Likelihood("mse", SIGMA2)
    bounds = {}
    for k in (1, 10, 100, 2000):
        bounds[k] = iwae_bound(model, x, likelihood, k, chunk=250, seed=1)
    gaps = {k: (exact - v).mean().item() for k, v in bounds.items()}
    assert gaps[1] > gaps[10] > gaps[100] > gaps[2000]  # tighter with K
    assert gaps[1] > 1.0  # the spoiled encoder leaves a real gap at K=1
    assert abs(gaps[2000]) < 0.05  # K=2000: log p(x) within Monte-Carlo error (mean of 40 images)
    assert min(gaps.values()) > -0.05  # below log p(x) for every K, up to that error


def test_k1_equals_the_elbo_of_the_training_loss():
    W, b, x, _ = make_problem(n=4000, seed=3, sigma2=TRAIN_SIGMA2, scale=0.02)
    model = LinearGaussianVAE(W, b, sigma2=TRAIN_SIGMA2)
    likelihood = Likelihood("mse", TRAIN_SIGMA2)
    k1 = iwae_bound(model, x, likelihood, 1, 1, seed=0).mean().item()
    # The training loss terms: recon = sum (sigmoid(logits) - x)^2, KL in closed form; with SIGMA2 = 1/2
    # log p(x|z) = -recon - (pixels/2) log(pi). Average over many z for the expectation.
    from fastvae import losses

    mu, logvar = model.encode(x)
    g = torch.Generator().manual_seed(5)
    recon = torch.stack([losses.reconstruction_loss(model.decode(losses.reparameterize(
        mu, logvar, torch.randn(mu.shape, generator=g, dtype=torch.float64))), x.double(), "mse")
        for _ in range(50)]).mean()
    elbo = -(recon + losses.kl_divergence(mu, logvar).mean() + 0.5 * 6 * math.log(math.pi)).item()
    assert k1 == pytest.approx(elbo, abs=0.03)  # one sample per image, 4000 images: std ~0.015


def test_chunking_gives_the_same_result_as_one_pass():
    W, b, x, _ = make_problem()
    model = LinearGaussianVAE(W, b)
    likelihood = Likelihood("mse", SIGMA2)
    one = iwae_bound(model, x, likelihood, 64, chunk=64, seed=2)
    chunked = iwae_bound(model, x, likelihood, 64, chunk=7, seed=2)
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-10)


class DatasetOf(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], 0, i


def test_active_units_detect_dead_dimensions():
    W, b, x, _ = make_problem(n=200)
    model = LinearGaussianVAE(W, b, shrink=1.0, inflate=1.0, dead_dims=3)  # 2 live + 3 collapsed
    report = evaluate_model(model, DatasetOf(x.float()), Likelihood("mse", SIGMA2), batch_size=64)
    assert report["latent_dim"] == 5 and report["active_units"] == 2
    assert report["kl_per_dim_nats"][2:] == [0.0, 0.0, 0.0]
    assert all(v > 0 for v in report["kl_per_dim_nats"][:2])
    assert report["psnr_db"] == pytest.approx(10 * math.log10(1 / report["recon_mse"]))


def test_bernoulli_likelihood_is_minus_bce():
    logits = torch.tensor([[[[2.0, -1.0]]]])
    x = torch.tensor([[[[1.0, 0.0]]]])
    expected = math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))
    assert Likelihood("bce").log_prob(logits, x).item() == pytest.approx(expected, abs=1e-9)


def test_cli_on_a_trained_checkpoint_writes_json(tmp_path, capsys):
    from fastvae.checkpoint import list_checkpoints
    from fastvae.train import train
    from helpers import tiny_config

    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=8"))
    ckpt = list_checkpoints(out)[-1]
    report = main(["--checkpoint", str(ckpt), "--iwae-samples", "20", "--chunk", "8", "--max-images", "50",
                   "--json", str(tmp_path / "eval.json")])
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved == json.loads(json.dumps(report))  # the file is what the call returned
    assert saved["images"] == 50 and saved["iwae_samples"] == 20 and saved["step"] == 8
    assert saved["iwae_log_likelihood_nats"] >= saved["elbo_nats"] - 1.0  # tighter bound, up to MC noise
    assert saved["elbo_bits_per_dim"] == pytest.approx(saved["elbo_nats"] / (784 * math.log(2)))
    printed = capsys.readouterr().out
    assert "IWAE NLL, K=20 (nats)" in printed and "active units" in printed
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", str(ckpt), "--iwae-samples", "9000"])
    assert exc.value.code == 2
    assert "--iwae-samples 9000: expected 0 to 5000" in capsys.readouterr().err
    # the run's folder stands for its newest checkpoint, said in one line
    assert main(["--checkpoint", str(out), "--max-images", "8"])["checkpoint"] == str(ckpt)
    assert f"{out} is a run's folder: using its newest checkpoint {ckpt}" in capsys.readouterr().out
    # accelerate launch asked for 2 processes that on a CPU start 1: one line, not a 1-process evaluation
    from fastvae.launch.processes import accelerate_binary

    proc = subprocess.run([accelerate_binary(), "launch", "--num_processes", "2", "-m", "fastvae.evaluate",
                           "--checkpoint", str(ckpt), "--max-images", "8"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "the launcher was asked for --num_processes 2 and started 1 process" in proc.stderr


def test_train_runs_the_final_evaluation(tmp_path):
    from fastvae.train import train
    from helpers import tiny_config

    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4", "train.final_eval=true", "train.final_eval_iwae=5",
                      "train.final_eval_images=30"))
    report = json.loads((out / "eval.json").read_text())
    assert report["images"] == 30 and report["iwae_samples"] == 5 and report["step"] == 4
    assert math.isfinite(report["elbo_nats"]) and report["latent_dim"] == 2


def test_data_that_moved_is_found_with_an_override(tmp_path, capsys):
    import shutil

    from fastvae.checkpoint import list_checkpoints
    from fastvae.data.mnist import embedded_mnist_path
    from fastvae.generate import main as generate_main
    from fastvae.train import train
    from helpers import tiny_config

    csv = tmp_path / "old" / "mnist.csv.gz"
    csv.parent.mkdir()
    shutil.copy(embedded_mnist_path(), csv)
    train(tiny_config(tmp_path / "run", "train.max_steps=2", f"data.root={csv}"))
    ckpt = str(list_checkpoints(tmp_path / "run")[-1])
    moved = tmp_path / "new" / "mnist.csv.gz"
    moved.parent.mkdir()
    csv.rename(moved)
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", ckpt, "--max-images", "20"])
    assert exc.value.code == 2 and f"MNIST csv '{csv}' not found" in capsys.readouterr().err
    report = main(["--checkpoint", ckpt, "--max-images", "20", f"data.root={moved}"])
    assert report["images"] == 20
    (written,) = generate_main(["reconstruct", "--checkpoint", ckpt, "--n", "10", f"data.root={moved}"])
    assert written.is_file()
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", ckpt, "model.latent_dim=3"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert exc.value.code == 2 and err == ("fastvae: error: override 'model.latent_dim=3': only data.* keys can "
                                           "change for a trained model; expected e.g. data.root=/new/place")


def test_the_fitted_gaussian_variance_is_the_likelihoods_maximum():
    """--gaussian-var fit (the calibrated decoder's evaluation): the variance is the evaluated images'
    mean squared error at the ELBO's samples, so no other variance gives a higher ELBO, and the
    reconstruction NLL is (pixels / 2) (log(2 pi s2) + 1) exactly."""
    W, b, x, _ = make_problem(n=64)
    model, data = LinearGaussianVAE(W, b), DatasetOf(x)
    fitted = evaluate_model(model, data, Likelihood("mse", None), iwae_samples=10, batch_size=16)
    var = fitted["gaussian_var"]
    assert fitted["gaussian_var_fitted"] and 0 < var < 1
    assert fitted["recon_nll_nats"] == pytest.approx(3 * (math.log(2 * math.pi * var) + 1), rel=1e-12)
    for other in (0.8 * var, 1.25 * var):
        report = evaluate_model(model, data, Likelihood("mse", other), iwae_samples=10, batch_size=16)
        assert report["elbo_nats"] < fitted["elbo_nats"] and not report["gaussian_var_fitted"]
    # over 2 processes: shard 0's sums plus shard 1's (what the all-reduce adds) fit the split's variance
    other_half = evaluate_sums(model, data, Likelihood("mse", normalized=False), 0, 1, None, False, 0, 16, False,
                               (1, 2))[0].values
    halves = fitted_likelihood(model, data, None, False, 0, 16, (0, 2), lambda v: v + other_half)
    assert halves.gaussian_var == pytest.approx(var, rel=1e-12)
    assert fitted_likelihood(model, data, None, False, 0, 16, (0, 2), None).gaussian_var != pytest.approx(var)


def test_cli_fits_the_variance_of_a_calibrated_decoder_run(tmp_path, capsys):
    from fastvae.checkpoint import list_checkpoints
    from fastvae.train import train
    from helpers import tiny_config

    out = tmp_path / "run"
    train(tiny_config(out, "train.max_steps=4", "loss.recon=mse", "loss.sigma=optimal"))
    ckpt = str(list_checkpoints(out)[-1])
    fitted = main(["--checkpoint", ckpt, "--max-images", "40"])
    assert fitted["gaussian_var_fitted"] and fitted["gaussian_var"] == pytest.approx(
        fitted["recon_mse"], rel=0.5)  # the MSE at samples, near the MSE at the means
    assert "Gaussian variance (fitted)" in capsys.readouterr().out
    fixed = main(["--checkpoint", ckpt, "--max-images", "40", "--gaussian-var", "0.5"])
    assert fixed["gaussian_var"] == 0.5 and fixed["elbo_nats"] < fitted["elbo_nats"]
    with pytest.raises(SystemExit) as exc:
        main(["--checkpoint", ckpt, "--gaussian-var", "wide"])
    assert exc.value.code == 2 and "expected a number or fit, got 'wide'" in capsys.readouterr().err


def test_ssim_of_a_perfect_reconstruction_is_one_and_of_noise_is_low():
    """--ssim (torchmetrics, data_range 1): 1 for identical images, far below for unrelated ones."""
    from fastvae.evaluation import ImageQuality

    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ssim, lpips = ImageQuality(ssim=True).measure(x.double(), x)
    assert torch.allclose(ssim, torch.ones(3, dtype=torch.float64)) and not lpips.any()
    noise = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    assert ImageQuality(ssim=True).measure(noise.double(), x)[0].max() < 0.2
