"""The latent-diffusion KL autoencoder (Stable Diffusion's VAE family: LDM's kl-f4/f8, SD's kl-f8,
SDXL's, Flux's 16-channel one) as a fastvae.VAE: diffusers' `AutoencoderKL` (the architecture and
the format users share: config.json + diffusion_pytorch_model.safetensors), not a copy of it.

Its latent is C x h x w; fastvae's reparameterization + KL op sees it flattened to [batch, C*h*w],
so every element's noise is keyed as any latent's is (resume and N processes stay exact), and decode
gets it back in shape. Images are in [-1, 1] inside, as diffusers and LDM have them: encode takes
fastvae's [0, 1] images and maps them; decode returns diffusers' output ([-1, 1], not logits), which
`pixels` leaves as it is and `images` maps back. The posterior's log-variance is clamped to
[-30, 20] as diffusers' DiagonalGaussianDistribution does.
"""

from __future__ import annotations

import inspect
import math
from pathlib import Path

import torch
from torch import nn

from fastvae.errors import UserError
from fastvae.models.base import VAE
from fastvae.models.diffusers_folders import WEIGHTS_FILE, read_checked_weights

LOGVAR_RANGE = (-30.0, 20.0)


def autoencoder_kl_class():
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise UserError(f"model.name=kl_autoencoder needs diffusers ({err}); expected `pip install "
                        f"'fastvae[ldm]'` (scripts/setup.sh installs it)") from None
    return AutoencoderKL


class KLAutoencoder(VAE):
    """diffusers' AutoencoderKL with `len(block_out_channels)` levels (factor f = 2^(levels - 1));
    any other AutoencoderKL argument (scaling_factor, shift_factor, act_fn, mid_block_add_attention,
    ...) passes through."""

    def __init__(self, in_channels: int = 3, image_size: tuple[int, int] = (64, 64),
                 block_out_channels: tuple[int, ...] = (64, 128, 128), layers_per_block: int = 1,
                 latent_channels: int = 4, norm_num_groups: int = 32, **diffusers_kwargs) -> None:
        super().__init__()
        levels, grid = latent_grid(in_channels, image_size, block_out_channels, layers_per_block, latent_channels,
                                   norm_num_groups, "autoencoder")
        height = image_size[0]
        self.vae = autoencoder_kl_class()(
            in_channels=in_channels, out_channels=in_channels, down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block, latent_channels=latent_channels, norm_num_groups=norm_num_groups,
            sample_size=height, **diffusers_kwargs)
        self.latent_shape = (latent_channels, *grid)
        self.latent_dim = math.prod(self.latent_shape)
        # LDM's one output log-variance (loss.objective=ldm); fixed unless loss.learn_logvar. Not part of
        # diffusers' model: export leaves it out.
        self.nll_logvar = nn.Parameter(torch.zeros(()))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x * 2 - 1).latent_dist
        return posterior.mean.flatten(1), posterior.logvar.flatten(1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z.view(-1, *self.latent_shape)).sample

    def pixels(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def images(self, output: torch.Tensor) -> torch.Tensor:
        return (output.clamp(-1, 1) + 1) / 2

    def last_layer(self) -> nn.Parameter:
        return self.vae.decoder.conv_out.weight

    def output_logvar(self) -> nn.Parameter:
        return self.nll_logvar

    def enable_gradient_checkpointing(self) -> None:
        self.vae.enable_gradient_checkpointing()

    def trainable_for_decoder_only(self) -> None:
        """Freeze the encoder (and quant_conv): the decoder learns to draw the latents it already gets."""
        self.vae.encoder.requires_grad_(False)
        if self.vae.quant_conv is not None:
            self.vae.quant_conv.requires_grad_(False)


def latent_grid(in_channels, image_size, block_out_channels, layers_per_block, latent_channels, norm_num_groups,
                what: str) -> tuple[int, tuple[int, int]]:
    """(levels, the latent's h x w) of diffusers' Encoder / Decoder blocks for images of image_size, the
    arguments checked (check_architecture) and the size divisible by the factor f = 2^(levels - 1)."""
    check_architecture(in_channels, block_out_channels, layers_per_block, latent_channels, norm_num_groups)
    levels = len(block_out_channels)
    factor = 2 ** (levels - 1)
    height, width = image_size
    if height % factor or width % factor:
        raise ValueError(f"data.image_size {height}x{width} is not divisible by the {what}'s factor {factor} "
                         f"(2^(levels - 1), {levels} levels of block_out_channels)")
    return levels, (height // factor, width // factor)


def check_architecture(in_channels, block_out_channels, layers_per_block, latent_channels, norm_num_groups) -> None:
    """The arguments diffusers would take and then fail on deep inside (a ZeroDivisionError, a message
    about block types), each named with what it takes: ValueError, one line."""
    def count(value) -> bool:
        return type(value) is int and value > 0

    if not (isinstance(block_out_channels, (list, tuple)) and 1 <= len(block_out_channels) <= MAX_LEVELS
            and all(count(c) for c in block_out_channels)):
        shown = repr(block_out_channels)
        raise ValueError(f"block_out_channels {shown if len(shown) < 60 else shown[:57] + '...'}: expected a list of "
                         f"1 to {MAX_LEVELS} positive channel counts, e.g. [64, 128, 128]")
    for name, value in (("in_channels", in_channels), ("layers_per_block", layers_per_block),
                        ("latent_channels", latent_channels), ("norm_num_groups", norm_num_groups)):
        if not count(value):
            raise ValueError(f"{name} {value!r}: expected a positive integer")
    if any(c % norm_num_groups for c in block_out_channels):
        raise ValueError(f"norm_num_groups {norm_num_groups}: expected a divisor of every block_out_channels "
                         f"{list(block_out_channels)} (GroupNorm splits each into that many groups)")


MAX_LEVELS = 8


# ---------------------------------------------------------------- diffusers' folders


def architecture_of(config: dict) -> dict:
    """model.kwargs that rebuild the folder's AutoencoderKL (its constructor's arguments, less what
    fastvae derives: block types from the level count, out_channels = in_channels, sample_size)."""
    derived = {"self", "down_block_types", "up_block_types", "out_channels", "sample_size", "in_channels"}
    accepted = set(inspect.signature(autoencoder_kl_class().__init__).parameters) - derived
    kwargs = {k: v for k, v in config.items() if k in accepted and not k.startswith("_")}
    levels = len(config.get("block_out_channels", ()))
    if config.get("down_block_types") not in (None, ["DownEncoderBlock2D"] * levels) or \
            config.get("up_block_types") not in (None, ["UpDecoderBlock2D"] * levels):
        raise UserError("model.pretrained: block types other than DownEncoderBlock2D / UpDecoderBlock2D are not "
                        "an LDM-style KL autoencoder; expected those")
    return kwargs


def load_autoencoder_kl(model: KLAutoencoder, folder: str | Path) -> None:
    """The folder's safetensors weights into the model's AutoencoderKL (never a pickle)."""
    model.vae.load_state_dict(read_checked_weights(Path(folder) / WEIGHTS_FILE, model.vae.state_dict(), "AutoencoderKL"))


def export_diffusers(model: KLAutoencoder, out: str | Path) -> Path:
    """The model as a diffusers folder that AutoencoderKL.from_pretrained loads (safetensors)."""
    out = Path(out)
    model.vae.save_pretrained(str(out), safe_serialization=True)
    return out
