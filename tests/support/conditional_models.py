"""Users' conditional models, importable by model.name as conditional_models:Class (tests/support is
on pytest's pythonpath)."""

import torch
from torch import nn

from fastvae import VAE


class TinyConditionalVAE(VAE):
    """An MLP conditional VAE: takes condition_dim, and the condition in encode and decode."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], latent_dim: int, condition_dim: int) -> None:
        super().__init__()
        self.shape = (in_channels, *image_size)
        pixels = in_channels * image_size[0] * image_size[1]
        self.encoder = nn.Linear(pixels + condition_dim, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim + condition_dim, pixels)

    def encode(self, x, condition):
        return self.encoder(torch.cat([x.flatten(1), condition], 1)).chunk(2, dim=1)

    def decode(self, z, condition):
        return self.decoder(torch.cat([z, condition], 1)).view(-1, *self.shape)


class UnconditionalMLP(VAE):
    """No condition_dim: refused with model.condition set."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], latent_dim: int) -> None:
        super().__init__()
        self.shape = (in_channels, *image_size)
        pixels = in_channels * image_size[0] * image_size[1]
        self.encoder = nn.Linear(pixels, 2 * latent_dim)
        self.decoder = nn.Linear(latent_dim, pixels)

    def encode(self, x):
        return self.encoder(x.flatten(1)).chunk(2, dim=1)

    def decode(self, z):
        return self.decoder(z).view(-1, *self.shape)
