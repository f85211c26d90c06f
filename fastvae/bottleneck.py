"""The latent bottleneck: what turns the encoder's output into the decoder's input, with a regularizer
per sample. One component between `model.encode` and `model.decode` (fastvae/train_forward.py), so
that the objectives and the training step do not depend on which bottleneck a run has.

    latent = bottleneck(encoded, noise_key)   # Latent(z, regularizer[B], terms, posterior)

The Gaussian one is the lecture's: the encoder gives (mu, logvar), z = mu + exp(logvar / 2) * eps and
the regularizer is the closed-form KL, both from the reparameterization + KL op a run selects
(train.ops: the fused kernel, or the eager reference). eps is keyed by (seed, step, sample index)
(fastvae.noise): N processes draw what one draws. A spatial latent (kl_autoencoder's C x h x w) is
seen flattened, [batch, C*h*w]; the model flattens and restores it.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from fastvae.ops import eager_reparam_kl


class Latent(NamedTuple):
    z: torch.Tensor  # the decoder's input [B * samples, D], float32
    regularizer: torch.Tensor  # per sample [B * samples]: the KL to the prior
    terms: dict  # the bottleneck's own logged statistics (batch means)
    posterior: tuple  # what the encoder gave: (mu, logvar) [B, D] each


class GaussianBottleneck(nn.Module):
    """z ~ N(mu, exp(logvar)) by the reparameterization, and KL(q(z|x) || N(0, I)) per sample.
    `op`: (mu, logvar, noise_key=None) -> (z, kl[B]) (fastvae.ops.select_ops)."""

    def __init__(self, op: Callable = eager_reparam_kl) -> None:
        super().__init__()
        self.op = op

    def forward(self, encoded, noise_key=None, samples: int = 1) -> Latent:
        """samples > 1 (the importance-weighted bound): every image's K samples in one call of the op,
        rows repeated K times k-major, sample k of image i keyed as the virtual sample i * K + k, so
        K = 1 keys as the one-sample ELBO does and N processes still equal one."""
        mu, logvar = encoded
        if samples == 1:
            z, kl = self.op(mu, logvar) if noise_key is None else self.op(mu, logvar, noise_key)
            return Latent(z, kl, {}, (mu, logvar))
        key = None if noise_key is None else repeated_key(noise_key, samples, mu.shape[1])
        mu_k, logvar_k = mu.repeat(samples, 1), logvar.repeat(samples, 1)
        z, kl = self.op(mu_k, logvar_k) if key is None else self.op(mu_k, logvar_k, key)
        return Latent(z, kl, {}, (mu, logvar))


def repeated_key(noise_key, samples: int, dim: int):
    """The noise key of `samples` k-major copies of a batch: rows [B, 2] = (first element index
    i * D, stream) become, for copy j, (i * K * D + j * D, stream)."""
    seed, rows = noise_key
    virtual = torch.cat([rows[:, :1] * samples + j * dim for j in range(samples)])
    return seed, torch.cat([virtual, rows[:, 1:].repeat(samples, 1)], 1)


def build_bottleneck(ops) -> GaussianBottleneck:
    """The run's bottleneck, with the reparameterization + KL op of train.ops."""
    return GaussianBottleneck(ops.reparam_kl)
