"""Eager PyTorch reference of every op the objectives are made of: the parity oracle.

The lecture's math (log-var trick, closed-form KL, reconstruction from logits), the objectives' terms
(KL schedules and floors, the importance-weighted bound, beta-TCVAE's decomposition, the calibrated
decoder), and LDM's autoencoder loss and GAN losses, each written once from its paper. The fused
Triton kernels in `fastvae.kernels`, the tests and the benchmarks are all compared against these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECON_KINDS = ("bce", "mse")
DISTANCE_BUDGET = 64 << 20  # bytes of the [vectors, codes] distance block nearest_codes computes at once
LOG_2PI = math.log(2 * math.pi)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps with sigma = exp(logvar / 2) (the log-var trick)."""
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu_j, sigma_j^2) || N(0, 1)) of every latent dimension: -0.5 * (1 + logvar - mu^2 - exp(logvar))."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per sample: -0.5 * sum_j (1 + logvar - mu^2 - exp(logvar))."""
    return kl_divergence_per_dim(mu, logvar).sum(dim=1)


def reconstruction_loss(logits: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample reconstruction loss summed over all non-batch dims.

    The decoder gives logits. "bce": Bernoulli negative log-likelihood, written as
    BCE-with-logits (the stable form of the lecture's BCE on sigmoid outputs).
    "mse": squared error between sigmoid(logits) and the target (Gaussian decoder).
    """
    if kind == "bce":
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    elif kind == "mse":
        per_pixel = (torch.sigmoid(logits) - target).pow(2)
    else:
        raise ValueError(f"reconstruction kind {kind!r}: expected one of {RECON_KINDS}")
    return per_pixel.flatten(1).sum(dim=1)


def kl_weight(beta: float, step: int, warmup_steps: int, cycle_steps: int = 0, cycle_ramp: float = 0.5) -> float:
    """beta, ramped linearly from 0 over the first `warmup_steps` steps (KL warm-up); or cyclical
    (Fu et al. 2019): every cycle of `cycle_steps` ramps it from 0 over its first `cycle_ramp` share,
    then holds it. A function of the step alone: a resumed run sees the same weights."""
    if cycle_steps > 0:
        return beta * min(1.0, (step % cycle_steps) / (cycle_ramp * cycle_steps))
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


def log_prior(z: torch.Tensor) -> torch.Tensor:
    """log p(z) = log N(z; 0, I) summed over the last dim."""
    return -0.5 * (LOG_2PI + z.pow(2)).sum(-1)


def importance_log_weights(log_px: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
                           beta=1.0) -> torch.Tensor:
    """log w = log p(x|z) + beta (log p(z) - log q(z|x)) for samples z of q = N(mu, exp(logvar)):
    log_px [K, B], z [K, B, D], mu and logvar [B, D]."""
    return log_px + beta * (log_prior(z) - log_normal(z, mu, logvar))


def iwae_loss(log_px: torch.Tensor, z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor,
              beta=1.0, dreg_z: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image negative importance-weighted bound (Burda et al. 2016) from K samples:
    -(logsumexp_k log w - log K). K = 1 is the single-sample ELBO; beta = 1 the bound itself (used
    by training, loss.objective=iwae, and by fastvae.evaluate).

    dreg_z: the samples as drawn (upstream of the decoder and of z here, k-major): the same value
    with doubly-reparameterized gradients (DReG, Tucker et al. 2018): the decoder's gradient stays
    sum_k w~_k grad log w_k (w~ the normalized weights), the encoder's is sum_k w~_k^2 d log w_k / d z_k
    dz_k/dphi, q's parameters held fixed in log q(z|x) (no score-function term). Same expectation,
    lower variance."""
    if dreg_z is None:
        log_w = importance_log_weights(log_px, z, mu, logvar, beta)
        return -(torch.logsumexp(log_w, dim=0) - math.log(log_px.shape[0]))
    log_w = importance_log_weights(log_px, z, mu.detach(), logvar.detach(), beta)
    bound = torch.logsumexp(log_w, dim=0) - math.log(log_px.shape[0])
    weights = torch.softmax(log_w.detach(), dim=0)
    surrogate = (weights * log_w).sum(0)  # gradients w~_k grad log w_k; z's get a second w~_k:
    dreg_z.register_hook(lambda grad: grad * weights.reshape(*dreg_z.shape[:-1], 1).to(grad.dtype))
    return -(bound.detach() + surrogate - surrogate.detach())


def capacity_at(step: int, capacity: float, capacity_steps: int) -> float:
    """C of capacity annealing (Burgess et al. 2018): 0 -> capacity nats, linearly over capacity_steps."""
    return capacity if capacity_steps <= 0 else capacity * min(1.0, step / capacity_steps)


def kl_term(kl_mean_per_dim: torch.Tensor, beta, free_bits: float = 0.0, capacity=None, gamma: float = 1.0):
    """The KL part of the loss from KL_j averaged over the (global) batch, one per latent dimension:
    beta * sum_j KL_j (the ELBO's); with free bits beta * sum_j max(free_bits, KL_j) (Kingma et al.
    2016: dimensions below the floor get no push towards the prior); with a capacity C
    gamma * |sum_j KL_j - C| (Burgess et al. 2018). Terms of the batch's mean, so N processes must
    average over the global batch (fastvae.models.base) to train what one process trains."""
    if free_bits > 0:
        return beta * kl_mean_per_dim.clamp_min(free_bits).sum()
    if capacity is not None:
        return gamma * (kl_mean_per_dim.sum() - capacity).abs()
    return beta * kl_mean_per_dim.sum()


MIN_LOG_SIGMA = -6.0  # Rybkin et al.'s floor on log sigma: a perfect reconstruction must not give -inf


def gaussian_nll(sq_err: torch.Tensor, pixels: int, var: torch.Tensor) -> torch.Tensor:
    """-log N(x; x_hat, var I) per image from its sum of squared errors over `pixels` values."""
    return 0.5 * (sq_err / var + pixels * (LOG_2PI + torch.log(var)))


def optimal_variance(mean_sq_err: torch.Tensor) -> torch.Tensor:
    """The shared decoder variance of the calibrated Gaussian decoder (sigma-VAE, Rybkin et al. 2021):
    the maximum-likelihood variance of the batch is its mean squared error per value, floored at
    exp(2 * MIN_LOG_SIGMA). Not detached: at the optimum the loss's derivative in var is zero, so
    the gradient is that of the squared errors weighted by 1 / (2 var)."""
    return mean_sq_err.clamp_min(math.exp(2 * MIN_LOG_SIGMA))


def tc_decomposition(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, dataset_size: int,
                     mu_batch: torch.Tensor | None = None, logvar_batch: torch.Tensor | None = None):
    """(MI, TC, dimension-wise KL) per sample [B] of beta-TCVAE (Chen et al. 2018), by minibatch-weighted
    sampling: q(z) and q(z_d) are estimated from the posteriors of the batch's M images,
    log q(z_i) ~ logsumexp_j log q(z_i | x_j) - log(N M) with N = dataset_size, and the same per
    dimension. mu_batch / logvar_batch [M, D]: the posteriors to estimate with (the global batch
    under several processes; default: this batch's). Their sum is log q(z|x) - log p(z), a one-sample KL.
    z, mu, logvar [B, D]."""
    mu_batch = mu if mu_batch is None else mu_batch
    logvar_batch = logvar if logvar_batch is None else logvar_batch
    log_norm = math.log(dataset_size * mu_batch.shape[0])
    pairs = -0.5 * (LOG_2PI + logvar_batch + (z[:, None] - mu_batch) ** 2 / logvar_batch.exp())  # [B, M, D]
    log_qz = torch.logsumexp(pairs.sum(2), dim=1) - log_norm
    log_qz_product = (torch.logsumexp(pairs, dim=1) - log_norm).sum(1)
    return log_normal(z, mu, logvar) - log_qz, log_qz - log_qz_product, log_qz_product - log_prior(z)


def tcvae_kl_term(mi: torch.Tensor, tc: torch.Tensor, dimension_kl: torch.Tensor, beta, tc_weight: float):
    """beta-TCVAE's replacement of the ELBO's KL, per sample: beta (MI + dimension-wise KL) + tc_weight TC
    (Chen et al.'s alpha = gamma = beta, their beta = tc_weight: tc_weight = beta is the beta-VAE's
    one-sample KL)."""
    return beta * (mi + dimension_kl) + tc_weight * tc


def vae_loss(recon: torch.Tensor, kl: torch.Tensor, recon_weight: float, beta: float) -> torch.Tensor:
    """Loss = recon_weight * mean_batch(recon) + beta * mean_batch(KL) (lecture: alpha*L1 + L2)."""
    return recon_weight * recon.mean() + beta * kl.mean()


def reparam_kl(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor | None = None):
    """(z, kl) in one call, the eager twin of `fastvae.kernels.fused_reparam_kl`.

    Computed in float32 whatever the autocast dtype of mu/logvar: the KL sums
    D terms and exp(logvar) overflows early in bf16/fp16.
    """
    mu, logvar = mu.float(), logvar.float()
    if eps is None:
        eps = torch.randn_like(mu)
    return reparameterize(mu, logvar, eps), kl_divergence(mu, logvar)


# ---------------------------------------------------------------- the latent-diffusion autoencoder (LDM)
# LDM's LPIPSWithDiscriminator (CompVis latent-diffusion, ldm/modules/losses/contperceptual.py), term by
# term, on images in [-1, 1]; the KL is the ELBO's (kl_divergence above), weighed by loss.beta.

PIXEL_KINDS = ("l1", "l2")


def autoencoder_reconstruction(x: torch.Tensor, x_hat: torch.Tensor, pixel: str = "l1",
                               perceptual: torch.Tensor | None = None, perceptual_weight: float = 1.0):
    """LDM's rec_loss per pixel [B, C, H, W]: |x - x_hat| (or its square) + perceptual_weight x each
    image's LPIPS added to every one of its pixels (so LPIPS weighs C x H x W times in the sum, as in LDM)."""
    if pixel not in PIXEL_KINDS:
        raise ValueError(f"pixel loss {pixel!r}: expected one of {PIXEL_KINDS}")
    rec = (x - x_hat).abs() if pixel == "l1" else (x - x_hat).pow(2)
    if perceptual is not None:
        rec = rec + perceptual_weight * perceptual.view(-1, 1, 1, 1)
    return rec


def autoencoder_nll(rec: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Per image [B]: sum over pixels of rec / exp(logvar) + logvar, logvar LDM's one scalar output
    log-variance (fixed, or learned)."""
    return (rec / logvar.exp() + logvar).flatten(1).sum(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-mean D(x_hat): the generator's adversarial term."""
    return -logits_fake.mean()


def adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, disc_weight: float) -> torch.Tensor:
    """LDM's balance of the adversarial term: ||d NLL / d L|| / (||d G / d L|| + 1e-4), clamped to
    [0, 1e4], times disc_weight, L the decoder's last layer; held fixed (no gradient). The gradients
    must be those of the global batch for N processes to train what one does (fastvae.critic)."""
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


# ---------------------------------------------------------------- a vector quantizer's lookup


def nearest_codes(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||v - e_k||^2 per vector (the first code on ties), as ||v||^2 - 2 v.e + ||e||^2, in chunks of
    vectors so the distance block stays within DISTANCE_BUDGET whatever N x K is."""
    k = codebook.shape[0]
    rows = max(1, DISTANCE_BUDGET // (k * vectors.element_size()))
    code_norms = codebook.pow(2).sum(1)
    out = []
    for chunk in vectors.split(rows):
        distances = chunk.pow(2).sum(1, keepdim=True) - 2 * chunk @ codebook.t() + code_norms
        out.append(distances.argmin(1))
    return torch.cat(out) if out else vectors.new_zeros(0, dtype=torch.long)


def vector_quantize(v: torch.Tensor, codes: torch.Tensor, commitment: float, codebook_weight: float):
    """The eager reference of the nearest-code op (fastvae/kernels/vector_quantize.py fuses it): (z_q
    straight-through [N, D], indices [N], loss per vector [N] = codebook_weight x ||sg(v) - e||^2 / D +
    commitment x ||v - sg(e)||^2 / D; codebook_weight 0: an EMA codebook, no gradient reaches it)."""
    with torch.no_grad():
        indices = nearest_codes(v.detach(), codes.detach())
    q = codes[indices]
    loss = commitment * (v - q.detach()).pow(2).mean(1)
    if codebook_weight:
        loss = codebook_weight * (v.detach() - q).pow(2).mean(1) + loss
    return v + (q - v).detach(), indices, loss
