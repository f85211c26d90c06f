"""Typed run configuration: dataclasses <- YAML file <- `key=value` overrides.

Why hand-written rather than a config library: the stack is fixed (no hydra or
omegaconf), and what we need is small: nested dataclasses, dotted overrides,
strict type checks and one-line errors.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastvae.errors import UserError


@dataclass
class DataConfig:
    name: str = "mnist"  # mnist | fashion_mnist | imagefolder | celeba
    root: str = ""  # dataset location; "" = the dataset's default
    image_size: int = 28  # images are resized to image_size x image_size
    channels: int = 1
    center_crop: int = 0  # crop this square from the center before resizing; 0 = none
    test_fraction: float = 0.1  # held-out share for datasets without an official split
    split_seed: int = 0  # fixed seed of that split: independent of train.seed
    limit: int = 0  # use only the first `limit` training images; 0 = all
    batch_size: int = 128  # per process
    num_workers: int = 0
    drop_last: bool = True  # keeps DDP shards disjoint and equal in size
    loader: str = "torch"  # torch (DataLoader) | ffcv (a .beton written by `python -m fastvae.data.ffcv`)
    beton: str = ""  # data.loader=ffcv: the training .beton
    order: str = "random"  # data.loader=ffcv: random | quasi_random (less memory, not fully random)
    flip: bool = False  # data.loader=ffcv: random horizontal flips
    skip_corrupt: bool = False  # celeba / imagefolder: skip (and name) undecodable images instead of stopping
    label_attribute: str = "Smiling"  # celeba: the attribute used as the label (colors latent plots)
    test_split: str = "test"  # celeba: the official partition used as the test set (test | valid)


@dataclass
class ModelConfig:
    name: str = "conv_vae"  # conv_vae (the lecture's MNIST VAE) | dfc_vae (CelebA faces)
    latent_dim: int = 2
    dropout: float = 0.0


@dataclass
class LossConfig:
    recon: str = "bce"  # bce (Bernoulli decoder) | mse (Gaussian decoder)
    recon_weight: float = 1.0  # the lecture's alpha
    beta: float = 1.0  # weight of the KL term (1 = plain VAE)
    kl_warmup_steps: int = 0  # linear ramp of beta from 0 over this many steps; 0 = off


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 5e-4  # the lecture's learning rate
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    scheduler: str = "none"  # none | cosine | linear
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 = off


@dataclass
class TrainConfig:
    epochs: int = 30
    max_steps: int = 0  # stop after this many optimizer steps (the LR schedule still spans all epochs); 0 = off
    grad_accum_steps: int = 1
    # no | bf16 | fp16; null lets `accelerate launch --mixed_precision` decide
    mixed_precision: typing.Optional[str] = "no"
    compile: bool = False  # wrap the model in torch.compile
    ops: str = "auto"  # eager | compiled | triton | auto (triton on CUDA, else eager)
    cpu: bool = False  # force CPU even where a GPU exists
    checkpoint_every: int = 0  # also checkpoint every N steps; 0 = at epoch ends only
    keep_checkpoints: int = 2
    resume: str = ""  # "" = fresh run, "auto" = newest checkpoint in out_dir, or a path
    nonfinite: str = "stop"  # on a NaN/inf loss: stop (keep the last good checkpoint) | skip the batch
    log_every: int = 10  # steps between progress-bar / tracker updates
    record_sample_ids: bool = False  # write the dataset indices each rank trained on
    samples: int = 100  # images in the prior sample grid
    final_eval: bool = False  # run fastvae.evaluate on the test split at the end (writes eval.json)
    final_eval_iwae: int = 0  # importance samples K for that evaluation; 0 = ELBO only
    final_eval_images: int = 0  # evaluate only this many test images; 0 = all


@dataclass
class WandbConfig:  # used when logger=wandb
    project: str = "fastvae"
    entity: str = ""  # "" = your default W&B entity
    name: str = ""  # run name; "" = the out_dir folder's name
    group: str = ""  # e.g. one sweep's runs
    tags: list[str] = field(default_factory=list)
    log_images: bool = True  # per-epoch sample / reconstruction / latent pictures as wandb.Image
    log_checkpoint: bool = False  # upload the final checkpoint as a W&B artifact


@dataclass
class Config:
    out_dir: str = "runs/mnist"
    seed: int = 0
    logger: str = "none"  # none (metrics.jsonl only) | wandb (also W&B; see the wandb section)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "logger": ("none", "wandb"),
    "data.name": ("mnist", "fashion_mnist", "imagefolder", "celeba"),
    "data.test_split": ("test", "valid"),
    "data.loader": ("torch", "ffcv"),
    "data.order": ("random", "quasi_random"),
    "model.name": ("conv_vae", "dfc_vae"),
    "loss.recon": ("bce", "mse"),
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "cosine", "linear"),
    "train.mixed_precision": (None, "no", "bf16", "fp16"),
    "train.ops": ("eager", "compiled", "triton", "auto"),
    "train.nonfinite": ("stop", "skip"),
}

POSITIVE = ("data.image_size", "data.channels", "data.batch_size", "model.latent_dim",
            "optim.lr", "train.grad_accum_steps", "train.keep_checkpoints", "train.log_every")
NON_NEGATIVE = ("data.center_crop", "data.limit", "data.num_workers", "model.dropout",
                "loss.recon_weight", "loss.beta", "loss.kl_warmup_steps", "optim.weight_decay",
                "optim.warmup_steps", "optim.grad_clip", "train.epochs", "train.max_steps",
                "train.checkpoint_every", "train.samples", "train.final_eval_iwae", "train.final_eval_images")


# ---------------------------------------------------------------- conversion


class _YAMLLoader(yaml.SafeLoader):
    """YAML with YAML 1.2 booleans: only true/false. PyYAML's 1.1 rules read `no`, `off`
    and `y` as booleans, which would turn `train.mixed_precision=no` into False."""


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_YAMLLoader)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value, tp, key: str):
    """Check `value` (already parsed from YAML) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _resolved_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj, mapping: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from a nested mapping, checking every key."""
    if not isinstance(mapping, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}': expected a mapping, got {mapping!r}")
    hints = _resolved_hints(type(obj))
    known = _fields(type(obj))
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise UserError(f"unknown config key '{key}'; expected one of: {', '.join(known)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _coerce(value, hints[name], key))


def parse_override(text: str) -> tuple[str, object]:
    """`train.lr=1e-3` -> ("train.lr", 0.001); values are parsed as YAML scalars."""
    if "=" not in text:
        raise UserError(f"override '{text}': expected key=value (e.g. train.epochs=5)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}': missing key before '='")
    try:
        value = _load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep as a plain string, the type check decides
    return key, value


def _nest(key: str, value) -> dict:
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


# ---------------------------------------------------------------- public API


def validate(cfg: Config) -> Config:
    """Range and choice checks that types alone cannot express."""
    flat = flatten(cfg)
    for key, allowed in CHOICES.items():
        if flat[key] not in allowed:
            shown = ", ".join("null" if a is None else str(a) for a in allowed)
            raise UserError(f"config key '{key}': expected one of {shown}, got {flat[key]!r}")
    for key in POSITIVE:
        if not flat[key] > 0:
            raise UserError(f"config key '{key}': expected a value > 0, got {flat[key]!r}")
    for key in NON_NEGATIVE:
        if flat[key] < 0:
            raise UserError(f"config key '{key}': expected a value >= 0, got {flat[key]!r}")
    if not 0.0 <= cfg.data.test_fraction < 1.0:
        raise UserError(f"config key 'data.test_fraction': expected 0 <= value < 1, got {cfg.data.test_fraction}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise UserError(f"config key 'model.dropout': expected 0 <= value < 1, got {cfg.model.dropout}")
    if len(cfg.optim.betas) != 2:
        raise UserError(f"config key 'optim.betas': expected two numbers, got {cfg.optim.betas}")
    if cfg.logger == "wandb" and not cfg.wandb.project:
        raise UserError("config key 'wandb.project' is empty; expected a W&B project name")
    if cfg.data.channels not in (1, 3):
        raise UserError(f"config key 'data.channels': expected 1 or 3, got {cfg.data.channels}")
    if cfg.data.loader == "ffcv" and not cfg.data.beton:
        raise UserError("config key 'data.beton' is empty; expected the training .beton for data.loader=ffcv "
                        "(write one with `python -m fastvae.data.ffcv`)")
    if cfg.data.flip and cfg.data.loader != "ffcv":
        raise UserError("config key 'data.flip': random flips come with data.loader=ffcv; expected data.flip=false")
    if cfg.model.name == "conv_vae" and cfg.data.image_size != 28:
        raise UserError(f"config key 'data.image_size': model conv_vae expects 28, got {cfg.data.image_size}")
    if cfg.model.name == "dfc_vae" and cfg.data.image_size not in (64, 128):
        raise UserError(f"config key 'data.image_size': model dfc_vae expects 64 or 128, got {cfg.data.image_size}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file (if any), then each `key=value` override, then validation."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; expected a YAML file such as configs/mnist.yaml")
        try:
            mapping = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "invalid YAML"
            raise UserError(f"config file '{path}'{where}: {problem}; expected valid YAML") from None
        _apply(cfg, mapping)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(mapping: dict) -> Config:
    cfg = Config()
    _apply(cfg, mapping)
    return validate(cfg)


def flatten(cfg: Config) -> dict:
    """{"train.lr": ..., ...}: the form used in choices, W&B and error messages."""
    out = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(cfg), "")
    return out
