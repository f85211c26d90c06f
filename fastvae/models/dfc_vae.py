"""Face VAE after Hou et al., "Deep Feature Consistent Variational Autoencoder" (2016).

Encoder: 4x4 stride-2 convs (32, 64, 128, 256 channels) with BatchNorm and
LeakyReLU down to 4x4, then linear layers to mu and logvar (latent 200).
Decoder: linear to 256x4x4, then nearest-neighbour upsampling + 3x3 conv blocks
back to full size; the last conv gives 3-channel logits. Dropout after each
hidden block regularizes the large latent, as in the lecture's CelebA VAE.
Any H x W: the stride-2 blocks halve the smaller side down to 4-7 pixels (64 and
128 px keep the paper's 4 and 5 blocks exactly).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvae.models.base import VAE, with_condition

BASE_CHANNELS = (32, 64, 128, 256)


def feature_sizes(height: int, width: int) -> list[tuple[int, int]]:
    """(H, W) after each stride-2 block, input first: blocks halve the smaller side down to 4-7
    pixels (64 px: 4 blocks to 4x4, 128 px: 5 blocks, 48x80: 3 blocks to 6x10), at least one block."""
    if min(height, width) < 2:
        raise ValueError(f"DFCVAE needs images of at least 2x2 pixels, got {height}x{width}")
    blocks = max(1, int(math.log2(min(height, width) / 4)))
    sizes = [(height, width)]
    for _ in range(blocks):
        sizes.append((sizes[-1][0] // 2, sizes[-1][1] // 2))  # 4x4 conv, stride 2, padding 1: floor(n / 2)
    return sizes


def upsample_to(size: tuple[int, int], current: tuple[int, int]) -> nn.Upsample:
    """Nearest upsampling back to an encoder size: x2 where that is exact (64 and 128 px: the
    paper's layers), else to the size itself (odd sides, e.g. 50 -> 25 -> 12 comes back 12 -> 25 -> 50)."""
    if size == (2 * current[0], 2 * current[1]):
        return nn.Upsample(scale_factor=2, mode="nearest")
    return nn.Upsample(size=size, mode="nearest")


class DFCVAE(VAE):
    def __init__(self, latent_dim: int = 200, in_channels: int = 3, image_size: int | tuple[int, int] = 64,
                 dropout: float = 0.0, condition_dim: int = 0) -> None:
        super().__init__()
        self.latent_dim, self.condition_dim = latent_dim, condition_dim
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        sizes = feature_sizes(height, width)
        chans = [BASE_CHANNELS[min(i, len(BASE_CHANNELS) - 1)] for i in range(len(sizes) - 1)]
        layers, prev = [], in_channels
        for c in chans:
            layers += [nn.Conv2d(prev, c, kernel_size=4, stride=2, padding=1),
                       nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.Dropout2d(dropout)]
            prev = c
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.top_channels, self.top_size = chans[-1], sizes[-1]
        flat = chans[-1] * sizes[-1][0] * sizes[-1][1]
        self.to_mu = nn.Linear(flat + condition_dim, latent_dim)  # the condition joins features and z
        self.to_logvar = nn.Linear(flat + condition_dim, latent_dim)
        self.from_z = nn.Linear(latent_dim + condition_dim, flat)

        layers = []
        up_chans = list(reversed(chans[:-1])) + [in_channels]  # e.g. 128, 64, 32, 3
        prev = chans[-1]
        for i, c in enumerate(up_chans):
            layers += [upsample_to(sizes[-2 - i], sizes[-1 - i]),
                       # zero padding, not the paper's replication padding: under torch.compile
                       # replication_pad2d_backward fails an inductor stride check (torch 2.14.1)
                       nn.Conv2d(prev, c, kernel_size=3, stride=1, padding=1)]
            if i < len(up_chans) - 1:  # the last conv gives logits: no norm, no activation
                layers += [nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.Dropout2d(dropout)]
            prev = c
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = with_condition(self.encoder(x), condition)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        h = self.from_z(with_condition(z, condition)).view(-1, self.top_channels, *self.top_size)
        return self.decoder(h)
