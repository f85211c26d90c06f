"""diffusers' model folders (config.json + diffusion_pytorch_model.safetensors), read with every check a
hostile folder needs: what the KL autoencoder (AutoencoderKL) and the tokenizer (VQModel) share when
they start from one (fastvae/models/__init__.py: resolve_pretrained, load_pretrained)."""

from __future__ import annotations

import math
from pathlib import Path

from fastvae.errors import UserError, read_json

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"


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
        article = "an" if class_name[0] in "AEIOU" else "a"
        raise UserError(f"model.pretrained '{folder}' holds a {found!r}; expected {article} {class_name} folder")
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


def apply_architecture(cfg, config: dict, kwargs: dict, quantizer: dict) -> None:
    """A diffusers folder's architecture into cfg.model.kwargs (and a VQModel's codebook into cfg.quantizer):
    what checkpoints record, so they rebuild without the folder. A key the user typed with another value,
    or another channel count, is one line; a config file's value is replaced, said in one line."""
    if config.get("in_channels", 3) != cfg.data.channels:
        raise UserError(f"model.pretrained '{cfg.model.pretrained}' takes {config.get('in_channels', 3)}-channel "
                        f"images; expected data.channels={config.get('in_channels', 3)}")
    typed = getattr(cfg, "command_line_keys", set())
    replaced = []
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
