"""The pictures a VAE run is judged by: prior samples, reconstructions, the latent map.

Grids are built with torchvision's make_grid and drawn with matplotlib so each
picture carries a title and row labels; everything is written as PNG.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def _show_grid(grid: torch.Tensor, path: Path, title: str, row_labels: list[str] | None = None,
               rows: int = 1) -> Path:
    """Draw a [C, H, W] grid in [0, 1] with a title (and one label per row) and save it as PNG."""
    image = grid.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    height, width = image.shape[:2]
    scale = 6.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(width * scale + (1.6 if row_labels else 0.2), height * scale + 0.6))
    ax.imshow(image.squeeze(-1) if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_title(title, fontsize=11)
    ax.set_xticks([])
    if row_labels:
        step = height / rows
        ax.set_yticks([step * (i + 0.5) for i in range(rows)], labels=row_labels, fontsize=8)
    else:
        ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def decode_images(model, z: torch.Tensor) -> torch.Tensor:
    """Images are sigmoid(logits) (the decoder gives logits)."""
    return torch.sigmoid(model.decode(z).float())


@torch.no_grad()
def save_sample_grid(model, path, n: int = 100, seed: int = 0, device="cpu") -> Path:
    """n images decoded from z ~ N(0, I), drawn from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.latent_dim, generator=g).to(device)
    images = decode_images(model, z)
    nrow = max(1, int(math.ceil(math.sqrt(n))))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    return _show_grid(grid, path, f"{n} samples from the prior N(0, I), latent dim {model.latent_dim}")


@torch.no_grad()
def save_reconstruction_grid(model, images: torch.Tensor, path, per_row: int = 10) -> Path:
    """Rows alternate: originals, then their reconstructions (decoded from the posterior mean)."""
    mu, _ = model.encode(images)
    recon = decode_images(model, mu)
    n = (len(images) // per_row) * per_row or len(images)
    per_row = min(per_row, n)
    rows = []
    for start in range(0, n, per_row):
        rows += [images[start:start + per_row].float(), recon[start:start + per_row]]
    grid = make_grid(torch.cat(rows).cpu(), nrow=per_row, padding=2, pad_value=1.0)
    labels = ["original", "reconstruction"] * (len(rows) // 2)
    return _show_grid(grid, path, "Test images and their reconstructions (z = mu)", labels, rows=len(rows))


def project_2d(points: torch.Tensor) -> tuple[torch.Tensor, str]:
    """2-d latents as they are; larger ones on their first two principal components."""
    points = points.float()
    if points.shape[1] == 2:
        return points, "z[0], z[1]"
    if points.shape[1] == 1:
        return torch.cat([points, torch.zeros_like(points)], 1), "z[0]"
    centered = points - points.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(centered, full_matrices=False)
    return centered @ v[:2].T, "PC 1, PC 2 of the latent means"


def save_latent_scatter(mu: torch.Tensor, labels: torch.Tensor, path, title: str,
                        class_names: list[str] | None = None) -> Path:
    """The lecture's picture: test-set latent means, colored by class."""
    xy, axes_label = project_2d(mu.cpu())
    labels = labels.cpu()
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10")
    for k in sorted(labels.unique().tolist()):
        sel = labels == k
        name = class_names[k] if class_names and k < len(class_names) else str(k)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, color=cmap(k % 10), label=name)
    ax.set_xlabel(axes_label.split(", ")[0])
    ax.set_ylabel(axes_label.split(", ")[-1])
    ax.set_title(title)
    ax.legend(markerscale=3, fontsize=8, loc="best", title="label")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
