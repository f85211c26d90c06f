"""The training loader: batches from the data set held in memory, a torch DataLoader (handed to
accelerate.prepare, which shards it per rank), or an FFCV loader. The in-memory and FFCV loaders
are sharded per rank and deliver batches on the device themselves."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fastvae.config import Config
from fastvae.data.base import collate_skipping_corrupt
from fastvae.data.memory import InMemoryLoader, decode_to_memory, in_memory_tensors
from fastvae.errors import UserError


def build_train_loader(cfg: Config, train_set, num_processes: int, device: torch.device, rank: int = 0):
    global_batch = cfg.data.batch_size * num_processes
    if cfg.data.drop_last and len(train_set) < global_batch:
        raise UserError(f"data.batch_size={cfg.data.batch_size} x {num_processes} process(es) "
                        f"is larger than the {len(train_set)} training images; expected at most "
                        f"{len(train_set) // num_processes} per process (or data.drop_last=false)")
    if cfg.data.loader == "ffcv":
        from fastvae.data.ffcv import FFCVTrainLoader

        return FFCVTrainLoader(cfg.data.beton, cfg.data.batch_size, cfg.data.channels, device, cfg.seed,
                               cfg.data.order, cfg.data.flip, cfg.data.drop_last, distributed=num_processes > 1,
                               num_workers=max(1, cfg.data.num_workers))
    tensors = in_memory_tensors(train_set) if cfg.data.loader in ("auto", "memory") else None
    if tensors is None and cfg.data.loader == "memory":
        tensors = decode_to_memory(train_set)
    if tensors is not None:
        return InMemoryLoader(tensors, cfg.data.batch_size, cfg.seed, device, cfg.data.drop_last, cfg.data.flip,
                              rank, num_processes)
    if cfg.data.flip:
        raise UserError(f"data.flip: random flips need data.loader=memory or ffcv, and {cfg.data.name} is read "
                        f"image by image; expected data.flip=false or data.loader=ffcv")
    return DataLoader(
        train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=cfg.data.drop_last,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        # a private generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_skipping_corrupt,
    )
