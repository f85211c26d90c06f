"""The lecture's convolutional VAE, for 1x28x28 images (MNIST, Fashion-MNIST) and any other size."""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvae.models.base import VAE, with_condition


class ConvVAE(VAE):
    """Encoder H -> H/2 -> H/4 with 3x3 convs; decoder mirrors it with transposed convs.

    Same layers as the lecture, except that the decoder ends in logits (no Sigmoid): the losses
    take logits, images are sigmoid(logits). At 28x28 the encoder ends at 7x7 and the decoder
    gives 29x29, trimmed to 28x28 (the lecture's Trim). At any H x W the encoder ends at
    ceil(H/4) x ceil(W/4) and the decoder gives 4*ceil(H/4)+1 >= H + 1 rows (columns alike),
    trimmed the same way: only the size of the linear layers changes.
    """

    def __init__(self, latent_dim: int = 2, in_channels: int = 1, image_size: int | tuple[int, int] = 28,
                 condition_dim: int = 0) -> None:
        super().__init__()
        self.latent_dim, self.condition_dim = latent_dim, condition_dim
        self.height, self.width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.top = (math.ceil(math.ceil(self.height / 2) / 2), math.ceil(math.ceil(self.width / 2) / 2))
        flat = 64 * self.top[0] * self.top[1]
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
        # a conditional model: the condition joins the flattened features and z (a CVAE's usual place)
        self.to_mu = nn.Linear(flat + condition_dim, latent_dim)
        self.to_logvar = nn.Linear(flat + condition_dim, latent_dim)
        self.from_z = nn.Linear(latent_dim + condition_dim, flat)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(64, 64, kernel_size=3, stride=1, padding=1),  # 7
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(64, 64, kernel_size=3, stride=2, padding=1),  # 13
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(64, 32, kernel_size=3, stride=2, padding=0),  # 27
            nn.LeakyReLU(0.01),
            nn.ConvTranspose2d(32, in_channels, kernel_size=3, stride=1, padding=0),  # 29
        )

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = with_condition(self.encoder(x), condition)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.from_z(with_condition(z, condition)).view(-1, 64, *self.top)
        return self.decoder(h)[:, :, :self.height, :self.width]  # the lecture's Trim: 29x29 -> 28x28
