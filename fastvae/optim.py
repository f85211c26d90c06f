"""Optimizer and learning-rate schedule from the config's `optim` section."""

from __future__ import annotations

import math

import torch

from fastvae.config import Config


def build_optimizer(cfg: Config, params, device: torch.device | None = None) -> torch.optim.Optimizer:
    """On CUDA, Adam and AdamW run fused (one kernel for all parameters instead of several per tensor:
    the optimizer step is a large share of the launches of these small models)."""
    o = cfg.optim
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **fused)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    raise ValueError(f"optim.name {o.name!r}: expected adam, adamw or sgd")


def lr_factor(step: int, warmup: int, kind: str, total_steps: int) -> float:
    """Linear warm-up over `warmup` steps, then constant / cosine / linear decay to 0 at total_steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    return 1.0


def build_scheduler(cfg: Config, optimizer, total_steps: int):
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.scheduler
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, kind, total_steps))


def build_disc_optimizer(cfg: Config, module: torch.nn.Module, device: torch.device | None = None):
    """The discriminator's Adam: disc.lr (0 = optim.lr) and disc.betas (LDM: 0.5, 0.9), no decay."""
    fused = {"fused": True} if device is not None and device.type == "cuda" else {}
    return torch.optim.Adam(module.parameters(), lr=cfg.disc.lr or cfg.optim.lr, betas=tuple(cfg.disc.betas),
                            **fused)
