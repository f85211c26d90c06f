"""Any folder of images (recursively), resized to [height, width]; labels from first-level subfolders."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from PIL import Image, UnidentifiedImageError

from fastvae.data.base import fixed_split, image_transform, report_corrupt
from fastvae.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def list_images(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


# PIL's mode for each channel count an image folder can give.
PIL_MODES = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}


class ImageFolderDataset(Dataset):
    """Decoded lazily with torchvision.io; items are (image, label, index) like every fastvae dataset."""

    def __init__(self, files: list[Path], labels: list[int], image_size: tuple[int, int], channels: int,
                 center_crop: int = 0, skip_corrupt: bool = False) -> None:
        self.files, self.labels, self.skip_corrupt = files, labels, skip_corrupt
        self.mode = PIL_MODES[channels]
        self.transform = image_transform(image_size, center_crop)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        from torchvision.transforms.v2.functional import pil_to_tensor  # (fastvae.data.base says why here)

        path = self.files[index]
        # PIL decodes: torchvision 0.29 deprecates its own image decoders
        try:
            with Image.open(path) as img:
                image = pil_to_tensor(img.convert(self.mode))
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as err:
            return report_corrupt(path, err, self.skip_corrupt)
        return self.transform(image), torch.tensor(self.labels[index]), index


def image_folder(root: str, image_size: tuple[int, int], channels: int, center_crop: int,
                 test_fraction: float, split_seed: int, skip_corrupt: bool = False):
    if channels not in PIL_MODES:
        raise UserError(f"data.channels={channels}: image folders give 1 (grey), 2 (grey + alpha), 3 (RGB) or "
                        f"4 (RGBA) channels; expected one of those")
    if not root:
        raise UserError("data.root is empty; expected the folder of images for data.name=imagefolder")
    root_path = Path(root)
    if not root_path.is_dir():
        raise UserError(f"image folder '{root_path}' not found; expected a folder of images")
    files = list_images(root_path)
    if not files:
        raise UserError(f"image folder '{root_path}' holds no images; expected files ending in "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}")
    classes = sorted({f.relative_to(root_path).parts[0] for f in files if f.parent != root_path})
    class_index = {name: i for i, name in enumerate(classes)}
    labels = [class_index.get(f.relative_to(root_path).parts[0], 0) if f.parent != root_path else 0
              for f in files]
    train_idx, test_idx = fixed_split(len(files), test_fraction, split_seed)

    def subset(idx):
        dataset = ImageFolderDataset([files[i] for i in idx], [labels[i] for i in idx],
                                     image_size, channels, center_crop, skip_corrupt)
        dataset.class_names = tuple(classes)  # first-level subfolders, sorted: label i is classes[i]
        return dataset

    return subset(train_idx.tolist()), subset(test_idx.tolist())
