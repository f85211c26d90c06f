"""The VAE interface every model implements, ours and users': encode -> (mu, logvar), decode -> the
decoder's output for the reconstruction loss (logits: images are sigmoid(logits))."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from fastvae import losses
from fastvae.ops import eager_reparam_kl, global_batch, global_batch_mean, recon_loss_fp32

ReparamKL = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def with_condition(features: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """[features, condition] along the last dim (the condition in the features' dtype: autocast)."""
    return features if condition is None else torch.cat([features, condition.to(features.dtype)], dim=-1)


@dataclass(frozen=True)
class Objective:
    """What forward(x, noise_key, beta) trains: the reconstruction op and weight (or the calibrated
    Gaussian decoder's likelihood), and the KL term (the ELBO's; or free bits, or a capacity, both
    terms of the global batch's mean KL per dimension; or beta-TCVAE's decomposition)."""

    recon_loss: Callable = recon_loss_fp32
    kind: str = "bce"
    recon_weight: float = 1.0
    free_bits: float = 0.0
    capacity_gamma: float | None = None  # set: capacity annealing, gamma * |KL - C|
    iwae_samples: int = 1  # > 1: the importance-weighted bound with this many samples per image
    dreg: bool = False  # the bound's doubly-reparameterized gradients (Tucker et al. 2018)
    optimal_sigma: bool = False  # kind mse: -log N(x; x_hat, var I), var the global batch's MSE (sigma-VAE)
    tc_weight: float | None = None  # set: beta-TCVAE, total correlation weighed by this
    dataset_size: int = 0  # beta-TCVAE: the training set's size N (minibatch-weighted sampling)
    # set: the latent-diffusion autoencoder's loss (fastvae.autoencoder_loss.AutoencoderLoss), called as
    # (model, x, decoder output, kl[B], beta) -> (loss, recon[B], terms)
    autoencoder: Callable | None = None

    @property
    def batch_level(self) -> bool:
        return self.free_bits > 0 or self.capacity_gamma is not None


class VAE(nn.Module):
    """Subclass this, call `super().__init__()`, and implement `encode` and `decode`.

    forward(x) -> (logits, mu, logvar, kl) is the base class's: it applies the selected
    reparameterization + KL op between encode and decode, so the fused kernels, keyed noise and
    torch.compile apply to every model. Given `beta`, forward also takes the reconstruction loss
    and the ELBO and returns (loss, recon, kl): the training step's whole forward in one call. Both
    ops live on the model (not in the training loop) because DDP only hooks `forward`, and because
    a compiled model under DDP is then one graph from images to loss (DDP's own code stays outside).
    `latent_dim` is set from the encoder's output at set-up when a subclass does not set it.
    """

    latent_dim: int
    condition_dim: int = 0  # a conditional model (model.condition): encode(x, c) and decode(z, c), c [B, this]

    def __init__(self) -> None:
        super().__init__()
        self.reparam_kl: ReparamKL = eager_reparam_kl  # until a Trainer gives it the op train.ops selects
        self.objective = Objective()  # set by use_objective

    def use_reparam_kl(self, op: ReparamKL) -> None:
        """Run the reparameterization + KL with `op` ((mu, logvar, noise_key=None) -> (z, kl[B]))."""
        self.reparam_kl = op

    def use_objective(self, objective: Objective) -> None:
        """What forward(x, noise_key, beta) trains (the Trainer sets it from loss.*)."""
        self.objective = objective

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, C, H, W] in [0, 1] -> (mu, logvar), each [B, latent_dim]."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, latent_dim] -> logits [B, C, H, W] (the reconstruction loss takes logits)."""
        raise NotImplementedError

    def encode_with(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        """encode(x), or encode(x, condition) for a conditional model."""
        return self.encode(x) if condition is None else self.encode(x, condition)

    def decode_with(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """decode(z), or decode(z, condition) for a conditional model."""
        return self.decode(z) if condition is None else self.decode(z, condition)

    def images(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's output as images in [0, 1]: sigmoid(logits) (a model whose decoder draws
        pixels itself, e.g. kl_autoencoder, overrides this)."""
        return torch.sigmoid(output)

    def pixels(self, output: torch.Tensor) -> torch.Tensor:
        """The decoder's output as images in [-1, 1], not clamped: what the latent-diffusion loss
        compares (loss.objective=ldm)."""
        return 2 * torch.sigmoid(output) - 1

    def last_layer(self) -> torch.nn.Parameter | None:
        """The decoder's last layer's weight, where the adversarial term's adaptive weight is measured
        (loss.disc_weight > 0); None: this model cannot be trained against a discriminator."""
        return None

    def forward(self, x: torch.Tensor, noise_key: tuple[torch.Tensor, torch.Tensor] | None = None,
                beta: torch.Tensor | None = None, capacity: torch.Tensor | None = None,
                condition: torch.Tensor | None = None, with_terms: bool = False):
        """noise_key: (seed, row counters) of fastvae.noise, to draw each sample's own eps; None:
        eps from torch's generator. beta (a tensor: a float would be baked into a compiled graph; and
        capacity's C): return (loss, recon[B], kl[B]) instead of (logits, mu, logvar, kl), and with
        `with_terms` a 4th item: the objective's own terms, batch means (`objective_terms`). condition
        [B, condition_dim]: what a conditional model's encoder and decoder are given."""
        mu, logvar = self.encode_with(x, condition)
        if beta is not None and self.objective.iwae_samples > 1:
            loss, recon, kl, terms = self._iwae(x, mu, logvar, noise_key, beta, condition)
            return (loss, recon, kl, terms) if with_terms else (loss, recon, kl)
        z, kl = self.reparam_kl(mu, logvar) if noise_key is None else self.reparam_kl(mu, logvar, noise_key)
        logits = self.decode_with(z.to(mu.dtype), condition)
        if beta is None:
            return logits, mu, logvar, kl
        loss, recon, terms = self._loss(x, logits, z, mu, logvar, kl, beta, capacity)
        return (loss, recon, kl, terms) if with_terms else (loss, recon, kl)

    def _loss(self, x, logits, z, mu, logvar, kl, beta, capacity):
        """(loss, recon[B], terms) of the one-sample objectives."""
        o = self.objective
        if o.autoencoder is not None:
            return o.autoencoder(self, x, logits, kl, beta)
        recon, terms = self._recon(logits, x)
        if o.tc_weight is not None:
            loss, tc_terms = self._tcvae(z, mu, logvar, recon, beta)
            return loss, recon, {**terms, **tc_terms}
        if not o.batch_level:
            return losses.vae_loss(recon, kl, o.recon_weight, beta), recon, terms
        kl_mean = global_batch_mean(losses.kl_divergence_per_dim(mu.float(), logvar.float()))
        gamma = o.capacity_gamma if o.capacity_gamma is not None else 1.0  # (`or 1.0` would make a gamma of 0 one)
        kl_loss = losses.kl_term(kl_mean, beta, o.free_bits, capacity, gamma)
        return o.recon_weight * recon.mean() + kl_loss, recon, {**terms, "kl_term": kl_loss.detach()}

    def _recon(self, logits, x):
        """Per image: the reconstruction loss; with the calibrated Gaussian decoder its negative
        log-likelihood under the variance that fits the global batch best (a term: sigma2)."""
        recon = self.objective.recon_loss(logits, x, self.objective.kind)
        if not self.objective.optimal_sigma:
            return recon, {}
        pixels = x[0].numel()
        variance = losses.optimal_variance(global_batch_mean(recon) / pixels)
        return losses.gaussian_nll(recon, pixels, variance), {"sigma2": variance.detach()}

    def _tcvae(self, z, mu, logvar, recon, beta):
        """beta-TCVAE: q(z) estimated from the posteriors of the global batch (gathered with their
        gradients), so N processes x B/N train what one process x B trains. Its terms: mutual
        information, total correlation and dimension-wise KL, batch means."""
        o = self.objective
        z, mu, logvar = z.float(), mu.float(), logvar.float()
        mi, tc, dimension_kl = losses.tc_decomposition(z, mu, logvar, o.dataset_size, global_batch(mu),
                                                       global_batch(logvar))
        kl_loss = losses.tcvae_kl_term(mi, tc, dimension_kl, beta, o.tc_weight).mean()
        terms = {"mi": mi.mean().detach(), "tc": tc.mean().detach(), "dimension_kl": dimension_kl.mean().detach()}
        return o.recon_weight * recon.mean() + kl_loss, terms

    def _iwae(self, x, mu, logvar, noise_key, beta, condition=None):
        """(loss, recon[B], kl[B], terms) of the importance-weighted bound: the K samples of every image in one
        call of the reparameterization op (rows repeated K times; sample k of image i keyed as the
        virtual sample i * K + k, so K = 1 keys as the ELBO does and N processes still equal one),
        decoded together. recon and kl are reported per image: the mean recon of its samples and
        the closed-form KL."""
        o, k, b = self.objective, self.objective.iwae_samples, x.shape[0]
        key = None
        if noise_key is not None:  # rows [B, 2] = (first element index i * D, stream): k-major copies
            seed, rows = noise_key
            dim = mu.shape[1]
            virtual = torch.cat([rows[:, :1] * k + j * dim for j in range(k)])
            key = (seed, torch.cat([virtual, rows[:, 1:].repeat(k, 1)], 1))
        mu_k, logvar_k = mu.repeat(k, 1), logvar.repeat(k, 1)
        z, kl = self.reparam_kl(mu_k, logvar_k) if key is None else self.reparam_kl(mu_k, logvar_k, key)
        logits = self.decode_with(z.to(mu.dtype), None if condition is None else condition.repeat(k, 1))
        recon = o.recon_loss(logits, x.repeat(k, *([1] * (x.dim() - 1))), o.kind).view(k, b)
        log_w_terms = (-o.recon_weight * recon, z.float().view(k, b, -1), mu.float(), logvar.float())
        loss = losses.iwae_loss(*log_w_terms, beta, dreg_z=z if o.dreg else None).mean()
        # the loss is minus the bound (beta-weighted): not recon + kl, which are the samples' mean recon
        # and the closed-form KL, reported beside it
        return loss, recon.mean(0), kl.view(k, b)[0], {"iwae_bound": -loss.detach()}
