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
                 mid_block_add_attention: bool = True, embed_dim: int | None = None) -> None:
        """embed_dim: the quantized latent's channels (quant_conv maps latent_channels to it: diffusers'
        VQModel's vq_embed_dim); default latent_channels."""
        super().__init__()
        from diffusers.models.autoencoders.vae import Decoder, Encoder

        levels, grid = latent_grid(in_channels, image_size, block_out_channels, layers_per_block, latent_channels,
                                   norm_num_groups, "tokenizer")
        embed_dim = embed_dim or latent_channels
        blocks = {"block_out_channels": tuple(block_out_channels), "layers_per_block": layers_per_block,
                  "norm_num_groups": norm_num_groups, "mid_block_add_attention": mid_block_add_attention}
        self.architecture = {"in_channels": in_channels, "image_size": tuple(image_size), "latent_channels":
                             latent_channels, "embed_dim": embed_dim, "levels": levels, **blocks}
        self.encoder = Encoder(in_channels, latent_channels, ("DownEncoderBlock2D",) * levels, double_z=False, **blocks)
        self.quant_conv = nn.Conv2d(latent_channels, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, latent_channels, 1)
        self.decoder = Decoder(latent_channels, in_channels, ("UpDecoderBlock2D",) * levels, **blocks)
        spec = dict(quantizer or {"kind": "vq"})
        self.quantizer = build_quantizer(embed_dim, spec, spec.pop("seed", 0))
        self.latent_shape = (embed_dim, *grid)
        self.latent_dim = math.prod(self.latent_shape)
        self.nll_logvar = nn.Parameter(torch.zeros(()))  # LDM's output log-variance (loss.objective=ldm)

    def bottleneck(self) -> nn.Module:
        return self.quantizer

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> z_e [B, embed_dim, h, w], before quantization."""
        return self.quant_conv(self.encoder(x * 2 - 1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Quantized latents [B, embed_dim, h, w] (or flattened) -> pixels in [-1, 1]."""
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


# ---------------------------------------------------------------- diffusers' VQModel format

VQMODEL_PARTS = ("encoder.", "quant_conv.", "post_quant_conv.", "decoder.")  # the same names in both models
VQMODEL_CODEBOOK = "quantize.embedding.weight"


def plain_codebook(model: VQAutoencoder) -> torch.Tensor:
    """The codebook diffusers' VQModel can hold (nearest code by squared L2 in the latent itself); one
    line for any other quantizer, whose checkpoint stays fastvae's own."""
    from fastvae.errors import UserError
    from fastvae.quantizers import VectorQuantizer

    q = model.quantizer
    if not isinstance(q, VectorQuantizer) or q.l2 or q.code_dim != q.dim:
        kind = type(q).__name__ if not isinstance(q, VectorQuantizer) else "a VQ with l2 or code_dim"
        raise UserError(f"the tokenizer's quantizer is {kind}; expected a plain codebook (quantizer.kind=vq without "
                        f"l2 or code_dim) for diffusers' VQModel format (the others stay in fastvae's checkpoint)")
    return q.codebook.detach()


def vqmodel_config(model: VQAutoencoder) -> dict:
    """diffusers VQModel's constructor arguments for the model's architecture."""
    a = model.architecture
    return {"in_channels": a["in_channels"], "out_channels": a["in_channels"],
            "down_block_types": ("DownEncoderBlock2D",) * a["levels"],
            "up_block_types": ("UpDecoderBlock2D",) * a["levels"], "block_out_channels": a["block_out_channels"],
            "layers_per_block": a["layers_per_block"], "latent_channels": a["latent_channels"],
            "sample_size": a["image_size"][0], "num_vq_embeddings": model.quantizer.codebook_size,
            "norm_num_groups": a["norm_num_groups"], "vq_embed_dim": a["embed_dim"],
            "mid_block_add_attention": a["mid_block_add_attention"]}


def export_vqmodel(model: VQAutoencoder, out) -> None:
    """The tokenizer as a folder diffusers.VQModel.from_pretrained loads (safetensors)."""
    from diffusers import VQModel

    codebook = plain_codebook(model)
    vq = VQModel(**vqmodel_config(model))
    state = {k: v for k, v in model.state_dict().items() if k.startswith(VQMODEL_PARTS)}
    vq.load_state_dict({**state, VQMODEL_CODEBOOK: codebook}, strict=True)
    vq.save_pretrained(str(out), safe_serialization=True)


def vqmodel_architecture(config: dict) -> tuple[dict, dict]:
    """(model.kwargs, quantizer keys) that rebuild a VQModel folder's model; one line for what fastvae's
    tokenizer is not (other blocks or activations, spatial norm)."""
    from fastvae.errors import UserError

    levels = len(config.get("block_out_channels", ()))
    if config.get("down_block_types") not in (None, ["DownEncoderBlock2D"] * levels) or \
            config.get("up_block_types") not in (None, ["UpDecoderBlock2D"] * levels) or \
            config.get("act_fn", "silu") != "silu" or config.get("norm_type", "group") != "group":
        raise UserError("model.pretrained: a VQModel with other blocks, activation or norm than "
                        "DownEncoderBlock2D / UpDecoderBlock2D, silu, group norm; expected those (fastvae's tokenizer)")
    kwargs = {k: config[k] for k in ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
                                      "mid_block_add_attention") if k in config}
    kwargs["embed_dim"] = config.get("vq_embed_dim") or config.get("latent_channels", 3)
    return kwargs, {"kind": "vq", "codebook_size": config.get("num_vq_embeddings", 256), "code_dim": 0, "l2": False}


def load_vqmodel(model: VQAutoencoder, folder) -> None:
    """A VQModel folder's safetensors weights into the model: its blocks and its codebook."""
    from pathlib import Path

    from fastvae.models.diffusers_folders import WEIGHTS_FILE, read_checked_weights

    plain_codebook(model)
    own = {k: v for k, v in model.state_dict().items() if k.startswith(VQMODEL_PARTS)}
    state = read_checked_weights(Path(folder) / WEIGHTS_FILE, {**own, VQMODEL_CODEBOOK: model.quantizer.codebook},
                                 "VQModel")
    with torch.no_grad():
        model.quantizer.codebook.copy_(state.pop(VQMODEL_CODEBOOK))
        if model.quantizer.ema_decay:  # the moving averages start at the codebook
            model.quantizer.embed_sum.copy_(model.quantizer.codebook)
    model.load_state_dict(state, strict=False)
