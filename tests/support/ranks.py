"""Run a function on N gloo processes of this machine, in-process-group like `accelerate launch`
would set up, for tests of one differentiable collective (much cheaper than a training run)."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastvae.launch.processes import free_port


def _worker(rank: int, world: int, port: int, fn, out: Path, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), out / f"rank{rank}.pt")
        # every rank past its last collective before any tears gloo down: a rank destroying its group
        # while the other still finished one aborted (SIGABRT, "terminate called without an active
        # exception") once in CI
        dist.barrier()
    finally:
        dist.destroy_process_group()


def on_ranks(fn, world: int, tmp_path: Path, *args) -> list:
    """[fn(rank, world, *args) for every rank], each run in its own process of one gloo group.
    fn must be importable (a module-level function)."""
    mp.spawn(_worker, args=(world, free_port(), fn, tmp_path, args), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
