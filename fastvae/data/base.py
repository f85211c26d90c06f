"""Dataset building blocks shared by every source: in-memory uint8 images and a fixed split.

torchvision is imported where images are decoded and resized (image folders, CelebA), not at
module level: the MNIST path, generate and evaluate then start without it (torchvision's import
pulls in torch._dynamo: ~1.2 s of every command's start on our CPUs, docs/development.md).
"""

from __future__ import annotations

import sys

import torch
from torch.utils.data import DataLoader, Dataset, default_collate


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [0, 1], bit for bit what torchvision's to_dtype(..., scale=True) gives (a
    multiplication by 1/255, not a division): every loader feeds the model the same numbers."""
    return images.to(torch.float32).mul_(1.0 / 255)


class CoverResize:
    """Resize so the image covers (height, width), keeping its aspect ratio (the crop then cuts the
    rest): torchvision's Resize(int) sets the smaller side, which covers only square targets."""

    def __init__(self, height: int, width: int) -> None:
        self.height, self.width = height, width

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        scale = max(self.height / h, self.width / w)
        size = [max(self.height, round(h * scale)), max(self.width, round(w * scale))]
        from torchvision.transforms.v2.functional import resize

        return resize(image, size, antialias=True)


def image_transform(image_size: tuple[int, int], center_crop: int = 0):
    """uint8 CHW -> float32 CHW in [0, 1]: optional center crop, then resize to cover (height, width)
    and center-crop to it (DFC-VAE on CelebA: crop 148, resize 64). A torchvision v2.Compose."""
    from torchvision.transforms import v2

    height, width = image_size
    steps = [v2.CenterCrop(center_crop)] if center_crop else []
    if height == width:  # torchvision's own square path: the pixels every square run has trained on
        steps += [v2.Resize(height, antialias=True), v2.CenterCrop(height)]
    else:
        steps += [CoverResize(height, width), v2.CenterCrop([height, width])]
    return v2.Compose(steps + [v2.ToDtype(torch.float32, scale=True)])


class ImageTensorDataset(Dataset):
    """uint8 images [N, C, H, W] + int labels held in memory.

    Items are (image float32 in [0, 1], label, index): the index lets a run
    record exactly which samples each rank trained on.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, class_names: tuple[str, ...] | None = None) -> None:
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        assert len(images) == len(labels)
        self.images = images
        self.labels = labels.long()
        classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.class_names = tuple(class_names) if class_names else tuple(str(i) for i in range(classes))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        # the same uint8 -> float conversion as every other fastvae loader (bit-identical inputs)
        return unit_float(self.images[index]), self.labels[index], index


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float images in [0, 1] back to the uint8 they were converted from: every decoded source gives
    uint8 / 255, so this round-trips exactly (what a raw .beton and the in-memory loader hold)."""
    return (images * 255).round().to(torch.uint8)


def mirror_where(images: torch.Tensor, flags: torch.Tensor) -> torch.Tensor:
    """images [B, C, H, W] flipped left-right where flags [B] is True (data.flip), on their device."""
    return torch.where(flags.view(-1, 1, 1, 1), images.flip(-1), images)


def fixed_split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic (train_idx, test_idx) from a seeded permutation: same seed, same split, any machine."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = int(round(n * test_fraction))
    return order[n_test:].sort().values, order[:n_test].sort().values


def in_order_loader(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> DataLoader:
    """Batches in dataset order. Its own generator: starting an iterator draws a seed
    from the loader's generator, and the global one belongs to training (exact resume)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator(),
                      num_workers=num_workers, collate_fn=collate_skipping_corrupt)


def report_corrupt(path, err: Exception, skip: bool):
    """A file that cannot be decoded: None (the batch goes on without it) when skipping, else a one-line error."""
    from fastvae.errors import UserError

    bomb = type(err).__name__ == "DecompressionBombError"  # PIL's guard against huge pixel counts
    why = "larger than PIL's decompression-bomb limit" if bomb else type(err).__name__
    message = f"image '{path}' could not be decoded ({why}); expected a valid image file"
    if not skip:
        raise UserError(message)
    print(f"fastvae: skipping {message.split(';')[0]}", file=sys.stderr, flush=True)
    return None


def collate_skipping_corrupt(batch):
    """default_collate over the items that decoded (data.skip_corrupt returns None for the others)."""
    return default_collate([item for item in batch if item is not None])
