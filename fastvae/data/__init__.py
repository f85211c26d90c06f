"""Dataset registry: config.data -> (train, test) datasets of (image in [0,1], label, index)."""

from __future__ import annotations

from torch.utils.data import Dataset, Subset

from fastvae.data.base import in_order_loader
from fastvae.data.celeba import celeba
from fastvae.data.imagefolder import image_folder
from fastvae.data.mnist import embedded_mnist, fashion_mnist
from fastvae.config import image_hw
from fastvae.errors import UserError

__all__ = ["build_datasets", "in_order_loader"]


def build_datasets(data_cfg) -> tuple[Dataset, Dataset]:
    """From a validated config's data section (fastvae.config checks sizes against the dataset)."""
    name = data_cfg.name
    if name == "mnist":
        train, test = embedded_mnist(data_cfg.test_fraction, data_cfg.split_seed, data_cfg.root)
    elif name == "fashion_mnist":
        train, test = fashion_mnist(data_cfg.root)
    elif name == "imagefolder":
        train, test = image_folder(data_cfg.root, image_hw(data_cfg), data_cfg.channels,
                                   data_cfg.center_crop, data_cfg.test_fraction, data_cfg.split_seed,
                                   data_cfg.skip_corrupt)
    elif name == "celeba":
        if not data_cfg.root:
            raise UserError("data.root is empty; expected the CelebA folder (holding img_align_celeba/)")
        train, test = celeba(data_cfg.root, image_hw(data_cfg), data_cfg.center_crop, data_cfg.label_attribute,
                             data_cfg.test_split, data_cfg.skip_corrupt)
    else:
        raise UserError(f"data.name {name!r}: expected mnist, fashion_mnist, imagefolder or celeba")
    if data_cfg.limit:
        train = Subset(train, range(min(data_cfg.limit, len(train))))
    return train, test
