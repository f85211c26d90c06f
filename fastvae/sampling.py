"""Images from a model, as a library: decoded latents, prior samples (a conditional model's per class),
reconstructions from the posterior mean, the posterior means of a data set. The command line
(`python -m fastvae.generate`, fastvae/generate.py) and a run's pictures (fastvae/reports.py) call these."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from fastvae import pictures
from fastvae.data import in_order_loader


@torch.no_grad()
def decode_images(model, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [0, 1] (model.images: sigmoid of the decoder's logits, or a decoder's own pixels);
    condition [N, C]: a conditional model's."""
    return model.images(model.decode_with(z, on_device(condition, z)).float())


def on_device(condition: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A condition on the device of `like` (None stays None)."""
    return None if condition is None else condition.to(like.device)


def latent_posterior(model, x: torch.Tensor, condition: torch.Tensor | None = None):
    """(mean, logvar) of each image's latent [B, latent_dim]: the Gaussian posterior; for a tokenizer
    (a model that owns its quantizer) its quantized latent and None (a point: no variance, no KL)."""
    encoded = model.encode_with(x, on_device(condition, x))
    if model.bottleneck() is not None:
        return model.bottleneck()(encoded).z.flatten(1), None
    return encoded


def random_latents(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """n latents [n, latent_dim] from the prior: z ~ N(0, I); a tokenizer's uniformly random codes."""
    quantizer = model.bottleneck()
    if quantizer is None:
        return torch.randn(n, model.latent_dim, generator=generator)
    indices = torch.randint(quantizer.codebook_size, (n, *model.latent_shape[1:]), generator=generator)
    return quantizer.decode_indices(indices.to(next(model.parameters()).device)).flatten(1).cpu()


@torch.no_grad()
def prior_samples(model, n: int, seed: int = 0, device="cpu", condition: torch.Tensor | None = None) -> torch.Tensor:
    """n images decoded from z ~ N(0, I), drawn from a seeded generator (the same for any device);
    a conditional model's condition [n, C] (or [C] for all of them)."""
    z = random_latents(model, n, torch.Generator().manual_seed(seed)).to(device)
    if condition is not None and condition.dim() == 1:
        condition = condition.expand(n, -1)
    return decode_images(model, z, condition)


@torch.no_grad()
def reconstruct_images(model, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Decoded from the posterior mean (z = mu): the deterministic reconstruction."""
    mu, _ = latent_posterior(model, images, condition)
    return decode_images(model, mu, condition)


@torch.no_grad()
def encode_dataset(model, dataset, device="cpu", max_images: int | None = None,
                   conditioning=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior means [N, D] on the CPU, labels [N]) over a dataset in order, up to max_images
    (a conditional model: given each image's condition, `conditioning` bound to the dataset)."""
    mus, labels, seen = [], [], 0
    for x, y, ids in in_order_loader(dataset):
        if max_images is not None:
            x, y, ids = x[: max_images - seen], y[: max_images - seen], ids[: max_images - seen]
        x = x.to(device)
        c = None if conditioning is None else conditioning.of_batch(torch.as_tensor(y), torch.as_tensor(ids))
        mu, _ = latent_posterior(model, x, c)
        mus.append(mu.float().cpu())
        labels.append(y)
        seen += len(x)
        if max_images is not None and seen >= max_images:
            break
    return torch.cat(mus), torch.cat(labels)


def save_conditional_samples(model, conditioning, test_set, n: int, seed: int, device, out: Path, what: str) -> Path:
    """A conditional model's samples when no condition is asked: one row per class (one z per
    column, so a column shows one style in every class), or given the attributes of n test images
    (test_set: needed for attributes only)."""
    if conditioning.kind == "labels":
        per_row = math.ceil(n / conditioning.dim)
        images = class_rows(model, per_row, seed, device).cpu()
        return pictures.save_grid(images, out, nrow=per_row, row_labels=list(conditioning.names),
                                  title=f"{per_row} samples per class (one z per column), {what}")
    items = [test_set[i] for i in pictures.spread_indices(len(test_set), n)]
    conditions = conditioning.for_dataset(test_set).of_items(items)
    images = prior_samples(model, len(items), seed, device, conditions).cpu()
    return pictures.save_grid(images, out, nrow=math.ceil(math.sqrt(len(items))),
                              title=f"{len(items)} samples given the attributes of test images, {what}")


@torch.no_grad()
def class_rows(model, per_row: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """A labels-conditional model's samples [classes * per_row, C, H, W]: the same per_row z decoded
    given each class in turn."""
    classes = model.condition_dim
    z = torch.randn(per_row, model.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    condition = torch.eye(classes, device=device).repeat_interleave(per_row, 0)
    return decode_images(model, z.repeat(classes, 1), condition)
