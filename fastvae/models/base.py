"""The VAE interface every model implements: encode -> (mu, logvar), decode -> logits."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from fastvae import losses

ReparamKL = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class VAE(nn.Module):
    """forward(x) -> (logits, mu, logvar, kl); the reparam+KL op is swappable.

    The op lives on the model (not in the training loop) because DDP only hooks
    `forward`: encode, sample and decode must happen in one forward call.
    """

    latent_dim: int

    def __init__(self) -> None:
        super().__init__()
        self.reparam_kl: ReparamKL = losses.reparam_kl

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, noise_key: tuple[torch.Tensor, torch.Tensor] | None = None):
        """noise_key: (seed, row counters) of fastvae.noise, to draw each sample's own eps; None:
        eps from torch's generator."""
        mu, logvar = self.encode(x)
        z, kl = self.reparam_kl(mu, logvar) if noise_key is None else self.reparam_kl(mu, logvar, noise_key)
        return self.decode(z.to(mu.dtype)), mu, logvar, kl
