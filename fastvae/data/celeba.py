"""CelebA in its official on-disk layout, with the 40 attributes by name.

    ROOT/img_align_celeba/000001.jpg ...   178x218 aligned faces
    ROOT/list_attr_celeba.txt              line 1: image count; line 2: the 40 attribute names;
                                           then `000001.jpg  -1  1 ...` (40 values of 1 / -1)
    ROOT/list_eval_partition.txt           `000001.jpg 0` (0 train, 1 valid, 2 test)

torchvision's layout (ROOT/celeba/<the same files>) is accepted too. Images are
center-cropped (148 in DFC-VAE) and resized; items are (image, label, index)
where label is the 0/1 value of `data.label_attribute` (it colors latent plots).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from fastvae.data.base import image_transform, report_corrupt
from fastvae.errors import UserError

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"
SPLIT_CODES = {"train": 0, "valid": 1, "test": 2}


def find_root(root: str | Path) -> Path:
    root = Path(root)
    for candidate in (root, root / "celeba"):
        if (candidate / ATTR_FILE).is_file() or (candidate / IMAGE_DIR).is_dir():
            return candidate
    raise UserError(f"CelebA folder '{root}' not found or incomplete; expected {IMAGE_DIR}/ and {ATTR_FILE} "
                    f"in it (or in its celeba/ subfolder)")


def read_attributes(path: Path) -> tuple[list[str], list[str], torch.Tensor]:
    """(file names, attribute names, uint8 0/1 values [N, A]) with every line checked."""
    if not path.is_file():
        raise UserError(f"CelebA attribute file '{path}' not found; expected {ATTR_FILE}")
    lines = path.read_text().splitlines()
    try:
        count = int(lines[0].strip())
    except (IndexError, ValueError):
        raise UserError(f"{path} line 1: expected the image count, got {lines[0][:40] if lines else ''!r}") from None
    if len(lines) < 2:
        raise UserError(f"{path} line 2: missing; expected the attribute names")
    names = lines[1].split()
    rows = [(i + 3, line.split()) for i, line in enumerate(lines[2:]) if line.strip()]
    if len(rows) != count:
        raise UserError(f"{path} line 1: says {count} images but the file lists {len(rows)}")
    files, values = [], []
    for lineno, parts in rows:
        if len(parts) != len(names) + 1:
            raise UserError(f"{path} line {lineno}: {len(parts) - 1} values; expected {len(names)} "
                            f"(one per attribute)")
        if any(v not in ("1", "-1") for v in parts[1:]):
            raise UserError(f"{path} line {lineno}: values must be 1 or -1")
        files.append(parts[0])
        values.append([v == "1" for v in parts[1:]])
    return files, names, torch.tensor(values, dtype=torch.uint8)


def read_partition(path: Path, files: list[str]) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"CelebA partition file '{path}' not found; expected {PARTITION_FILE}")
    split_of = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise UserError(f"{path} line {lineno}: expected `<file> <0|1|2>`, got {line[:60]!r}")
        split_of[parts[0]] = int(parts[1])
    missing = [f for f in files if f not in split_of]
    if missing:
        raise UserError(f"{path}: no partition for {missing[0]} (and {len(missing) - 1} more); "
                        f"expected every image of {ATTR_FILE}")
    return torch.tensor([split_of[f] for f in files])


class CelebA(Dataset):
    def __init__(self, image_dir: Path, files: list[str], attribute_names: list[str], attributes: torch.Tensor,
                 image_size: tuple[int, int], center_crop: int, label_attribute: str, skip_corrupt: bool = False) -> None:
        self.image_dir, self.files, self.skip_corrupt = image_dir, files, skip_corrupt
        self.attribute_names = tuple(attribute_names)
        self.attributes = attributes
        self.transform = image_transform(image_size, center_crop)
        self.labels = self.attribute_values(label_attribute).long()
        self.class_names = (f"not_{label_attribute}", label_attribute)  # label 0 / 1

    def __len__(self) -> int:
        return len(self.files)

    def attribute_values(self, name: str) -> torch.Tensor:
        """0/1 per image for an attribute given by name, e.g. `Smiling`."""
        if name not in self.attribute_names:
            raise UserError(f"CelebA attribute {name!r} unknown; expected one of: {', '.join(self.attribute_names)}")
        return self.attributes[:, self.attribute_names.index(name)]

    def __getitem__(self, index: int):
        from torchvision.transforms.v2.functional import pil_to_tensor  # (fastvae.data.base says why here)

        path = self.image_dir / self.files[index]
        try:
            with Image.open(path) as img:
                image = pil_to_tensor(img.convert("RGB"))
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as err:
            return report_corrupt(path, err, self.skip_corrupt)
        return self.transform(image), self.labels[index], index


def celeba(root: str, image_size: tuple[int, int], center_crop: int, label_attribute: str, test_split: str = "test",
           skip_corrupt: bool = False):
    """(train, test) by the official partition; test_split may be "valid"."""
    base = find_root(root)
    files, names, attributes = read_attributes(base / ATTR_FILE)
    split = read_partition(base / PARTITION_FILE, files)
    image_dir = base / IMAGE_DIR
    if not image_dir.is_dir():
        raise UserError(f"CelebA image folder '{image_dir}' not found; expected the aligned JPEGs")
    present = set(os.listdir(image_dir))  # one listing, not 200k stat calls
    for lineno, name in enumerate(files, start=3):
        if name not in present:
            raise UserError(f"{base / ATTR_FILE} line {lineno}: image '{image_dir / name}' is missing")

    def subset(code: int) -> CelebA:
        keep = (split == code).nonzero().flatten().tolist()
        return CelebA(image_dir, [files[i] for i in keep], names, attributes[keep], image_size, center_crop,
                      label_attribute, skip_corrupt)

    return subset(SPLIT_CODES["train"]), subset(SPLIT_CODES[test_split])
