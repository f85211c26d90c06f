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

from fastvae.errors import UserError, read_json
from fastvae.models.base import VAE

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
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


def read_folder_config(folder: str | Path, class_name: str = "AutoencoderKL") -> dict:
    """A diffusers AutoencoderKL (or VQModel) folder's config.json, checked: one line for anything else."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise UserError(f"model.pretrained '{folder}' not found; expected a diffusers {class_name} folder "
                        f"(config.json + {WEIGHTS_FILE})")
    if not path.is_file():
        example = ", e.g. a local copy of stabilityai/sd-vae-ft-mse" if class_name == "AutoencoderKL" else ""
        raise UserError(f"model.pretrained '{folder}' has no {CONFIG_FILE}; expected a diffusers {class_name} "
                        f"folder (config.json + {WEIGHTS_FILE}){example}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"model.pretrained '{path}' has {path.stat().st_size:,} bytes; expected diffusers' config "
                        f"(a few KB, at most {MAX_CONFIG_BYTES:,})")
    config = read_json(path, lambda err: f"model.pretrained '{path}' is not JSON ({type(err).__name__}); expected "
                                         f"diffusers' config")
    bad = non_finite_key(config)
    if bad is not None:
        raise UserError(f"model.pretrained '{path}': {bad} is not a finite number; expected diffusers' config "
                        f"with finite values")
    for key in INTEGER_KEYS:
        if isinstance(config, dict) and config.get(key) is not None and type(config[key]) is not int:
            raise UserError(f"model.pretrained '{path}': {key} is {config[key]!r} ({type(config[key]).__name__}); "
                            f"expected an integer")
    if not isinstance(config, dict) or config.get("_class_name") != class_name:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise UserError(f"model.pretrained '{folder}' holds a {found!r}; expected a {class_name} folder")
    if not (folder / WEIGHTS_FILE).is_file():
        why = (f" (only the pickle {PICKLED_WEIGHTS}, which is never read: loading it could run code)"
               if (folder / PICKLED_WEIGHTS).exists() else "")
        raise UserError(f"model.pretrained '{folder}' has no {WEIGHTS_FILE}{why}; expected safetensors weights "
                        f"(diffusers' save_pretrained writes them)")
    return config


MAX_CONFIG_BYTES = 1 << 20
INTEGER_KEYS = ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size",
                "num_vq_embeddings", "vq_embed_dim")


def non_finite_key(value, where: str = "") -> str | None:
    """The first key (dotted) whose number is NaN or infinite, anywhere in a JSON value; else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where or "the value"
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found = non_finite_key(inner, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


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


def load_pretrained(model, folder: str | Path) -> None:
    """The folder's safetensors weights into the model's AutoencoderKL, or a tokenizer's VQModel (never a pickle)."""
    if not isinstance(model, KLAutoencoder):
        from fastvae.models.vq_autoencoder import load_vqmodel

        return load_vqmodel(model, folder)
    model.vae.load_state_dict(read_checked_weights(Path(folder) / WEIGHTS_FILE, model.vae.state_dict(), "AutoencoderKL"))


def read_checked_weights(path: Path, expected_state: dict, class_name: str) -> dict:
    """A safetensors file holding exactly the tensors of expected_state, of their shapes: the header is
    read first, so a wrong file is one line before gigabytes are read."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    expected = {k: tuple(v.shape) for k, v in expected_state.items()}
    try:
        with safe_open(str(path), "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as err:  # safetensors' own error types
        raise UserError(f"model.pretrained file '{path}' is unreadable ({type(err).__name__}); expected safetensors") \
            from None
    wrong = [k for k in shapes if k in expected and shapes[k] != expected[k]]
    if wrong:
        raise UserError(f"model.pretrained file '{path}': {wrong[0]} is {list(shapes[wrong[0]])}, the configured "
                        f"{class_name} has {list(expected[wrong[0]])} ({len(wrong)} tensor(s) differ); expected the "
                        f"weights of its own config.json's architecture")
    missing, unexpected = expected.keys() - shapes.keys(), shapes.keys() - expected.keys()
    if missing or unexpected:
        raise UserError(f"model.pretrained '{path.parent}' does not fit the configured {class_name} (missing "
                        f"{len(missing)}, unexpected {len(unexpected)} tensors); expected its own config.json's "
                        f"architecture in model.kwargs")
    return load_file(str(path))


def resolve_pretrained(cfg) -> None:
    """model.pretrained's architecture into model.kwargs (what checkpoints record, so they rebuild
    without the folder); a key the user set to another value, or another channel count, is one line."""
    if not cfg.model.pretrained:
        return
    if not Path(cfg.model.pretrained).exists() and from_resumed_checkpoint(cfg):
        return
    tokenizer = cfg.model.name == "vq_autoencoder"
    config = read_folder_config(cfg.model.pretrained, "VQModel" if tokenizer else "AutoencoderKL")
    if config.get("in_channels", 3) != cfg.data.channels:
        raise UserError(f"model.pretrained '{cfg.model.pretrained}' takes {config.get('in_channels', 3)}-channel "
                        f"images; expected data.channels={config.get('in_channels', 3)}")
    typed = getattr(cfg, "command_line_keys", set())
    replaced = []
    if tokenizer:
        from fastvae.models.vq_autoencoder import vqmodel_architecture

        kwargs, quantizer = vqmodel_architecture(config)
    else:
        kwargs, quantizer = architecture_of(config), {}
    for key, value in kwargs.items():
        given = cfg.model.kwargs.get(key)
        if given is not None and given != value:
            if f"model.kwargs.{key}" in typed:
                raise UserError(f"config key 'model.kwargs.{key}': {given!r}, but model.pretrained's config.json "
                                f"says {value!r}; expected them equal (or leave it out)")
            replaced.append(f"{key}={value!r}")
        cfg.model.kwargs[key] = value
    for key, value in quantizer.items():
        given = getattr(cfg.quantizer, key)
        if given != value:
            if f"quantizer.{key}" in typed:
                raise UserError(f"config key 'quantizer.{key}': {given!r}, but model.pretrained's VQModel has "
                                f"{value!r}; expected them equal (or leave it out)")
            replaced.append(f"quantizer.{key}={value!r}")
            setattr(cfg.quantizer, key, value)
    if replaced:
        print(f"fastvae: model.pretrained's architecture replaces the config file's model.kwargs: "
              f"{', '.join(replaced)[:300]}", flush=True)


def from_resumed_checkpoint(cfg) -> bool:
    """Resuming a run whose model.pretrained folder is gone: the checkpoint recorded the architecture
    (and holds the weights), so it is taken from there and the folder is not needed (said in one line)."""
    from fastvae.checkpoint import read_meta, resolve_resume
    from fastvae.config import from_dict

    if not cfg.train.resume:
        return False
    try:
        found = resolve_resume(cfg.train.resume, cfg.out_dir, announce=lambda *_: None)
    except UserError:
        return False
    if found is None:
        return False
    saved = from_dict(read_meta(found)["config"]).model.kwargs
    typed = getattr(cfg, "command_line_keys", set())
    cfg.model.kwargs = {**saved, **{k: v for k, v in cfg.model.kwargs.items() if f"model.kwargs.{k}" in typed}}
    print(f"fastvae: model.pretrained '{cfg.model.pretrained}' is not here; resuming {found}, whose config records "
          f"the architecture and whose weights replace the folder's", flush=True)
    cfg.model.pretrained = ""  # (the checkpoint's weights are loaded over the model anyway)
    return True


def export_diffusers(model: KLAutoencoder, out: str | Path) -> Path:
    """The model as a diffusers folder that AutoencoderKL.from_pretrained loads (safetensors)."""
    out = Path(out)
    model.vae.save_pretrained(str(out), safe_serialization=True)
    return out
