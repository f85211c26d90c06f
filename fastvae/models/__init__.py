"""Model registry: config.model.name -> VAE."""

from __future__ import annotations

from fastvae.models.base import VAE
from fastvae.models.conv_vae import ConvVAE
from fastvae.models.dfc_vae import DFCVAE

__all__ = ["VAE", "ConvVAE", "DFCVAE", "build_model"]


def build_model(cfg) -> VAE:
    """Build the model a `fastvae.config.Config` describes."""
    if cfg.model.name == "conv_vae":
        return ConvVAE(latent_dim=cfg.model.latent_dim, in_channels=cfg.data.channels)
    if cfg.model.name == "dfc_vae":
        return DFCVAE(latent_dim=cfg.model.latent_dim, in_channels=cfg.data.channels,
                      image_size=cfg.data.image_size, dropout=cfg.model.dropout)
    raise ValueError(f"model {cfg.model.name!r}: expected conv_vae or dfc_vae")
