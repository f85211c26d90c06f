"""Pictures and latent-space arithmetic from a checkpoint written by fastvae.train.

    python -m fastvae.generate sample      --checkpoint CKPT [--n 64] [--seed 0]
    python -m fastvae.generate reconstruct --checkpoint CKPT [--split test] [--n 20]
    python -m fastvae.generate interpolate --checkpoint CKPT --indices 0 7 [12 ...] [--steps 10] [--spherical]
    python -m fastvae.generate latent-plot --checkpoint CKPT [--split test] [--grid 20] [--span 3]
    python -m fastvae.generate attribute   --checkpoint CKPT (--attribute Smiling | --labels 8 1)
                                           [--alphas -2 -1 0 1 2] [--indices 0 1 2]

Every command writes PNGs (default: RUN_DIR/generated/) and prints their paths, and takes
`data.key=value` overrides for data that moved since training (e.g. data.root=/new/place).
The same functions work from Python:

    from fastvae.generate import load, sample, attribute_vector_for, apply_attribute
    vae = load("runs/mnist/checkpoints/step_00001050")
    images = sample(vae, 16)                                   # [16, 1, 28, 28] in [0, 1]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from fastvae import pictures
from fastvae.atomic import replaced
from fastvae.loading import LoadedVAE, load
from fastvae.commands import generate_parser
from fastvae.conditions import base_dataset, class_index
from fastvae.errors import UserError, exit_on_user_error
from fastvae.outputs import checked_output
from fastvae.sampling import (decode_images, encode_dataset, latent_posterior, prior_samples, reconstruct_images,
                              save_conditional_samples)

__all__ = ["LoadedVAE", "load", "sample", "images_at", "reconstruct", "encode", "encode_split", "interpolate",
           "latent_manifold", "attribute_vector", "attribute_vector_for", "apply_attribute"]


# ---------------------------------------------------------------- on a model


# ---------------------------------------------------------------- on a loaded checkpoint


def sample(vae: LoadedVAE, n: int = 64, seed: int = 0, condition: torch.Tensor | None = None) -> torch.Tensor:
    """n images from the prior N(0, I); a conditional model's condition [C] or [n, C] (e.g.
    vae.conditioning.class_vector("7"), or .attribute_vector("Smiling=1"))."""
    if (condition is None) != (vae.conditioning is None):
        kind = "an unconditional" if vae.conditioning is None else f"a {vae.conditioning.kind}-conditional"
        raise UserError(f"sample: checkpoint '{vae.path}' is of {kind} model; expected a condition exactly for a "
                        f"conditional model (vae.conditioning.class_vector / attribute_vector)")
    return prior_samples(vae.model, n, seed, vae.device, condition).cpu()


def images_at(vae: LoadedVAE, split: str, indices: list[int]) -> torch.Tensor:
    return images_and_conditions(vae, split, indices)[0]


def images_and_conditions(vae: LoadedVAE, split: str, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(these images of a split [N, C, H, W], a conditional model's condition vectors [N, C'] of
    them, else None), each item read once."""
    dataset = vae.split(split)
    for i in indices:
        if not 0 <= i < len(dataset):
            raise UserError(f"image index {i}: expected 0 <= index < {len(dataset)} ({split} split)")
    items = [dataset[i] for i in indices]
    conditioning = vae.conditioning_for(split)
    return torch.stack([item[0] for item in items]), None if conditioning is None else conditioning.of_items(items)


def reconstruct(vae: LoadedVAE, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Reconstructions decoded from the posterior means (a conditional model: given the images' conditions)."""
    return reconstruct_images(vae.model, images.to(vae.device), condition).cpu()


@torch.no_grad()
def encode(vae: LoadedVAE, images: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
    images = images.to(vae.device)
    mu, _ = latent_posterior(vae.model, images, condition)
    return mu.float()


def encode_split(vae: LoadedVAE, split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(posterior means [N, D], labels [N]) over a split, in dataset order."""
    return encode_dataset(vae.model, vae.split(split), vae.device, max_images, vae.conditioning_for(split))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation (falls back to linear when a and b are nearly parallel)."""
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1).clamp(-1, 1).unsqueeze(-1)
    omega = torch.acos(cos)
    if omega.abs().max() < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


@torch.no_grad()
def interpolate(vae: LoadedVAE, images: torch.Tensor, steps: int = 10, spherical: bool = False,
                conditions: torch.Tensor | None = None) -> torch.Tensor:
    """[len(images) - 1, steps, C, H, W]: one row per consecutive pair, from the first mean to the
    second (a conditional model: its condition moves linearly from the first image's to the second's)."""
    if len(images) < 2:
        raise UserError(f"interpolate: got {len(images)} image(s); expected at least 2")
    if steps < 2:
        raise UserError(f"interpolate: --steps {steps}; expected at least 2")
    mu = encode(vae, images, conditions)
    rows = []
    for i, (a, b) in enumerate(zip(mu[:-1], mu[1:])):
        ts = torch.linspace(0, 1, steps).tolist()
        z = torch.stack([slerp(a, b, t) if spherical else a + t * (b - a) for t in ts])
        c = None if conditions is None else torch.stack([conditions[i] + t * (conditions[i + 1] - conditions[i])
                                                         for t in ts])
        rows.append(decode_images(vae.model, z, c).cpu())
    return torch.stack(rows)


@torch.no_grad()
def latent_manifold(vae: LoadedVAE, grid: int = 20, span: float = 3.0,
                    condition: torch.Tensor | None = None) -> torch.Tensor:
    """For a 2-d latent: decoded images over a grid of z in [-span, span]^2, row-major with z[1]
    decreasing (a conditional model: all given one condition [C])."""
    if vae.model.latent_dim != 2:
        raise UserError(f"latent manifold needs a 2-d latent; this model has {vae.model.latent_dim}")
    values = torch.linspace(-span, span, grid)
    z = torch.stack([torch.stack([x, y]) for y in values.flip(0) for x in values]).to(vae.device)
    return decode_images(vae.model, z, None if condition is None else condition.expand(len(z), -1)).cpu()


def attribute_vector(mu: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """z_diff = mean(mu | present) - mean(mu | absent)."""
    present = present.bool()
    if present.all() or not present.any():
        raise UserError(f"attribute vector: {int(present.sum())} of {len(present)} images have the attribute; "
                        f"expected both groups to be non-empty")
    return mu[present].mean(0) - mu[~present].mean(0)


def attribute_vector_for(vae: LoadedVAE, split: str = "train", attribute: str | None = None,
                         labels: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """The vector for a named attribute (datasets with attributes, e.g. CelebA's `Smiling`) or for a
    label pair on labeled data (`labels=(8, 1)`: mean of the 8s minus mean of the 1s). Returns (z_diff, metadata)."""
    dataset = vae.split(split)
    mu, y = encode_split(vae, split)
    if attribute is not None:
        names = list(getattr(dataset, "attribute_names", []))
        if not names:
            raise UserError(f"dataset {vae.cfg.data.name} has no named attributes; expected --labels A B "
                            f"(a label pair) instead of --attribute")
        if attribute not in names:
            raise UserError(f"attribute {attribute!r} not in {vae.cfg.data.name}; expected one of: {', '.join(names)}")
        present = dataset.attribute_values(attribute).bool()
        keep = torch.ones_like(present)
        what = {"attribute": attribute}
    elif labels is not None:
        a, b = labels
        keep = (y == a) | (y == b)
        present = y == a
        what = {"labels": [a, b]}
    else:
        raise UserError("attribute: expected --attribute NAME or --labels A B")
    z_diff = attribute_vector(mu[keep], present[keep])
    meta = {**what, "split": split, "present": int(present[keep].sum()), "absent": int((~present[keep]).sum()),
            "checkpoint": str(vae.path), "latent_dim": int(z_diff.numel())}
    return z_diff, meta


@torch.no_grad()
def apply_attribute(vae: LoadedVAE, images: torch.Tensor, z_diff: torch.Tensor,
                    alphas: list[float]) -> torch.Tensor:
    """[len(images), len(alphas), C, H, W]: decode(mu + alpha * z_diff). alpha = 0 is the reconstruction."""
    mu = encode(vae, images)
    z_diff = z_diff.to(mu.device, mu.dtype)
    # one decode per alpha over all images: the alpha = 0 batch is then exactly the
    # reconstruction batch (same values, same batch shape, so bit-identical output)
    columns = [decode_images(vae.model, mu + alpha * z_diff) for alpha in alphas]
    return torch.stack(columns, dim=1).cpu()


def save_attribute_vector(path: str | Path, z_diff: torch.Tensor, meta: dict) -> Path:
    path = Path(path)
    with replaced(path) as tmp:
        torch.save({"z_diff": z_diff.cpu(), "meta": meta}, tmp)
    with replaced(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({**meta, "norm": float(z_diff.norm())}, indent=2))
    return path


def load_attribute_vector(path: str | Path) -> tuple[torch.Tensor, dict]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["z_diff"], saved["meta"]
    except (OSError, RuntimeError, KeyError, EOFError) as err:
        raise UserError(f"attribute vector '{path}' unreadable ({type(err).__name__}); "
                        f"expected a file written by `fastvae.generate attribute`") from None


# ---------------------------------------------------------------- command line


def _out_dir(vae: LoadedVAE, out: str | None) -> Path:
    return Path(out) if out else vae.run_dir / "generated"


def asked_condition(vae, args) -> torch.Tensor | None:
    """The condition --condition / --attributes name, checked against the checkpoint's model."""
    text = args.condition if args.condition is not None else args.attributes
    if text is None:
        return None
    if vae.conditioning is None:
        flag = "--condition" if args.condition is not None else "--attributes"
        raise UserError(f"{flag} {text}: checkpoint '{vae.path}' is of an unconditional model; expected a checkpoint "
                        f"trained with model.condition=labels or attributes")
    if args.condition is not None:
        return vae.conditioning.class_vector(args.condition)
    return vae.conditioning.attribute_vector(args.attributes)


def cmd_sample(vae, args) -> list[Path]:
    out, condition = _out_dir(vae, args.out) / "samples.png", asked_condition(vae, args)
    what = f"latent dim {vae.model.latent_dim}, seed {args.seed}"
    if vae.conditioning is not None and condition is None:
        test_set = vae.split("test") if vae.conditioning.kind == "attributes" else None  # labels: no data needed
        return [save_conditional_samples(vae.model, vae.conditioning, test_set, args.n, args.seed, vae.device, out,
                                         what)]
    images = sample(vae, args.n, args.seed, condition)
    given = f" given {args.condition or args.attributes}" if condition is not None else ""
    return [pictures.save_grid(images, out, nrow=math.ceil(math.sqrt(args.n)),
                               title=f"{args.n} samples from N(0, I){given}, {what}")]


def cmd_reconstruct(vae, args) -> list[Path]:
    dataset = vae.split(args.split)
    images, conditions = images_and_conditions(vae, args.split, pictures.spread_indices(len(dataset), args.n))
    return [pictures.save_reconstruction_grid(images, reconstruct(vae, images, conditions),
                                              _out_dir(vae, args.out) / "reconstructions.png")]


def cmd_interpolate(vae, args) -> list[Path]:
    images, conditions = images_and_conditions(vae, args.split, args.indices)
    rows = interpolate(vae, images, args.steps, args.spherical, conditions)
    kind = "spherical" if args.spherical else "linear"
    labels = [f"#{a} -> #{b}" for a, b in zip(args.indices[:-1], args.indices[1:])]
    return [pictures.save_grid(rows.flatten(0, 1), _out_dir(vae, args.out) / f"interpolation_{kind}.png",
                               nrow=args.steps, title=f"{kind} interpolation between posterior means "
                               f"({args.split} images)", row_labels=labels)]


def cmd_latent_plot(vae, args) -> list[Path]:
    out = _out_dir(vae, args.out)
    mu, labels = encode_split(vae, args.split, args.max_points)
    written = [pictures.save_latent_scatter(mu, labels, out / "latent_scatter.png",
                                            f"Latent means of {len(mu)} {args.split} images ({vae.cfg.data.name})")]
    condition = asked_condition(vae, args)
    if vae.conditioning is not None and condition is None:
        print("fastvae: a conditional model's manifold is drawn given one condition: add --condition or --attributes")
    elif vae.model.latent_dim == 2:
        images = latent_manifold(vae, args.grid, args.span, condition)
        written.append(pictures.save_grid(images, out / "latent_manifold.png", nrow=args.grid,
                                          title=f"Decoded z over [-{args.span:g}, {args.span:g}]^2 "
                                          f"(z[0] left to right, z[1] top to bottom)"))
    else:
        print(f"fastvae: latent dim {vae.model.latent_dim} > 2: scatter drawn on the first two principal "
              f"components; the manifold grid needs a 2-d latent")
    return written


def class_names(dataset) -> tuple[str, ...]:
    """The data set's class names (MNIST's "0"-"9", an image folder's subfolders, ...)."""
    return tuple(getattr(base_dataset(dataset), "class_names", ()))


def cmd_attribute(vae, args) -> list[Path]:
    if vae.conditioning is not None:
        raise UserError(f"attribute: checkpoint '{vae.path}' is of a conditional model, whose z holds what the "
                        f"condition does not; expected `generate sample --condition` / `--attributes` for it, or an "
                        f"unconditional checkpoint")
    out = _out_dir(vae, args.out)
    if args.vector:
        z_diff, meta = load_attribute_vector(args.vector)
        if z_diff.numel() != vae.model.latent_dim:
            raise UserError(f"attribute vector '{args.vector}' has {z_diff.numel()} dims; "
                            f"expected the model's {vae.model.latent_dim}")
        name, written = Path(args.vector).stem, []
    else:
        labels = tuple(class_index(class_names(vae.split(args.split)), text, "--labels")
                       for text in args.labels) if args.labels else None
        z_diff, meta = attribute_vector_for(vae, args.split, args.attribute, labels)
        name = args.attribute or "labels_{}_minus_{}".format(*args.labels)
        written = [save_attribute_vector(out / f"attribute_{name}.pt", z_diff, meta)]
    what = meta.get("attribute") or "label {} - label {}".format(*meta["labels"])
    dataset = vae.split(args.apply_split)
    indices = args.indices or pictures.spread_indices(len(dataset), 6)
    sweep = apply_attribute(vae, images_at(vae, args.apply_split, indices), z_diff, args.alphas)
    alphas = ", ".join(f"{a:g}" for a in args.alphas)
    written.append(pictures.save_grid(sweep.flatten(0, 1), out / f"attribute_sweep_{name}.png", nrow=len(args.alphas),
                                      title=f"z + alpha * z_diff[{what}], alpha = {alphas}",
                                      row_labels=[f"image #{i}" for i in indices]))
    return written


def cmd_decode(vae, args) -> list[Path]:
    """A tokens shard's first n images, decoded from their token indices (fastvae tokenize)."""
    from fastvae.tokenize import read_tokens

    if vae.model.bottleneck() is None:
        raise UserError(f"--tokens: {vae.cfg.model.name} has a Gaussian latent; expected a tokenizer checkpoint")
    indices = read_tokens(args.tokens, vae.model)[:args.n]
    z = vae.model.bottleneck().decode_indices(indices.to(vae.device)).flatten(1)
    images = decode_images(vae.model, z).cpu()
    return [pictures.save_grid(images, _out_dir(vae, args.out) / "decoded_tokens.png",
                               nrow=math.ceil(math.sqrt(len(images))),
                               title=f"{len(images)} images decoded from {Path(args.tokens).name}")]


COMMANDS = {"sample": cmd_sample, "reconstruct": cmd_reconstruct, "interpolate": cmd_interpolate,
            "latent-plot": cmd_latent_plot, "attribute": cmd_attribute, "decode": cmd_decode}


def parse_args(argv):
    return generate_parser().parse_args(argv)


@exit_on_user_error
def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    if getattr(args, "n", 1) < 1:
        raise UserError(f"--n {args.n}: expected at least 1")
    if args.out:  # before any work: never into a checkpoint folder
        checked_output(args.out, "--out", "folder")
    vae = load(args.checkpoint, args.device, args.overrides, args.trust_model, args.ema)
    written = COMMANDS[args.command](vae, args)
    for path in written:
        print(f"fastvae: wrote {path}")
    return written


if __name__ == "__main__":
    main()
