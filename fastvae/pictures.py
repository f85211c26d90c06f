"""Drawing the pictures a VAE is judged by: image grids with a title and row labels, and latent
scatter plots. Only drawing: the images come from fastvae.generate.

Grids are tiled as torchvision's make_grid tiles them (`tile`, written here so that drawing a
grid does not import torchvision: fastvae.data.base says why); the title band and row labels are
drawn with Pillow so the PNG's pixel size is exact and predictable:
    width  = LABEL_WIDTH (if row labels) + scale * grid_width
    height = title_band_height(title, width) + scale * grid_height
with an integer upscale so 28x28 digits are visible; a title too long for the
width wraps onto more lines (TITLE_HEIGHT for one line, +TITLE_LINE per extra
line). Scatter plots use matplotlib (imported when one is drawn).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from fastvae.atomic import replaced

TITLE_HEIGHT = 28
TITLE_LINE = 18
TITLE_FONT = 14
LABEL_WIDTH = 110
PADDING = 2
MIN_CELL = 56  # images are upscaled by an integer factor until a cell is at least this big


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def wrap_title(title: str, width: int) -> list[str]:
    """Greedy word wrap of the title to the canvas width (measured with the font actually used)."""
    font = _font(TITLE_FONT)
    lines: list[str] = []
    for word in title.split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width - 8:
            lines[-1] = trial
        else:
            lines.append(word)
    return lines or [""]


def title_band_height(title: str, width: int) -> int:
    return TITLE_HEIGHT + TITLE_LINE * (len(wrap_title(title, width)) - 1)


def grid_scale(image_size: int) -> int:
    return max(1, math.ceil(MIN_CELL / image_size))


def displayable(images: torch.Tensor) -> torch.Tensor:
    """Images a PNG shows: grey and RGB as they are, RGBA without its alpha, any other channel
    count as its first channel in grey."""
    channels = images.shape[1]
    if channels in (1, 3):
        return images
    return images[:, :3] if channels == 4 else images[:, :1]


def tile(images: torch.Tensor, nrow: int, padding: int = PADDING, pad_value: float = 1.0) -> torch.Tensor:
    """images [N, C, H, W] (C 1 or 3) -> one [3, H', W'] grid, laid out as torchvision's make_grid
    lays it out: min(nrow, N) columns, `padding` around every image, grey repeated to RGB, and one
    image returned as it is (no padding)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if len(images) == 1:
        return images[0]
    n, channels, h, w = images.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full((channels, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for k, image in enumerate(images):
        top, left = (k // cols) * (h + padding) + padding, (k % cols) * (w + padding) + padding
        grid[:, top:top + h, left:left + w] = image
    return grid


def labeled_grid(images: torch.Tensor, nrow: int, title: str, row_labels: list[str] | None = None) -> Image.Image:
    """images [N, C, H, W] in [0, 1] -> a PIL image: title band on top, one label per grid row on the left."""
    images = displayable(images.detach().float().clamp(0, 1).cpu())
    scale = grid_scale(min(images.shape[-2:]))
    grid = tile(images, nrow)
    array = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
    body = Image.fromarray(array).convert("RGB")
    body = body.resize((body.width * scale, body.height * scale), Image.NEAREST)
    left = LABEL_WIDTH if row_labels else 0
    width = left + body.width
    band = title_band_height(title, width)
    canvas = Image.new("RGB", (width, band + body.height), "white")
    canvas.paste(body, (left, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(wrap_title(title, width)):
        draw.text((4, 6 + i * TITLE_LINE), line, fill="black", font=_font(TITLE_FONT))
    if row_labels:
        cell = (images.shape[-2] + PADDING) * scale
        font = _font(12)
        for i, label in enumerate(row_labels):
            y = band + PADDING * scale + i * cell + cell // 2 - 8
            draw.text((4, y), label, fill="black", font=font)
    return canvas


def save_grid(images: torch.Tensor, path, nrow: int, title: str, row_labels: list[str] | None = None) -> Path:
    path = Path(path)
    with replaced(path) as tmp:
        labeled_grid(images, nrow, title, row_labels).save(tmp)
    return path


def spread_indices(length: int, k: int) -> list[int]:
    """k indices evenly spread over range(length): class-sorted splits still show every class."""
    return torch.linspace(0, length - 1, min(k, length)).long().tolist()


def save_sample_grid(images: torch.Tensor, path, latent_dim: int, seed: int) -> Path:
    n = len(images)
    return save_grid(images, path, nrow=max(1, math.ceil(math.sqrt(n))),
                     title=f"{n} samples from the prior N(0, I), latent dim {latent_dim}, seed {seed}")


def save_reconstruction_grid(images: torch.Tensor, recon: torch.Tensor, path, per_row: int = 10) -> Path:
    """Rows alternate: originals, then their reconstructions."""
    recon = recon.float().cpu()
    images = images.float().cpu()
    per_row = min(per_row, len(images))
    rows, labels = [], []
    for start in range(0, len(images), per_row):
        rows += [images[start:start + per_row], recon[start:start + per_row]]
        labels += ["original", "reconstruction"]
    if len(rows[-1]) < per_row:  # keep the grid rectangular
        rows, labels = rows[:-2], labels[:-2]
    return save_grid(torch.cat(rows), path, nrow=per_row, title="Test images and their reconstructions (z = mu)",
                     row_labels=labels)


def project_2d(points: torch.Tensor) -> tuple[torch.Tensor, tuple[str, str]]:
    """2-d latents as they are; larger ones on their first two principal components."""
    points = points.float()
    if points.shape[1] == 2:
        return points, ("z[0]", "z[1]")
    if points.shape[1] == 1:
        return torch.cat([points, torch.zeros_like(points)], 1), ("z[0]", "")
    centered = points - points.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[:2].T, ("principal component 1", "principal component 2")


def save_latent_scatter(mu: torch.Tensor, labels: torch.Tensor, path, title: str,
                        class_names: list[str] | None = None) -> Path:
    """The lecture's picture: latent means colored by class (PCA for latents larger than 2)."""
    # matplotlib's object API, not pyplot: no global backend is chosen or changed (a notebook keeps
    # its own), and nothing is imported until a scatter is drawn
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    xy, (xlabel, ylabel) = project_2d(mu.cpu())
    labels = labels.cpu()
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    cmap = colormaps["tab10"]
    for k in sorted(labels.unique().tolist()):
        sel = labels == k
        name = class_names[k] if class_names and k < len(class_names) else str(k)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(k % 10), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title if mu.shape[1] <= 2 else f"{title} (PCA of {mu.shape[1]}-d means)")
    ax.legend(markerscale=3, fontsize=8, loc="best", title="label")
    fig.tight_layout()
    path = Path(path)
    with replaced(path) as tmp:
        fig.savefig(tmp, dpi=100)
    return path
