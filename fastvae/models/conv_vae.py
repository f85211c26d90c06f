"""The lecture's convolutional VAE for 1x28x28 images (MNIST, Fashion-MNIST)."""

from __future__ import annotations

import torch
from torch import nn

from fastvae.models.base import VAE


class ConvVAE(VAE):
    """Encoder 28 -> 14 -> 7 with 3x3 convs; decoder mirrors it with transposed convs.

    Same layers as the lecture, except that the decoder ends in logits (no
    Sigmoid): the losses take logits, images are sigmoid(logits).
    """

    def __init__(self, latent_dim: int = 2, in_channels: int = 1) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(32, 64, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(64, 64, kernel_size=3, stride=2, padding=1),
            nn.LeakyReLU(0.01),
            nn.Conv2d(64, 64, kernel_size=3, stride=1, padding=1),
            nn.Flatten(),
        )
        self.to_mu = nn.Linear(64 * 7 * 7, latent_dim)
        self.to_logvar = nn.Linear(64 * 7 * 7, latent_dim)
        self.from_z = nn.Linear(latent_dim, 64 * 7 * 7)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 64, kernel_size=3, stride=1, padding=1),  # 7
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(64, 64, kernel_size=3, stride=2, padding=1),  # 13
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2, padding=0),  # 27
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(32, in_channels, kernel_size=3, stride=1, padding=0),  # 29
        )

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_z(z).view(-1, 64, 7, 7)
        return self.decoder(h)[:, :, :28, :28]  # the lecture's Trim: 29x29 -> 28x28
