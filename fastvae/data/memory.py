"""Training batches sliced from a uint8 image tensor held in memory: on the CPU, or on the GPU
(the data set then never crosses PCIe again).

A torch DataLoader calls `__getitem__` once per image and collates the results; here a batch is
one gather from the uint8 tensor and one uint8 -> float conversion (the same conversion as every
other fastvae loader, so inputs are bit-identical), with random flips on the device.

Order and shards: fastvae.data.sharding (the rule every loader follows), with the epoch's
permutation held on the device.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from fastvae.data.base import ImageTensorDataset, in_order_loader, mirror_where, to_uint8, unit_float
from fastvae.data.sharding import ShardPlan


def decode_to_memory(dataset, num_workers: int = 0, progress: bool = True) -> tuple[torch.Tensor, ...]:
    """Every item of a data set read image by image (CelebA, image folders), decoded once into one
    uint8 tensor by `num_workers` DataLoader workers: the same quantization as a raw .beton.
    Skipped corrupt images stay out. `progress`: a bar (one process of a job shows it)."""
    images, labels, indices = [], [], []
    for x, y, index in tqdm(in_order_loader(dataset, num_workers=num_workers), desc="decode into memory",
                            unit="batch", disable=not progress):
        images.append(to_uint8(x))
        labels.append(torch.as_tensor(y))
        indices.append(torch.as_tensor(index))
    return torch.cat(images), torch.cat(labels), torch.cat(indices)


class DecodedOnce(Dataset):
    """A data set read image by image whose first `max_items` distinct items are kept as uint8 once
    decoded: the test images a run evaluates and draws every epoch are decoded in the first epoch
    only (at 64 px, 5,000 images are 61 MB). The same uint8 -> float conversion as the data set's
    own, so items are bit-identical to its."""

    def __init__(self, dataset, max_items: int) -> None:
        self.dataset, self.max_items, self.kept = dataset, max_items, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        if index in self.kept:
            image, label, sample_id = self.kept[index]
            return unit_float(image), label, sample_id
        item = self.dataset[index]
        if item is not None and len(self.kept) < self.max_items:
            self.kept[index] = (to_uint8(item[0]), *item[1:])
        return item


def decoded_once(dataset, max_items: int):
    """`dataset` itself when its images are held as tensors already, else DecodedOnce of it."""
    return dataset if held_as_tensors(dataset) else DecodedOnce(dataset, max_items)


def held_as_tensors(dataset) -> bool:
    """An ImageTensorDataset, or a Subset of one (data.limit, fixed splits)."""
    return isinstance(dataset, ImageTensorDataset) or (
        isinstance(dataset, Subset) and isinstance(dataset.dataset, ImageTensorDataset))


def in_memory_tensors(dataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(uint8 images, labels, dataset indices) of a dataset held as tensors, else None."""
    if not held_as_tensors(dataset):
        return None
    if isinstance(dataset, ImageTensorDataset):
        return dataset.images, dataset.labels, torch.arange(len(dataset))
    keep = torch.as_tensor(list(dataset.indices))
    return dataset.dataset.images[keep], dataset.dataset.labels[keep], torch.arange(len(keep))


class MemoryTrainLoader:
    """A TrainLoader (fastvae.data.loaders) over the uint8 data set held on the device: every batch is
    one gather, flipped where the epoch's seeded draw says (data.flip)."""

    def __init__(self, tensors, batch_size: int, seed: int, device: torch.device, drop_last: bool = True,
                 flip: bool = False, rank: int = 0, world_size: int = 1) -> None:
        images, labels, indices = tensors
        self.images, self.labels, self.indices = images.to(device), labels.to(device), indices.to(device)
        self.plan = ShardPlan(len(images), batch_size, seed, rank, world_size, drop_last)
        self.device, self.flip, self.epoch = device, flip, 0

    def __len__(self) -> int:
        return len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self, start: int):
        order = self.plan.order(self.epoch).to(self.device)
        flips = self.plan.flips(self.epoch).to(self.device) if self.flip else None
        for b in range(start, len(self)):
            take = self.plan.share(order, b)
            x = unit_float(self.images[take])
            if self.flip:
                x = mirror_where(x, flips[take])
            yield x, self.labels[take], self.indices[take]

    def __iter__(self):
        return self._batches(0)

    def skip_first(self, n: int):
        """This epoch's batches after the first n (resume inside an epoch)."""
        return self._batches(n)
