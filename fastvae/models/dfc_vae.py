"""Face VAE after Hou et al., "Deep Feature Consistent Variational Autoencoder" (2016).

Encoder: 4x4 stride-2 convs (32, 64, 128, 256 channels) with BatchNorm and
LeakyReLU down to 4x4, then linear layers to mu and logvar (latent 200).
Decoder: linear to 256x4x4, then nearest-neighbour upsampling + 3x3 conv blocks
back to full size; the last conv gives 3-channel logits. Dropout after each
hidden block regularizes the large latent, as in the lecture's CelebA VAE.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvae.config import MODEL_IMAGE_SIZES
from fastvae.models.base import VAE

BASE_CHANNELS = (32, 64, 128, 256)


def _channels(image_size: int) -> list[int]:
    if image_size not in MODEL_IMAGE_SIZES["dfc_vae"]:
        raise ValueError(f"DFCVAE image_size {image_size}: expected {' or '.join(map(str, MODEL_IMAGE_SIZES['dfc_vae']))}")
    blocks = int(math.log2(image_size // 4))  # 4 blocks for 64, 5 for 128
    return list(BASE_CHANNELS) + [BASE_CHANNELS[-1]] * (blocks - len(BASE_CHANNELS))


class DFCVAE(VAE):
    def __init__(self, latent_dim: int = 200, in_channels: int = 3, image_size: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        chans = _channels(image_size)
        layers, prev = [], in_channels
        for c in chans:
            layers += [nn.Conv2d(prev, c, kernel_size=4, stride=2, padding=1),
                       nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.Dropout2d(dropout)]
            prev = c
        self.encoder = nn.Sequential(*layers, nn.Flatten())
        self.top_channels = chans[-1]
        flat = chans[-1] * 4 * 4
        self.to_mu = nn.Linear(flat, latent_dim)
        self.to_logvar = nn.Linear(flat, latent_dim)
        self.from_z = nn.Linear(latent_dim, flat)

        layers = []
        up_chans = list(reversed(chans[:-1])) + [in_channels]  # e.g. 128, 64, 32, 3
        prev = chans[-1]
        for i, c in enumerate(up_chans):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       # zero padding, not the paper's replication padding: under torch.compile
                       # replication_pad2d_backward fails an inductor stride check (torch 2.14.1)
                       nn.Conv2d(prev, c, kernel_size=3, stride=1, padding=1)]
            if i < len(up_chans) - 1:  # the last conv gives logits: no norm, no activation
                layers += [nn.BatchNorm2d(c), nn.LeakyReLU(0.2), nn.Dropout2d(dropout)]
            prev = c
        self.decoder = nn.Sequential(*layers)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_z(z).view(-1, self.top_channels, 4, 4)
        return self.decoder(h)
