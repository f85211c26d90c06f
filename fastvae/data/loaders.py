"""The training loader: batches from the data set held in memory, from a torch DataLoader, or from
an FFCV loader. All three are a TrainLoader: they shard by one rule (fastvae.data.sharding), deliver
(x, label, sample id) on the device, and resume inside an epoch with skip_first."""

from __future__ import annotations

from typing import Iterator, Protocol

import torch
from torch.utils.data import DataLoader

from fastvae.config import Config, image_hw
from fastvae.data.base import collate_skipping_corrupt
from fastvae.data.memory import MemoryTrainLoader, decode_to_memory, in_memory_tensors
from fastvae.data.sharding import ShardPlan
from fastvae.errors import UserError


Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images float [B, C, H, W] in [0, 1], labels, sample ids


class TrainLoader(Protocol):
    """What the Trainer asks of a training loader (MemoryTrainLoader, TorchTrainLoader, FFCVTrainLoader)."""

    def __len__(self) -> int:
        """Batches per epoch on this rank (every rank has as many)."""

    def set_epoch(self, epoch: int) -> None:
        """Take the order of `epoch` (one seeded permutation per epoch: fastvae.data.sharding)."""

    def __iter__(self) -> Iterator[Batch]:
        """This rank's batches of the epoch, on the training device."""

    def skip_first(self, n: int) -> Iterator[Batch]:
        """The epoch's batches after the first n, reading none of those (resume inside an epoch)."""


DROPPED_SHARE_SAID = 0.10  # data.drop_last leaving out more of each epoch than this is said at start-up


def dropped_images_notice(cfg: Config, images: int, num_processes: int) -> str | None:
    """What data.drop_last costs a small data set, in words, when it leaves out a large share of
    every epoch (181 images in batches of 128: 53 of them); None when it is little or nothing."""
    global_batch = cfg.data.batch_size * num_processes
    dropped = images % global_batch if cfg.data.drop_last else 0
    if not images or dropped / images <= DROPPED_SHARE_SAID:
        return None
    return (f"fastvae: data.drop_last=true leaves {dropped} of the {images} training images out of every epoch "
            f"({dropped / images:.0%}; global batches of {global_batch}, a new draw each epoch); "
            f"data.drop_last=false trains on them too, or choose a data.batch_size that divides the data set")


def build_train_loader(cfg: Config, train_set, num_processes: int, device: torch.device, rank: int = 0) -> TrainLoader:
    global_batch = cfg.data.batch_size * num_processes
    if cfg.data.drop_last and len(train_set) < global_batch:
        raise UserError(f"data.batch_size={cfg.data.batch_size} x {num_processes} process(es) "
                        f"is larger than the {len(train_set)} training images; expected at most "
                        f"{len(train_set) // num_processes} per process (or data.drop_last=false)")
    if cfg.data.loader == "ffcv":
        from fastvae.data.ffcv_loader import FFCVTrainLoader

        return FFCVTrainLoader(cfg.data.beton, cfg.data.batch_size, cfg.data.channels, device, cfg.seed,
                               cfg.data.order, cfg.data.flip, cfg.data.drop_last, rank, num_processes,
                               num_workers=max(1, cfg.data.num_workers), image_size=image_hw(cfg.data))
    tensors = tensors_to_hold(cfg, train_set, device, progress=rank == 0)
    if tensors is not None:
        return MemoryTrainLoader(tensors, cfg.data.batch_size, cfg.seed, device, cfg.data.drop_last, cfg.data.flip,
                              rank, num_processes)
    if cfg.data.flip:
        raise UserError(f"data.flip: random flips need data.loader=memory or ffcv, and {cfg.data.name} is read "
                        f"image by image; expected data.flip=false or data.loader=ffcv")
    plan = ShardPlan(len(train_set), cfg.data.batch_size, cfg.seed, rank, num_processes, cfg.data.drop_last)
    return TorchTrainLoader(train_set, plan, device, cfg.data.num_workers)


def tensors_to_hold(cfg: Config, train_set, device: torch.device, progress: bool = True):
    """The uint8 training set for the in-memory loader, or None for a DataLoader: what data.loader
    asks for, and for auto the data set's own tensors, or on a GPU a copy decoded once when it fits."""
    if cfg.data.loader == "memory" and cfg.data.beton:  # FFCV decodes it many times faster than image by image
        from fastvae.data.ffcv_loader import beton_to_memory

        return beton_to_memory(cfg.data.beton, cfg.data.channels, image_hw(cfg.data),
                               max(1, cfg.data.num_workers), progress)
    if cfg.data.loader == "torch":
        return None
    tensors = in_memory_tensors(train_set)
    if tensors is None and (cfg.data.loader == "memory" or fits_on_gpu(cfg, len(train_set), device)):
        tensors = decode_to_memory(train_set, cfg.data.num_workers, progress)
    return tensors


GPU_SHARE_FOR_DATA = 0.25  # of a GPU's memory, at most, for a data set auto holds there


def fits_on_gpu(cfg: Config, images: int, device: torch.device) -> bool:
    """data.loader=auto on a GPU holds a data set read image by image (CelebA, image folders) in GPU
    memory, decoded once, when its uint8 copy takes at most GPU_SHARE_FOR_DATA of the GPU's memory:
    a DataLoader decodes ~1-2k images/s per worker, far below what one GPU trains these VAEs at
    (benchmarks/scaling.md). CelebA at 64 px is 2.0 GB. The GPU's total, not its free memory: every
    rank of a job on identical GPUs decides alike."""
    if device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(device).total_memory
    height, width = image_hw(cfg.data)
    return images * cfg.data.channels * height * width <= GPU_SHARE_FOR_DATA * total


class ShardBatchSampler:
    """The batch_sampler of a DataLoader: this rank's index batches of the epoch, from `start` on."""

    def __init__(self, plan: ShardPlan) -> None:
        self.plan, self.epoch, self.start = plan, 0, 0

    def __len__(self) -> int:
        return len(self.plan) - self.start

    def __iter__(self):
        return self.host_index_lists()

    def host_index_lists(self):
        """Index lists for the DataLoader's workers: host data by design (the plan lives on the CPU)."""
        for share in self.plan.shares(self.epoch, self.start):
            yield share.tolist()


class TorchTrainLoader:
    """A torch DataLoader (workers decode images) over this rank's shard, batches moved to the device."""

    def __init__(self, dataset, plan: ShardPlan, device: torch.device, num_workers: int) -> None:
        self.sampler, self.device = ShardBatchSampler(plan), device
        self.loader = DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=num_workers, persistent_workers=num_workers > 0,
            pin_memory=device.type == "cuda", collate_fn=collate_skipping_corrupt,
            # a private generator: creating an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator())

    def __len__(self) -> int:
        return len(self.sampler.plan)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch, self.sampler.start = epoch, 0

    def _batches(self):
        # from pinned memory (pin_memory on CUDA) all three copies overlap with the step: none blocks
        for x, label, index in self.loader:
            yield (x.to(self.device, non_blocking=True), label.to(self.device, non_blocking=True),
                   index.to(self.device, non_blocking=True))

    def __iter__(self):
        self.sampler.start = 0
        return self._batches()

    def skip_first(self, n: int):
        """This epoch's batches after the first n (resume inside an epoch)."""
        self.sampler.start = n
        return self._batches()
