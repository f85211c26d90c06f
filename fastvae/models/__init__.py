"""Model registry: config.model -> a VAE, built-in by name or a user's class by import path.

A model is rebuilt from its name and JSON kwargs alone (a checkpoint records both in its config):
no pickled code is ever read to make one.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import sys
from pathlib import Path

import torch

from fastvae.config import image_hw
from fastvae.checkpoint import META_FILE
from fastvae.errors import UserError
from fastvae.models.base import VAE
from fastvae.models.conv_vae import ConvVAE
from fastvae.models.dfc_vae import DFCVAE
from fastvae.models.diffusers_folders import apply_architecture, from_resumed_checkpoint, read_folder_config
from fastvae.models.kl_autoencoder import KLAutoencoder, architecture_of, load_autoencoder_kl
from fastvae.models.vq_autoencoder import VQAutoencoder, load_vqmodel, vqmodel_architecture

__all__ = ["VAE", "ConvVAE", "DFCVAE", "KLAutoencoder", "VQAutoencoder", "build_model", "model_class", "check_model",
           "resolve_pretrained", "load_pretrained"]

BUILT_IN = {"conv_vae": ConvVAE, "dfc_vae": DFCVAE, "kl_autoencoder": KLAutoencoder, "vq_autoencoder": VQAutoencoder}
DRY_RUN_IMAGES = 2


def model_class(name: str, trusted: tuple[str, ...] | None = None) -> type:
    """The class `model.name` names: a built-in, or `package.module:ClassName` imported from where
    training runs (the working directory, as `python -m` has it, and PYTHONPATH).

    Importing a module runs its code, so a name read from a checkpoint (`trusted` given: the
    modules or import paths the user allowed, e.g. `--trust-model my_vae`) is imported only when the
    user allowed it; a name from the user's own config (`trusted` None: training) always is. A
    module is never imported from inside a checkpoint folder, allowed or not."""
    if name in BUILT_IN:
        return BUILT_IN[name]
    module_name, _, class_name = name.partition(":")
    if trusted is not None and not ({name, module_name} & set(trusted)):
        raise UserError(f"model.name {name!r} is code outside fastvae (module {module_name!r}) and was not "
                        f"imported; expected --trust-model {module_name} (in Python: trust_model="
                        f"{module_name!r}) if you trust that module: importing it runs it")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `fastvae` command sees what python -m sees
        sys.path.insert(0, os.getcwd())
    inside = checkpoint_folder_on_path(module_name)
    if inside is not None:
        raise UserError(f"model.name {name!r}: module {module_name!r} lies inside the checkpoint folder '{inside}' "
                        f"and was not imported; expected a module of your own code, outside any checkpoint")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or whatever the module raised while importing
        raise UserError(f"model.name {name!r}: module {module_name!r} cannot be imported ({type(err).__name__}: "
                        f"{err}); expected a module importable here: in the working directory or on PYTHONPATH")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise UserError(f"model.name {name!r}: module {module_name!r} has no {class_name!r}; expected a class there")
    if not (isinstance(cls, type) and issubclass(cls, VAE)):
        raise UserError(f"model.name {name!r}: {class_name} is not a subclass of fastvae.VAE; expected a class "
                        f"that subclasses fastvae.VAE and implements encode and decode")
    return cls


def checkpoint_folder_on_path(module_name: str) -> Path | None:
    """The checkpoint folder (one holding fastvae.json) that importing `module_name` would pass
    through, found without importing anything: a checkpoint may not bring the code that loads it."""
    parts = module_name.split(".")
    for entry in sys.path:
        folder = Path(entry or os.getcwd())
        for part in parts:
            folder = folder / part
            if (folder / META_FILE).is_file():
                return folder
    return None


def _data_kwargs(cls: type, cfg) -> dict:
    """What the data and config say, for the constructor arguments the class names (or all of them
    when it takes **kwargs): in_channels, image_size as (height, width), latent_dim; and for a
    conditional model (model.condition) condition_dim, which the class must take."""
    offered = {"in_channels": cfg.data.channels, "image_size": image_hw(cfg.data), "latent_dim": cfg.model.latent_dim}
    if cls is DFCVAE:
        offered["dropout"] = cfg.model.dropout
    if cls in (KLAutoencoder, VQAutoencoder):  # latent_channels x h x w (model.kwargs), not model.latent_dim
        del offered["latent_dim"]
    if cfg.quantizer.kind != "none":  # a tokenizer's quantizer, which the model owns (its codebook is model state)
        offered["quantizer"] = {**dataclasses.asdict(cfg.quantizer), "seed": cfg.seed}
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if cfg.model.condition != "none":
        if not (takes_any or "condition_dim" in params):
            raise UserError(f"model {cfg.model.name}: model.condition={cfg.model.condition} needs a conditional model; "
                            f"expected a constructor parameter condition_dim and encode(x, condition), "
                            f"decode(z, condition) (docs/custom_model.md)")
        offered["condition_dim"] = len(cfg.model.condition_names)
    if takes_any:
        return offered
    return {k: v for k, v in offered.items() if k in params}


def model_kwargs(cls: type, cfg) -> dict:
    """The constructor's arguments: what the data and config offer (_data_kwargs), then model.kwargs."""
    return {**_data_kwargs(cls, cfg), **cfg.model.kwargs}


def build_model(cfg, trusted: tuple[str, ...] | None = None) -> VAE:
    """The model `cfg.model` describes, for the images `cfg.data` describes; one dry forward on two
    images proves it fits them (check_model). trusted: see model_class."""
    cls = model_class(cfg.model.name, trusted)
    kwargs = model_kwargs(cls, cfg)
    try:
        model = cls(**kwargs)
    except (TypeError, ValueError) as err:  # unexpected arguments, or values (a size) it cannot take
        shown = repr(kwargs) if len(repr(kwargs)) <= 160 else repr(kwargs)[:157] + "..."
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise UserError(f"model {cfg.model.name}: the constructor rejected its arguments ({reason}); expected "
                        f"model.kwargs, data.channels and data.image_size that {cls.__name__} accepts (given "
                        f"{shown})") from None
    if not isinstance(model, VAE):
        raise UserError(f"model {cfg.model.name}: the constructor did not return a fastvae.VAE")
    condition_dim = len(cfg.model.condition_names) if cfg.model.condition != "none" else 0
    check_model(model, cfg.model.name, cfg.data.channels, *image_hw(cfg.data), condition_dim)
    return model


def check_model(model: VAE, name: str, channels: int, height: int, width: int, condition_dim: int = 0) -> None:
    """Encode and decode two images in eval mode, without gradients and without touching any RNG
    or BatchNorm statistic: a model that does not fit the images fails here, in one line, rather
    than at step 500. Sets model.latent_dim from mu when the model does not set it."""
    shape = (channels, height, width)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            x = torch.rand(DRY_RUN_IMAGES, *shape, generator=torch.Generator().manual_seed(0))
            condition = torch.zeros(DRY_RUN_IMAGES, condition_dim) if condition_dim else None
            encoded = model.encode_with(x, condition)
            if model.bottleneck() is not None:  # a tokenizer: encode gives z_e, its quantizer snaps it
                mu = model.bottleneck()(encoded).z.flatten(1)
                logvar = mu
            else:
                mu, logvar = _pair(encoded, name)
            logits = model.decode_with(mu, condition)
    except UserError:
        raise
    except Exception as err:  # whatever the user's layers raise
        message = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"model {name} failed on {DRY_RUN_IMAGES} images of {'x'.join(map(str, shape))} "
                        f"({type(err).__name__}: {message}); expected a model for this data.channels and "
                        f"data.image_size") from None
    finally:
        model.train(was_training)
    if mu.shape != logvar.shape or mu.dim() != 2 or mu.shape[0] != DRY_RUN_IMAGES:
        raise UserError(f"model {name}: encode gave mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)}; expected "
                        f"both [batch, latent_dim], here [{DRY_RUN_IMAGES}, latent_dim]")
    if tuple(logits.shape) != (DRY_RUN_IMAGES, *shape):
        raise UserError(f"model {name}: decode gave {tuple(logits.shape)} for {DRY_RUN_IMAGES} images of "
                        f"{'x'.join(map(str, shape))}; expected {(DRY_RUN_IMAGES, *shape)} (one logit per pixel)")
    if condition_dim:
        model.condition_dim = condition_dim
    if getattr(model, "latent_dim", None) is None:
        model.latent_dim = mu.shape[1]
    elif model.latent_dim != mu.shape[1]:
        raise UserError(f"model {name}: latent_dim is {model.latent_dim} but encode gave {mu.shape[1]} dimensions; "
                        f"expected them equal")


def _pair(encoded, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(encoded, (tuple, list)) and len(encoded) == 2 and all(torch.is_tensor(t) for t in encoded)):
        raise UserError(f"model {name}: encode returned {type(encoded).__name__}; expected a pair (mu, logvar) of tensors")
    return encoded[0], encoded[1]


# ---------------------------------------------------------------- model.pretrained: a diffusers folder


def resolve_pretrained(cfg) -> None:
    """model.pretrained's architecture (an AutoencoderKL folder for kl_autoencoder, a VQModel folder for
    vq_autoencoder) into the config, before anything is sized (fastvae/models/diffusers_folders.py)."""
    if not cfg.model.pretrained:
        return
    if not Path(cfg.model.pretrained).exists() and from_resumed_checkpoint(cfg):
        return
    if cfg.model.name == "vq_autoencoder":
        config = read_folder_config(cfg.model.pretrained, "VQModel")
        apply_architecture(cfg, config, *vqmodel_architecture(config))
    else:
        config = read_folder_config(cfg.model.pretrained, "AutoencoderKL")
        apply_architecture(cfg, config, architecture_of(config), {})


def load_pretrained(model, folder) -> None:
    """The folder's safetensors weights into the model built from its architecture (never a pickle)."""
    if isinstance(model, VQAutoencoder):
        load_vqmodel(model, folder)
    else:
        load_autoencoder_kl(model, folder)
