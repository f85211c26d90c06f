"""The VAE interface every model implements, ours and users': encode -> (mu, logvar), decode -> the
decoder's output for the reconstruction loss (logits: images are sigmoid(logits))."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastvae.ops import eager_reparam_kl

ReparamKL = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def with_condition(features: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
    """[features, condition] along the last dim (the condition in the features' dtype: autocast)."""
    return features if condition is None else torch.cat([features, condition.to(features.dtype)], dim=-1)


class VAE(nn.Module):
    """Subclass this, call `super().__init__()`, and implement `encode` and `decode`.

    The model is encode / decode (and how its output becomes images): nothing about objectives or
    the latent's regularizer, which are the run's components (fastvae/bottleneck.py,
    fastvae/objectives/), put together with the model by fastvae/train_forward.py for training.
    forward(x) -> (logits, mu, logvar, kl) is the lecture's VAE in one call, for notebooks and tests.
    `latent_dim` is set from the encoder's output at set-up when a subclass does not set it.
    """

    latent_dim: int
    condition_dim: int = 0  # a conditional model (model.condition): encode(x, c) and decode(z, c), c [B, this]

    def __init__(self) -> None:
        super().__init__()
        self.reparam_kl: ReparamKL = eager_reparam_kl  # forward's; training's is the bottleneck's (train.ops)

    def use_reparam_kl(self, op: ReparamKL) -> None:
        """Run forward's reparameterization + KL with `op` ((mu, logvar, noise_key=None) -> (z, kl[B]))."""
        self.reparam_kl = op

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
        (disc.weight > 0); None: this model cannot be trained against a discriminator."""
        return None

    def bottleneck(self) -> nn.Module | None:
        """The latent bottleneck the model owns (a tokenizer's quantizer, fastvae/quantizers.py: its codebook
        is part of the model); None: encode gives (mu, logvar) and the run's Gaussian bottleneck samples."""
        return None

    def output_logvar(self) -> torch.nn.Parameter | None:
        """The decoder's one output log-variance that LDM's loss learns or holds (loss.objective=ldm);
        None: the model has none."""
        return None

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass instead of keeping them (train.gradient_checkpointing);
        a model that offers it overrides this."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise_key: tuple[torch.Tensor, torch.Tensor] | None = None,
                condition: torch.Tensor | None = None):
        """The lecture's forward: encode, z and the KL per sample from the reparameterization + KL op
        (use_reparam_kl), decode. -> (logits, mu, logvar, kl). noise_key: (seed, row counters) of
        fastvae.noise; None: eps from torch's generator. (Training runs these parts through
        fastvae.train_forward.TrainForward, with the run's bottleneck and objective.)"""
        mu, logvar = self.encode_with(x, condition)
        z, kl = self.reparam_kl(mu, logvar) if noise_key is None else self.reparam_kl(mu, logvar, noise_key)
        return self.decode_with(z.to(mu.dtype), condition), mu, logvar, kl
