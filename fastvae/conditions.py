"""What a conditional VAE (model.condition) is conditioned on, as one float vector per image.

labels: the image's class, one-hot over model.condition_names (MNIST digits, Fashion-MNIST classes,
image-folder subfolders, CelebA's data.label_attribute as two classes). attributes: CelebA's 40
attributes as 0/1, looked up by the image's index in its data set. Encoder and decoder both get the
vector (fastvae.models.base). The names are resolved from the data when training starts and are
recorded in the run's config, so a checkpoint is sampled from without its data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Subset

from fastvae.errors import UserError

KINDS = ("none", "labels", "attributes")


def base_dataset(dataset):
    """The data set under Subset (data.limit) and DecodedOnce wrappers."""
    from fastvae.data.memory import DecodedOnce

    while isinstance(dataset, (Subset, DecodedOnce)):
        dataset = dataset.dataset
    return dataset


def class_index(names, text: str, flag: str) -> int:
    """A class asked for by name (`circle`, `Sneaker`) or index (`7`); names are the data set's
    class names (an image folder's: its first-level subfolders, in alphabetical order)."""
    names = list(names)
    index = names.index(text) if text in names else int(text) if text.isdigit() else -1
    if not 0 <= index < len(names):
        raise UserError(f"{flag} {text}: expected a class index 0-{len(names) - 1} or one of: {', '.join(names)}")
    return index


def names_from_data(kind: str, dataset, data_name: str) -> list[str]:
    """model.condition_names for a data set: its class names, or its attribute names."""
    base = base_dataset(dataset)
    if kind == "attributes":
        names = list(getattr(base, "attribute_names", ()))
        if not names:
            raise UserError(f"config key 'model.condition': data.name={data_name} has no attributes; expected "
                            f"model.condition=labels (or data.name=celeba for attributes)")
        return names
    names = list(getattr(base, "class_names", ()))
    if len(names) < 2:
        raise UserError(f"config key 'model.condition': data.name={data_name} has {len(names)} class(es); expected "
                        f"at least 2 (an image folder: one subfolder per class)")
    return names


@dataclass(frozen=True)
class Conditioning:
    """The condition vectors of the images of one data set (`table`: its attributes, by index)."""

    kind: str
    names: tuple[str, ...]
    table: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return len(self.names)

    def of_batch(self, labels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """[B, dim] float on the labels' device; no host read (one-hot by comparison)."""
        if self.kind == "labels":
            return (labels.reshape(-1, 1) == torch.arange(self.dim, device=labels.device)).float()
        return self.table[ids.to(self.table.device).long()].float().to(ids.device)

    def to(self, device) -> "Conditioning":
        """With the table on `device` (the training step looks rows up there)."""
        return self if self.table is None else Conditioning(self.kind, self.names, self.table.to(device))

    def for_dataset(self, dataset) -> "Conditioning":
        """This conditioning bound to a data set's images (attributes: their table)."""
        if self.kind != "attributes":
            return self
        base = base_dataset(dataset)
        names = tuple(getattr(base, "attribute_names", ()))
        if names != self.names:
            raise UserError(f"data set attributes {list(names)[:3]}...: expected the {self.dim} attributes the "
                            f"model was trained on")
        return Conditioning(self.kind, self.names, base.attributes.to(torch.uint8))

    def of_items(self, items: list) -> torch.Tensor:
        """The condition vectors [N, dim] of items (image, label, index) already read from the data
        set this conditioning is bound to (for_dataset)."""
        labels = torch.stack([torch.as_tensor(label).reshape(()) for _, label, _ in items])
        return self.of_batch(labels, torch.as_tensor([int(sample_id) for _, _, sample_id in items]))

    def class_vector(self, text: str) -> torch.Tensor:
        """`--condition 7` or `--condition Sneaker`: the one-hot vector of a class by index or name."""
        if self.kind != "labels":
            raise UserError(f"--condition {text}: this model is conditioned on attributes; expected --attributes "
                            f"NAME=0|1,...")
        return torch.eye(self.dim)[class_index(self.names, text, "--condition")]

    def attribute_vector(self, text: str) -> torch.Tensor:
        """`--attributes Smiling=1,Male=0`: those attributes set, every other one 0 (absent)."""
        if self.kind != "attributes":
            raise UserError(f"--attributes {text}: this model is conditioned on labels; expected --condition CLASS")
        vector = torch.zeros(self.dim)
        for part in text.split(","):
            name, sep, value = part.partition("=")
            if not sep or name not in self.names or value not in ("0", "1"):
                raise UserError(f"--attributes {text}: {part!r}; expected NAME=0 or NAME=1 with NAME one of: "
                                f"{', '.join(self.names)}")
            vector[self.names.index(name)] = float(value)
        return vector


def conditioning_of(model_cfg) -> Conditioning | None:
    """The run's conditioning from its config (names resolved), or None for an unconditional model."""
    if model_cfg.condition == "none":
        return None
    return Conditioning(model_cfg.condition, tuple(model_cfg.condition_names))
