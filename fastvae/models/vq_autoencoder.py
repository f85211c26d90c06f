"""A discrete tokenizer (VQGAN / MaskGIT / LlamaGen family) as a fastvae.VAE: diffusers' Encoder and
Decoder blocks (the ones AutoencoderKL and VQModel are made of, not a copy of them) around one of
fastvae's quantizers (fastvae/quantizers.py: VQ with its options, FSQ, LFQ), which the model owns: the
codebook and its state are the model's, in its checkpoints and at inference.

The latent is latent_channels x h x w (factor f = 2^(levels - 1)); every position is one token.
Images are in [-1, 1] inside, as LDM and taming-transformers have them; decode returns pixels
([-1, 1], not logits), which `pixels` leaves as they are and `images` maps back to [0, 1].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastvae.models.base import VAE
from fastvae.models.kl_autoencoder import latent_grid
from fastvae.quantizers import build_quantizer


class VQAutoencoder(VAE):
    """quantizer: the `quantizer` config section as a mapping (kind vq / fsq / lfq and its knobs)."""

    def __init__(self, in_channels: int = 3, image_size: tuple[int, int] = (64, 64),
                 block_out_channels: tuple[int, ...] = (64, 128, 128), layers_per_block: int = 1,
                 latent_channels: int = 8, norm_num_groups: int = 32, quantizer: dict | None = None,
                 mid_block_add_attention: bool = True) -> None:
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        levels, grid = latent_grid(in_channels, image_size, block_out_channels, layers_per_block, latent_channels,
                                   norm_num_groups, "tokenizer")
        blocks = {"block_out_channels": tuple(block_out_channels), "layers_per_block": layers_per_block,
                  "norm_num_groups": norm_num_groups, "mid_block_add_attention": mid_block_add_attention}
        self.encoder = Encoder(in_channels, latent_channels, ("DownEncoderBlock2D",) * levels, double_z=False, **blocks)
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1)
        self.decoder = Decoder(latent_channels, in_channels, ("UpDecoderBlock2D",) * levels, **blocks)
        spec = dict(quantizer or {"kind": "vq"})
        self.quantizer = build_quantizer(latent_channels, spec, spec.pop("seed", 0))
        self.latent_shape = (latent_channels, *grid)
        self.latent_dim = math.prod(self.latent_shape)
        self.nll_logvar = nn.Parameter(torch.zeros(()))  # LDM's output log-variance (loss.objective=ldm)

    def bottleneck(self) -> nn.Module:
        return self.quantizer

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> z_e [B, latent_channels, h, w], before quantization."""
        return self.quant_conv(self.encoder(x * 2 - 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, latent_channels, h, w] (or flattened) -> pixels in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z.view(-1, *self.latent_shape)))

    def pixels(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def images(self, output: torch.Tensor) -> torch.Tensor:
        return (output.clamp(-1, 1) + 1) / 2

    def last_layer(self) -> nn.Parameter:
        return self.decoder.conv_out.weight

    def output_logvar(self) -> nn.Parameter:
        return self.nll_logvar

    def enable_gradient_checkpointing(self) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = True
