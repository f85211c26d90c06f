"""A VAE of your own for fastvae: an MLP encoder and decoder, for any image size and channel count."""

import torch
from torch import nn

import fastvae


class MLPVAE(fastvae.VAE):
    """in_channels, image_size (height, width) and latent_dim come from the config's data.* and
    model.latent_dim; hidden comes from model.kwargs."""

    def __init__(self, in_channels: int, image_size: tuple[int, int], latent_dim: int, hidden: int = 256):
        super().__init__()
        self.latent_dim = latent_dim
        self.shape = (in_channels, *image_size)
        pixels = in_channels * image_size[0] * image_size[1]
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(pixels, hidden), nn.ReLU())
        self.to_mu = nn.Linear(hidden, latent_dim)
        self.to_logvar = nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.ReLU(), nn.Linear(hidden, pixels))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)  # x: [batch, C, H, W] in [0, 1]
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, *self.shape)  # logits: images are sigmoid(logits)
