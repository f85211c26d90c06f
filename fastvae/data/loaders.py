"""The training loader: a torch DataLoader (handed to accelerate.prepare, which shards it per
rank) or an FFCV loader (already sharded per rank and on the device)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from fastvae.config import Config
from fastvae.data.base import collate_skipping_corrupt
from fastvae.errors import UserError


def build_train_loader(cfg: Config, train_set, num_processes: int, device: torch.device):
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
    return DataLoader(
        train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=cfg.data.drop_last,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        # a private generator: creating an iterator must not draw from the global RNG (exact resume)
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_skipping_corrupt,
    )
