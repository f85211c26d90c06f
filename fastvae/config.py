"""Typed run configuration: dataclasses <- YAML file <- `key=value` overrides.

Why hand-written rather than a config library: the stack is fixed (no hydra or
omegaconf), and what we need is small: nested dataclasses, dotted overrides,
strict type checks and one-line errors.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import yaml

from fastvae.errors import UserError


RESUME = ("must_match", "may_differ")


def knob(default=dataclasses.MISSING, doc: str = "", *, factory=None, above=None, at_least=None, below=None,
         resume: str = "may_differ"):
    """A config field with its documentation and range next to it (`--help` prints both).
    above: value > above; at_least: value >= at_least; below: value < below. resume: must_match for
    what a checkpoint pins (the model or the data would not be the same: resuming with another value
    is refused), may_differ for the rest."""
    assert resume in RESUME, resume
    metadata = {"doc": doc, "above": above, "at_least": at_least, "below": below, "resume": resume}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


SPLITS = ("train", "test")
TRACKERS = ("wandb", "tensorboard", "mlflow")  # logger=...: accelerate's trackers of these names

# Image shapes fixed by a dataset's files: the one place these rules live. (The models take any
# size; what a size cannot do is the model's dry forward at set-up: fastvae.models.check_model.)
DATASET_CHANNELS_AND_SIZE = {"mnist": (1, 28), "fashion_mnist": (1, 28)}
BUILT_IN_MODELS = ("conv_vae", "dfc_vae", "kl_autoencoder", "vq_autoencoder")
# A user's model: `package.module:ClassName`, importable from where training runs.
IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")


@dataclass
class DataConfig:
    name: Literal["mnist", "fashion_mnist", "imagefolder", "celeba"] = knob("mnist", "dataset", resume="must_match")
    root: str = knob("", "dataset location; empty = the dataset's default")
    image_size: int | list[int] = knob(28, "image height and width: an int (square) or [height, width]; image "
                                           "folders and CelebA are resized to cover it, then center-cropped",
                                           resume="must_match")
    channels: int = knob(1, "channels per image: 1 (greyscale), 3 (RGB), 4 (RGBA, image folders), ...",
                         above=0, resume="must_match")
    center_crop: int = knob(0, "crop this square from the center before resizing; 0 = none", at_least=0,
                            resume="must_match")
    test_fraction: float = knob(0.1, "held-out share for datasets without an official split", at_least=0, below=1,
                                resume="must_match")
    split_seed: int = knob(0, "seed of that fixed split, independent of seed", at_least=0, below=2**32,
                           resume="must_match")
    limit: int = knob(0, "use only the first `limit` training images; 0 = all", at_least=0)
    batch_size: int = knob(128, "images per step per process", above=0)
    num_workers: int = knob(0, "DataLoader worker processes", at_least=0)
    drop_last: bool = knob(True, "drop the last partial batch (keeps DDP shards equal in size)", resume="must_match")
    loader: Literal["auto", "memory", "torch", "ffcv"] = knob(
        "auto", "memory (batches sliced from the uint8 data set held on the device), torch (DataLoader), ffcv "
                "(a .beton from `fastvae ffcv`), or auto: memory for data sets held as tensors (mnist, "
                "fashion_mnist) and, on a GPU, for others whose uint8 copy fits in a quarter of its memory "
                "(decoded once), else torch")
    beton: str = knob("", "the training .beton: read by data.loader=ffcv, or read once into memory by "
                          "data.loader=memory")
    order: Literal["random", "quasi_random"] = knob("random", "data.loader=ffcv: sample order (quasi_random "
                                                    "needs less memory, is not fully random)")
    flip: bool = knob(False, "random horizontal flips (data.loader memory or ffcv)")
    skip_corrupt: bool = knob(False, "celeba / imagefolder: skip (and name) undecodable images instead of "
                                     "stopping")
    label_attribute: str = knob("Smiling", "celeba: the attribute used as the label (colors latent plots)")
    test_split: Literal["test", "valid"] = knob("test", "celeba: the official partition used as the test set")


@dataclass
class ModelConfig:
    name: str = knob("conv_vae", "conv_vae (the lecture's MNIST VAE), dfc_vae (the CelebA face VAE), kl_autoencoder "
                                 "(the latent-diffusion autoencoder, diffusers' AutoencoderKL), or your own "
                                 "fastvae.VAE subclass as package.module:ClassName (docs/custom_model.md)",
                     resume="must_match")
    latent_dim: int = knob(2, "size of z", above=0, resume="must_match")
    dropout: float = knob(0.0, "dfc_vae: dropout after each hidden block", at_least=0, below=1, resume="must_match")
    kwargs: dict = knob(doc="keyword arguments of the model's constructor, a mapping of JSON values (recorded "
                            "in checkpoints); in_channels, image_size and latent_dim come from data.* and "
                            "model.latent_dim", factory=dict, resume="must_match")
    condition: Literal["none", "labels", "attributes"] = knob(
        "none", "a conditional VAE: encoder and decoder also get the image's class (labels: one-hot) or CelebA's "
                "40 attributes (attributes: 0/1); generate sample --condition / --attributes then picks them",
                resume="must_match")
    condition_names: list[str] = knob(doc="the classes or attributes conditioned on, filled in from the data when "
                                          "training starts (recorded in checkpoints); leave empty", factory=list,
                                          resume="must_match")
    pretrained: str = knob("", "kl_autoencoder / vq_autoencoder: a local diffusers AutoencoderKL / VQModel folder "
                               "(config.json + diffusion_pytorch_model.safetensors) to start from; its architecture "
                               "goes into model.kwargs (and a VQModel's codebook size into quantizer.*), its weights "
                               "are loaded when a fresh run starts")
    train_decoder_only: bool = knob(False, "kl_autoencoder with model.pretrained: train the decoder only, the "
                                           "encoder frozen (Stable Diffusion's ft-EMA / ft-MSE recipe)")


@dataclass
class LossConfig:
    recon: Literal["bce", "mse"] = knob("bce", "bce (Bernoulli decoder) or mse (Gaussian decoder)")
    recon_weight: float = knob(1.0, "weight of the reconstruction term (the lecture's alpha)", at_least=0)
    beta: float = knob(1.0, "weight of the KL term (1 = plain VAE)", at_least=0)
    objective: Literal["elbo", "iwae", "tcvae", "ldm"] = knob(
        "elbo", "elbo; iwae: the importance-weighted bound with loss.samples samples per image (Burda et al. "
                "2016); tcvae: beta-TCVAE (Chen et al. 2018), the KL split into mutual information, total "
                "correlation and dimension-wise KL, q(z) estimated by minibatch-weighted sampling over the "
                "global batch; ldm: the latent-diffusion autoencoder's (LDM's LPIPSWithDiscriminator): "
                "loss.pixel + loss.perceptual_weight x LPIPS as a likelihood with one log-variance, loss.beta x "
                "KL (LDM: 1e-6), and a PatchGAN from disc.start (docs/latent_autoencoder.md)")
    samples: int = knob(1, "loss.objective=iwae: importance samples K per image (K = 1 is the ELBO)", at_least=1)
    dreg: bool = knob(False, "loss.objective=iwae: doubly-reparameterized gradients for the encoder (DReG, Tucker "
                             "et al. 2018): the same bound and expected gradient, lower variance")
    tc_weight: float = knob(6.0, "loss.objective=tcvae: weight of the total correlation (Chen et al.'s beta; "
                                 "mutual information and dimension-wise KL are weighed by loss.beta); needs "
                                 "data.batch_size >= 2 (q(z) is estimated from the batch's posteriors)", at_least=0)
    sigma: Literal["none", "optimal"] = knob(
        "none", "loss.recon=mse: none (recon_weight x the sum of squared errors), or optimal: the calibrated "
                "Gaussian decoder (sigma-VAE, Rybkin et al. 2021), -log N(x; x_hat, s2 I) with the shared "
                "variance s2 set to the global batch's mean squared error; no weight to tune")
    kl_warmup_steps: int = knob(0, "ramp beta linearly from 0 over this many steps; 0 = off", at_least=0)
    kl_cycle_steps: int = knob(0, "cyclical KL annealing (Fu et al. 2019): restart the ramp of beta every this "
                                  "many steps; 0 = off, else at least 2 (a 1-step cycle keeps beta at 0: a plain "
                                  "autoencoder)", at_least=0)
    kl_cycle_ramp: float = knob(0.5, "share of each cycle over which beta ramps from 0 (then it holds)", above=0)
    free_bits: float = knob(0.0, "per-dimension KL floor in nats (Kingma et al. 2016): the KL term is "
                                 "beta x sum_j max(free_bits, KL_j averaged over the global batch); 0 = off; at "
                                 "most what an 8-bit image holds, C x H x W x ln 256 nats, over model.latent_dim",
                            at_least=0)
    capacity: float = knob(0.0, "capacity annealing (Burgess et al. 2018): the KL term is capacity_gamma x "
                                "|KL averaged over the global batch - C|, C ramped from 0 to this many nats over "
                                "capacity_steps; 0 = off; at most what an 8-bit image holds, C x H x W x ln 256 "
                                "nats", at_least=0)
    capacity_steps: int = knob(0, "steps over which C grows to loss.capacity; 0 = C is loss.capacity at once",
                               at_least=0)
    capacity_gamma: float = knob(1000.0, "weight of |KL - C| (Burgess et al.'s gamma)", at_least=0)
    pixel: Literal["l1", "l2"] = knob("l1", "loss.objective=ldm: the per-pixel term on images in [-1, 1]: l1 "
                                            "(LDM) or l2 (squared, SD's ft-MSE)")
    perceptual_weight: float = knob(1.0, "loss.objective=ldm: weight of LPIPS, added to every pixel's term as "
                                         "LDM does (so it weighs C x H x W times in the sum); 0 = no LPIPS",
                                    at_least=0)
    lpips_net: Literal["vgg", "alex"] = knob("vgg", "LPIPS's backbone (LDM: vgg)")
    lpips_weights: str = knob("", "the backbone's torchvision weights file (vgg16-397923af.pth or "
                                  "alexnet-owt-7be5be79.pth); empty = the torch hub cache "
                                  "($TORCH_HOME/hub/checkpoints); never downloaded")
    logvar_init: float = knob(0.0, "loss.objective=ldm: the output log-variance's start (LDM: 0); within (-30, 30): "
                                   "beyond, exp(-logvar) under- or overflows the reconstruction term's weight",
                              above=-30, below=30)
    learn_logvar: bool = knob(False, "loss.objective=ldm: train the log-variance (SD 2 / SGM) instead of keeping "
                                     "it fixed (LDM)")


@dataclass
class QuantizerConfig:
    kind: Literal["none", "vq", "fsq", "lfq"] = knob(
        "none", "a tokenizer's quantizer (model.name=vq_autoencoder, or your model taking `quantizer`): vq (nearest "
                "code, VQ-VAE), fsq (finite scalar quantization), lfq (lookup-free, MAGVIT-v2); none: the Gaussian "
                "latent (docs/tokenizers.md)", resume="must_match")
    codebook_size: int = knob(1024, "vq: codes K", resume="must_match")
    code_dim: int = knob(0, "vq: the lookup's dimension (a low-dimensional projection, e.g. 8); 0 = the latent's "
                            "channels", at_least=0, resume="must_match")
    l2: bool = knob(False, "vq: l2-normalized codes and inputs (cosine lookup, ViT-VQGAN / LlamaGen)",
                    resume="must_match")
    commitment: float = knob(0.25, "vq / lfq: weight of the commitment term ||z - sg(e)||^2", at_least=0)
    ema_decay: float = knob(0.0, "vq: the codebook as an exponential moving average of its vectors (VQ-VAE-2: 0.99); "
                                 "0 = a learned codebook", at_least=0, below=1, resume="must_match")
    restart_after: int = knob(0, "vq: a code unused for this many steps takes a vector of the global batch; 0 = off",
                              at_least=0)
    kmeans_iters: int = knob(0, "vq: the codebook starts as k-means (this many Lloyd steps) of the first global "
                                "batch's vectors; 0 = random codes", at_least=0, resume="must_match")
    levels: list[int] = knob(doc="fsq: levels per latent channel, e.g. [8, 5, 5, 5] (1,000 codes)", factory=list,
                             resume="must_match")
    entropy_weight: float = knob(0.1, "lfq: weight of the entropy penalty (per-code entropy minus the global "
                                      "batch's)", at_least=0)
    temperature: float = knob(0.01, "lfq: the code distribution's temperature in the entropy penalty", above=0)
    allow_large: bool = knob(False, "lfq: allow more than 30 bits (2^30 codes)")


@dataclass
class DiscConfig:
    weight: float = knob(0.0, "loss.objective=ldm: weight of the adversarial term, times LDM's adaptive weight "
                              "||grad NLL|| / ||grad G|| at the decoder's last layer (LDM: 0.5); 0 = no "
                              "discriminator", at_least=0)
    start: int = knob(0, "the step from which the discriminator trains and its term counts (LDM: 50001); before "
                         "it the discriminator is neither run nor trained", at_least=0)
    factor: float = knob(1.0, "LDM's disc_factor: scales the adversarial term and the discriminator's loss once "
                              "active", at_least=0)
    loss: Literal["hinge", "vanilla"] = knob("hinge", "the discriminator's loss (LDM: hinge)")
    channels: int = knob(64, "the PatchGAN's first width (pix2pix ndf)", above=0, resume="must_match")
    layers: int = knob(3, "the PatchGAN's downsampling layers (pix2pix n_layers)", above=0, resume="must_match")
    norm: Literal["batch", "none"] = knob("batch", "batch (LDM; synchronized over the global batch with several "
                                                   "processes) or none (no batch statistics)", resume="must_match")
    lr: float = knob(0.0, "the discriminator's learning rate; 0 = optim.lr", at_least=0)
    betas: list[float] = knob(doc="the discriminator's Adam betas (LDM: 0.5, 0.9)", factory=lambda: [0.5, 0.9])
    lecam_weight: float = knob(0.0, "LeCam regularization of the discriminator (Tseng et al. 2021; MAGVIT-v2, "
                                    "MaskBit: 0.001): relu(mean D(x) - ema fake)^2 + relu(ema real - mean D(x_hat))^2 "
                                    "over the global batch; 0 = off", at_least=0, resume="must_match")
    lecam_decay: float = knob(0.999, "the decay of LeCam's moving averages of the mean real and fake logits",
                              at_least=0, below=1)


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = knob("adam", "optimizer")
    lr: float = knob(5e-4, "learning rate (the lecture's 5e-4)", above=0)
    weight_decay: float = knob(0.0, "weight decay", at_least=0)
    betas: list[float] = knob(doc="adam / adamw betas", factory=lambda: [0.9, 0.999])
    momentum: float = knob(0.9, "sgd momentum", at_least=0)
    scheduler: Literal["none", "cosine", "linear"] = knob("none", "learning-rate decay after the warm-up")
    warmup_steps: int = knob(0, "linear learning-rate warm-up steps", at_least=0)
    grad_clip: float = knob(0.0, "max global gradient norm; 0 = off", at_least=0)


@dataclass
class TrainConfig:
    epochs: int = knob(30, "passes over the training set", at_least=0)
    max_steps: int = knob(0, "stop after this many optimizer steps (the LR schedule still spans all epochs); "
                             "0 = off", at_least=0)
    grad_accum_steps: int = knob(1, "batches per optimizer step", above=0)
    mixed_precision: Optional[Literal["auto", "no", "bf16", "fp16"]] = knob(
        "auto", "auto (accelerate launch's value, else bf16 where the device runs it natively, else fp32), "
                "no, bf16, fp16, or null (accelerate launch decides)")
    compile: bool = knob(False, "torch.compile the step's forward: model, reparameterization + KL, "
                                "reconstruction loss and ELBO in one graph")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = knob(
        "default", "torch.compile mode with train.compile=true; reduce-overhead replays CUDA graphs (GPU)")
    memory_format: Literal["channels_last", "contiguous"] = knob(
        "channels_last", "layout of the conv models' weights and inputs (channels_last: NHWC convolutions, "
                         "faster on CPUs and on GPU tensor cores; see benchmarks/README.md)")
    ops: Literal["eager", "compiled", "triton", "auto"] = knob("auto", "VAE ops: eager reference, "
                                                               "torch.compile'd, fused Triton, or auto "
                                                               "(triton on CUDA, else eager)")
    cpu: bool = knob(False, "train on the CPU even where a GPU exists")
    collective_timeout_s: int = knob(900, "with several processes: seconds a rank waits for the others in a "
                                          "collective before the run stops, naming the rank that stopped "
                                          "answering (torch's own default: 30 min on gloo, 10 on NCCL)", above=0)
    sync_batchnorm: bool = knob(False, "with several processes, BatchNorm statistics over the global batch "
                                       "(SyncBatchNorm): N processes x B/N then train the model 1 x B does")
    checkpoint_every: int = knob(0, "also checkpoint every N steps; 0 = at epoch ends only", at_least=0)
    keep_checkpoints: int = knob(2, "newest checkpoints kept", above=0)
    resume: str = knob("", "empty = fresh run, auto = newest checkpoint in out_dir, or a checkpoint path")
    nonfinite: Literal["stop", "skip"] = knob("stop", "on a NaN/inf loss: stop (keep the last good "
                                                      "checkpoint) or skip the batch")
    log_every: int = knob(10, "steps between progress-bar / tracker updates", above=0)
    samples: int = knob(100, "images in the prior sample grid", at_least=0)
    final_eval: bool = knob(False, "run fastvae.evaluate on the test split at the end (writes eval.json)")
    final_eval_iwae: int = knob(0, "importance samples K of that evaluation; 0 = ELBO only", at_least=0)
    final_eval_images: int = knob(0, "evaluate only this many test images; 0 = all", at_least=0)
    ema_decay: float = knob(0.0, "an exponential moving average of the weights with LDM's warm-up, decay "
                                 "min(ema_decay, (1 + n) / (10 + n)) at update n (LitEma), checkpointed and used by "
                                 "generate, evaluate and export; 0 = off (SD's ft-EMA: 0.9999)", at_least=0,
                             below=1)
    gradient_checkpointing: bool = knob(False, "recompute activations in the backward pass instead of keeping them "
                                               "(models that offer it, e.g. kl_autoencoder: diffusers' switch)")


EVAL_METRICS = ("fid", "rfid", "kid", "ssim", "lpips")


@dataclass
class EvalConfig:
    fid_every: int = knob(0, "image-quality metrics (eval.metrics, and PSNR) of eval.images test images every N "
                             "epochs, into metrics.jsonl and the trackers; 0 = off (docs/generate_evaluate.md: "
                             "their cost)", at_least=0)
    metrics: list[str] = knob(doc="which: fid (prior samples), rfid (reconstructions), kid (beside each FID), ssim, "
                                  "lpips (loss.lpips_net's backbone)", factory=lambda: ["fid", "ssim"])
    images: int = knob(1000, "test images (and prior samples) they are computed on; FID is biased below 2048",
                       above=1)
    inception_weights: str = knob("", "torch-fidelity's weights-inception-2015-12-05-6726825d.pth; empty = the "
                                      "torch hub cache's copy (never downloaded)")


@dataclass
class WandbConfig:
    project: str = knob("", "W&B project (logger=wandb); empty = $WANDB_PROJECT, else fastvae")
    entity: str = knob("", "W&B entity; empty = $WANDB_ENTITY, else your default")
    name: str = knob("", "run name; empty = $WANDB_NAME, else the out_dir folder's name")
    group: str = knob("", "run group, e.g. one sweep's runs; empty = $WANDB_RUN_GROUP")
    tags: list[str] = knob(doc="run tags; empty = $WANDB_TAGS (comma-separated)", factory=list)
    log_images: bool = knob(True, "per-epoch sample / reconstruction / latent pictures as wandb.Image")
    log_checkpoint: bool = knob(False, "upload the final checkpoint as a W&B artifact")


@dataclass
class Config:
    out_dir: str = knob("runs/mnist", "where metrics, checkpoints and pictures go")
    seed: int = knob(0, "seed of the model's initialization, the data order and the noise", at_least=0,
                     below=2**32)  # numpy's seed range (accelerate's set_seed seeds numpy too)
    logger: str | list[str] = knob("none", "where metrics also go besides metrics.jsonl: none, wandb, tensorboard "
                                           "(OUT_DIR/tensorboard), mlflow (OUT_DIR/mlflow.db unless "
                                           "$MLFLOW_TRACKING_URI), or a list, e.g. [wandb,tensorboard]")
    wandb: WandbConfig = field(default_factory=WandbConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _resume_keys(rule: str) -> tuple[str, ...]:
    return tuple(key for key, k in _walk(Config()).items() if k.field.metadata.get("resume", "may_differ") == rule)


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
    """int, list[float], one of: a | b, ... (| null): how --help and errors name a type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp)) if origin is None else str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` (already parsed from YAML) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) in {type(c) for c in choices}:
            return value
        shown = ", ".join(str(c) for c in choices)
        raise UserError(f"config key '{key}': expected one of {shown}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for inner in [t for t in options if t is not type(None)]:
            try:
                return _coerce(value, inner, key)
            except UserError:
                pass
        raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}': expected a list of {_type_name(inner)}, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        return _json_mapping(value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):  # .inf / .nan would train nonsense or stop at step 2
                raise UserError(f"config key '{key}': expected a finite number, got {value!r}")
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")


def _json_mapping(value, key: str) -> dict:
    """A mapping with string keys whose values JSON holds exactly (it is recorded in checkpoints as JSON,
    and a checkpoint must rebuild what was trained)."""
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UserError(f"config key '{key}': expected a mapping with string keys (e.g. {{width: 64}}), got {value!r}")
    try:
        same = json.loads(json.dumps(value, allow_nan=False)) == value
    except (TypeError, ValueError):
        same = False
    if not same:
        raise UserError(f"config key '{key}': expected JSON values (numbers, strings, booleans, null, lists, "
                        f"mappings), got {value!r}")
    return copy.deepcopy(value)


def _apply(obj, mapping: dict, prefix: str = "") -> None:
    """Set the fields of dataclass `obj` from a nested mapping, checking every key."""
    if not isinstance(mapping, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}': expected a mapping, got {mapping!r}")
    hints = typing.get_type_hints(type(obj))
    known = [f.name for f in dataclasses.fields(obj)]
    for name, value in mapping.items():
        key = f"{prefix}{name}"
        if name not in known:
            raise UserError(f"unknown config key '{key}'; expected one of: {', '.join(known)}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            _apply(current, value, prefix=f"{key}.")
        elif isinstance(current, dict) and isinstance(value, dict):  # model.kwargs.width=64 adds to the mapping
            setattr(obj, name, {**current, **_coerce(value, hints[name], key)})
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


def _check_range(key: str, value, meta: dict) -> None:
    if meta.get("above") is not None and not value > meta["above"]:
        raise UserError(f"config key '{key}': expected a value > {meta['above']}, got {value!r}")
    if meta.get("at_least") is not None and not value >= meta["at_least"]:
        raise UserError(f"config key '{key}': expected a value >= {meta['at_least']}, got {value!r}")
    if meta.get("below") is not None and not value < meta["below"]:
        raise UserError(f"config key '{key}': expected a value < {meta['below']}, got {value!r}")


CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_printable(key: str, value: str) -> None:
    """No newline, tab or other control character in a value: paths and names reach log lines, shell
    scripts (the SLURM launcher's sbatch script) and file names, where one would break or inject."""
    if CONTROL_CHARACTERS.search(value):
        raise UserError(f"config key '{key}': expected no control characters (newline, tab, ...), got {value!r}")


def validate(cfg: Config) -> Config:
    """Each field's range (from its knob), then the rules that tie fields together, section by section."""
    for key, k in _walk(cfg).items():
        _check_range(key, k.value, k.field.metadata)
        for text in (k.value if isinstance(k.value, list) else [k.value]):
            if isinstance(text, str):
                check_printable(key, text)
    _check_optim(cfg)
    _check_data(cfg)
    _check_model(cfg)
    _check_loss(cfg)
    loggers(cfg)
    _check_eval(cfg)
    _check_schedules(cfg)
    _check_sigma(cfg.loss)
    _check_autoencoder(cfg)
    return cfg


def _check_optim(cfg: Config) -> None:
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise UserError(f"config key 'optim.betas': expected two numbers in [0, 1), got {cfg.optim.betas}")


def _check_data(cfg: Config) -> None:
    """The data section's rules (and the image size in its one form)."""
    data = cfg.data
    if data.loader == "ffcv" and not data.beton:
        raise UserError("config key 'data.beton' is empty; expected the training .beton for data.loader=ffcv "
                        "(write one with `python -m fastvae.data.ffcv`)")
    if data.beton and data.loader not in ("ffcv", "memory"):
        raise UserError(f"config key 'data.beton': a .beton is read by data.loader=ffcv or memory, and "
                        f"data.loader={data.loader} would not read it; expected one of those or no data.beton")
    if data.flip and data.loader == "torch":
        raise UserError("config key 'data.flip': random flips come with data.loader memory, ffcv or auto; "
                        "expected data.flip=false")
    data.image_size = _normal_image_size(data.image_size)
    fixed = DATASET_CHANNELS_AND_SIZE.get(data.name)
    if fixed and (data.channels, data.image_size) != fixed:
        raise UserError(f"data.name={data.name} gives {fixed[0]}x{fixed[1]}x{fixed[1]} images; expected "
                        f"data.image_size={fixed[1]} and data.channels={fixed[0]}, got {data.image_size} "
                        f"and {data.channels}")
    if (data.loader == "ffcv" or data.beton) and data.channels not in (1, 3):
        raise UserError(f"config key 'data.channels': FFCV stores greyscale or RGB images; expected 1 or 3 with "
                        f"data.beton, got {data.channels}")
    if data.name == "celeba" and data.channels != 3:
        raise UserError(f"data.name=celeba gives RGB images; expected data.channels=3, got {data.channels}")


def _check_model(cfg: Config) -> None:
    if cfg.model.name not in BUILT_IN_MODELS and not IMPORT_PATH.match(cfg.model.name):
        raise UserError(f"config key 'model.name': expected {' or '.join(BUILT_IN_MODELS)} or an import path "
                        f"package.module:ClassName, got {cfg.model.name!r}")
    if cfg.model.name == "vq_autoencoder" and cfg.quantizer.kind == "none":
        raise UserError("config key 'quantizer.kind': model.name=vq_autoencoder is a tokenizer; expected vq, fsq or "
                        "lfq")
    if cfg.quantizer.kind != "none" and cfg.model.name in ("conv_vae", "dfc_vae", "kl_autoencoder"):
        raise UserError(f"config key 'quantizer.kind': {cfg.model.name} has a Gaussian latent; expected "
                        f"quantizer.kind=none, or model.name=vq_autoencoder (or your model taking `quantizer`)")
    if cfg.model.condition == "attributes" and cfg.data.name != "celeba":
        raise UserError(f"config key 'model.condition': data.name={cfg.data.name} has no attributes; expected "
                        f"model.condition=labels (or data.name=celeba for attributes)")


def _check_loss(cfg: Config) -> None:
    """Which loss.* settings go together (each objective's own rules: _check_sigma, _check_autoencoder)."""
    loss = cfg.loss
    if loss.kl_cycle_ramp > 1:
        raise UserError(f"config key 'loss.kl_cycle_ramp': expected a share of the cycle in (0, 1], got "
                        f"{loss.kl_cycle_ramp}")
    if loss.kl_cycle_steps and loss.kl_warmup_steps:
        raise UserError("config keys 'loss.kl_cycle_steps' and 'loss.kl_warmup_steps': both schedule beta; expected "
                        "one of them (a cycle starts with its own warm-up)")
    if loss.objective == "iwae" and (loss.free_bits or loss.capacity):
        raise UserError("config key 'loss.objective': iwae weighs samples by p(z)/q(z|x), not by a KL term; "
                        "expected loss.free_bits=0 and loss.capacity=0 with it")
    if loss.dreg and (loss.objective != "iwae" or loss.samples < 2):
        raise UserError("config key 'loss.dreg': DReG gradients are those of the importance-weighted bound with "
                        "several samples; expected loss.objective=iwae and loss.samples >= 2 with it")
    if loss.samples > 1 and loss.objective != "iwae":
        raise UserError(f"config key 'loss.samples': {loss.samples} samples are for loss.objective=iwae; "
                        f"expected loss.objective=iwae or loss.samples=1")
    if loss.objective == "tcvae" and (loss.free_bits or loss.capacity):
        raise UserError("config key 'loss.objective': tcvae replaces the KL term by its decomposition; expected "
                        "loss.free_bits=0 and loss.capacity=0 with it")
    if loss.free_bits and loss.capacity:
        raise UserError("config keys 'loss.free_bits' and 'loss.capacity': both replace the KL term; expected one")


def _check_eval(cfg: Config) -> None:
    unknown = [m for m in cfg.eval.metrics if m not in EVAL_METRICS]
    if unknown or len(set(cfg.eval.metrics)) != len(cfg.eval.metrics):
        raise UserError(f"config key 'eval.metrics': {cfg.eval.metrics}; expected each of "
                        f"{', '.join(EVAL_METRICS)} at most once")


def loggers(cfg: Config) -> tuple[str, ...]:
    """The trackers `logger` names (none: ()), checked: known names, each once, none alone."""
    names = [cfg.logger] if isinstance(cfg.logger, str) else list(cfg.logger)
    if names == ["none"] or not names:
        return ()
    if any(n not in TRACKERS for n in names) or len(set(names)) != len(names):
        raise UserError(f"config key 'logger': {cfg.logger!r}; expected none, one of {', '.join(TRACKERS)}, or a "
                        f"list of them, each once (e.g. [wandb,tensorboard])")
    return tuple(names)


def image_information_nats(data) -> float:
    """What one 8-bit image can hold: C x H x W x ln 256 nats. No KL per image, floor or capacity
    above it can mean what a user wants."""
    height, width = image_hw(data)
    return data.channels * height * width * math.log(256)


def _check_schedules(cfg: Config) -> None:
    """Settings that are valid numbers but would silently train something else than asked."""
    loss = cfg.loss
    if loss.kl_cycle_steps == 1:
        raise UserError("config key 'loss.kl_cycle_steps': a 1-step cycle keeps beta at 0 for the whole run (a plain "
                        "autoencoder); expected 0 (off) or at least 2")
    if loss.objective == "tcvae" and cfg.data.batch_size < 2:
        raise UserError(f"config key 'data.batch_size': loss.objective=tcvae estimates q(z) from the posteriors of "
                        f"the batch, and {cfg.data.batch_size} image per process makes it a constant bias; expected "
                        f"at least 2")
    most = image_information_nats(cfg.data)
    if loss.free_bits * cfg.model.latent_dim > most:
        raise UserError(f"config key 'loss.free_bits': {loss.free_bits:g} nats x {cfg.model.latent_dim} dimensions is "
                        f"more than an 8-bit image of this size holds ({most:.0f} nats); expected at most "
                        f"{most / cfg.model.latent_dim:.4g} per dimension (typically 0.1-2)")
    if loss.capacity > most:
        raise UserError(f"config key 'loss.capacity': {loss.capacity:g} nats is more than an 8-bit image of this size "
                        f"holds ({most:.0f} nats); expected at most that (typically 5-50)")


def _check_autoencoder(cfg: Config) -> None:
    """The latent-diffusion autoencoder's settings: what only it can use, and what it cannot."""
    loss, model = cfg.loss, cfg.model
    if loss.objective != "ldm" and (cfg.disc.weight or cfg.disc.start):
        raise UserError("config key 'disc.weight': the discriminator is part of loss.objective=ldm; expected "
                        "loss.objective=ldm with it")
    if cfg.disc.start and not cfg.disc.weight:
        raise UserError(f"config key 'disc.start': {cfg.disc.start} starts a discriminator that does not exist "
                        f"(disc.weight=0); expected disc.weight > 0 (LDM: 0.5) or no disc.start")
    if loss.objective == "ldm" and (loss.free_bits or loss.capacity or loss.sigma != "none"):
        raise UserError("config key 'loss.objective': ldm has its own reconstruction likelihood and KL weight; "
                        "expected loss.free_bits=0, loss.capacity=0 and loss.sigma=none with it")
    if cfg.disc.weight and cfg.train.grad_accum_steps > 1:
        raise UserError("config key 'train.grad_accum_steps': the discriminator's step is not built for gradient "
                        "accumulation; expected 1 with disc.weight > 0 (a larger data.batch_size instead)")
    if model.pretrained and model.name not in ("kl_autoencoder", "vq_autoencoder"):
        raise UserError(f"config key 'model.pretrained': diffusers' AutoencoderKL / VQModel weights are for "
                        f"model.name=kl_autoencoder / vq_autoencoder; got {model.name}")
    if model.train_decoder_only and model.name != "kl_autoencoder":
        raise UserError(f"config key 'model.train_decoder_only': for model.name=kl_autoencoder; got {model.name}")
    if model.train_decoder_only and not model.pretrained:
        raise UserError("config key 'model.train_decoder_only': fine-tuning the decoder alone keeps an encoder that "
                        "was never trained; expected model.pretrained=FOLDER (the weights to start from)")
    if len(cfg.disc.betas) != 2 or not all(0 <= b < 1 for b in cfg.disc.betas):
        raise UserError(f"config key 'disc.betas': expected two numbers in [0, 1), got {cfg.disc.betas}")


def _check_sigma(loss: LossConfig) -> None:
    if loss.sigma == "none":
        return
    if loss.recon != "mse":
        raise UserError(f"config key 'loss.sigma': the calibrated decoder is Gaussian; expected loss.recon=mse, "
                        f"got {loss.recon}")
    if loss.recon_weight != 1:
        raise UserError(f"config key 'loss.recon_weight': loss.sigma=optimal fits the weight itself (1 / 2 s2); "
                        f"expected 1, got {loss.recon_weight}")
    if loss.objective == "iwae":
        raise UserError("config key 'loss.sigma': loss.sigma=optimal is built for the one-sample bound; "
                        "expected loss.objective=elbo or tcvae")


def _normal_image_size(size: int | list[int]) -> int | list[int]:
    """data.image_size as one form per shape: a square [n, n] is n (what checkpoints of square
    models have always recorded), anything else [height, width]."""
    if isinstance(size, int):
        if size <= 0:
            raise UserError(f"config key 'data.image_size': expected a positive int or [height, width], got {size}")
        return size
    if len(size) != 2 or min(size) <= 0:
        raise UserError(f"config key 'data.image_size': expected a positive int or [height, width], got {size}")
    return size[0] if size[0] == size[1] else list(size)


def image_hw(data_cfg) -> tuple[int, int]:
    """(height, width) of the images data_cfg describes."""
    size = data_cfg.image_size
    return (size, size) if isinstance(size, int) else (size[0], size[1])


def shipped_configs() -> dict[str, Path]:
    """{"mnist": .../configs/mnist.yaml, ...}: the configs installed with fastvae."""
    from importlib.resources import files

    return {p.name[:-5]: Path(str(p)) for p in files("fastvae.configs").iterdir() if p.name.endswith(".yaml")}


def config_path(name: str | os.PathLike) -> Path:
    """A YAML path, or the name of a shipped config (`mnist`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    if str(name) in shipped:
        return shipped[str(name)]
    raise UserError(f"config file '{path}' not found; expected a YAML file such as configs/mnist.yaml "
                    f"or a shipped config: {', '.join(sorted(shipped))}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults, then the YAML file or shipped config (if any), then each `key=value` override,
    then validation."""
    cfg = Config()
    if path is not None:
        path = config_path(path)
        try:
            mapping = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = getattr(err, "problem", None) or "invalid YAML"
            raise UserError(f"config file '{path}'{where}: {problem}; expected valid YAML") from None
        _apply(cfg, mapping)
    typed = set()
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, _nest(key, value))
        typed |= {key, *(f"{key}.{k}" for k in (value if isinstance(value, dict) else {}))}
    cfg = validate(cfg)
    cfg.command_line_keys = typed  # (not a field: what the user typed wins over a file, e.g. model.pretrained's)
    return cfg


def override_data(cfg: Config, overrides: list[str] | tuple) -> Config:
    """A trained run's config with `data.*` overrides (e.g. data.root=/new/place), validated: what
    generate and evaluate accept. Other sections describe the trained model and stay as they are."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        key, value = parse_override(text)
        if not key.startswith("data."):
            raise UserError(f"override '{text}': only data.* keys can change for a trained model; "
                            f"expected e.g. data.root=/new/place")
        _apply(cfg, _nest(key, value))
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# Keys older checkpoints hold that no longer exist: dropped when such a config is read back.
RETIRED_KEYS = ("train.record_sample_ids",)
# Keys that moved (2026-12-07: every discriminator key under disc.): read back under their new names.
MOVED_KEYS = {"loss.disc_weight": "disc.weight", "loss.disc_start": "disc.start", "loss.disc_factor": "disc.factor",
              "loss.disc_loss": "disc.loss"}


def from_dict(mapping: dict) -> Config:
    """A config as to_dict wrote it, today's or an older checkpoint's (retired keys dropped, moved ones
    renamed), validated."""
    mapping = copy.deepcopy(mapping)
    for key in RETIRED_KEYS:
        section, _, name = key.rpartition(".")
        mapping.get(section, {}).pop(name, None)
    for old, new in MOVED_KEYS.items():
        (old_section, old_name), (new_section, new_name) = old.split("."), new.split(".")
        if isinstance(mapping.get(old_section), dict) and old_name in mapping[old_section]:
            value = mapping[old_section].pop(old_name)
            mapping.setdefault(new_section, {}).setdefault(new_name, value)
    cfg = Config()
    _apply(cfg, mapping)
    return validate(cfg)


@dataclass(frozen=True)
class Key:
    """One leaf of the config: its dataclass field, type and current value."""

    field: dataclasses.Field
    type: object
    value: object


def _walk(obj, prefix: str = "") -> dict[str, Key]:
    """{"train.lr": Key, ...} over every leaf, in declaration order."""
    hints = typing.get_type_hints(type(obj))
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_walk(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = Key(f, hints[f.name], value)
    return out


# What a checkpoint pins (resuming with another value is refused) and what may differ on resume: from
# each knob's `resume`, so every key is in exactly one of them.
RESUME_MUST_MATCH = _resume_keys("must_match")
RESUME_MAY_DIFFER = _resume_keys("may_differ")


def flatten(cfg: Config) -> dict:
    """{"train.lr": ..., ...}: the form used in W&B, resume checks and error messages."""
    return {key: list(k.value) if isinstance(k.value, list) else k.value for key, k in _walk(cfg).items()}


def keys_table() -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) of every config key, in declaration order: the source of
    `--help` and of docs/config_reference.md (tools/config_reference.py)."""
    return [(key, _type_name(k.type), "null" if k.value is None else json.dumps(k.value),
             k.field.metadata.get("doc", "")) for key, k in _walk(Config()).items()]


def keys_help() -> str:
    """Every config key with its type, default and doc: the body of `python -m fastvae.train --help`."""
    return "\n".join(f"  {key} = {default}  ({type_name})\n      {doc}" for key, type_name, default, doc in keys_table())
