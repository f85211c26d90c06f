"""Setting a run up: the accelerator (devices, precision, process group), the out_dir it holds, and
what several runs in one process need. The Trainer (fastvae/trainer.py) calls these first."""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list

from fastvae import checkpoint, precision
from fastvae.config import Config
from fastvae.distributed import check_launched_processes
from fastvae.errors import UserError
from fastvae.run_lock import RunLock


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state (its singletons, which keep the first precision and
    device they saw), so that the next Trainer in this process starts clean: for several runs in
    one process (a notebook, the benchmarks, the tests). Not between the ranks of a launched job."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


PATH_KEYS = (("loss", "lpips_weights"), ("eval", "inception_weights"), ("model", "pretrained"))


def absolute_paths(cfg: Config) -> None:
    """The files a run reads, as absolute paths: the run's config (and its checkpoints) then work from any
    folder evaluate or generate is started in."""
    for section, key in PATH_KEYS:
        value = getattr(getattr(cfg, section), key)
        if value:
            setattr(getattr(cfg, section), key, str(Path(value).expanduser().absolute()))


def make_accelerator(cfg: Config) -> tuple[Accelerator, str]:
    """The accelerator, and where its mixed precision came from (fastvae.precision)."""
    # No GPU: the CPU, and gloo when several processes were launched (accelerate would
    # otherwise leave each launched process training alone, each thinking it is rank 0 of 1).
    cpu = cfg.train.cpu or not torch.cuda.is_available()
    check_launched_processes(int(os.environ.get("WORLD_SIZE", "1")))
    mixed_precision, why = precision.choose(cfg.train.mixed_precision, "cpu" if cpu else "cuda")
    return Accelerator(
        mixed_precision=mixed_precision,  # None: `accelerate launch --mixed_precision` decides
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))],
        cpu=cpu,  # the data loaders are not prepared: they shard themselves (fastvae.data.sharding)
        # trackers: fastvae.tracking.RunLog builds them (their folders and run ids come from the run)
    ), why


def prepare_out_dir(cfg: Config, accelerator: Accelerator) -> tuple[Path, RunLock | None]:
    """out_dir, checked writable, held by this run alone (the main process holds its lock), and
    free of another run's checkpoints (unless resuming). Every rank raises the main process's error."""
    out, lock, problem = Path(cfg.out_dir), None, None
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            lock = RunLock(out, accelerator.print).acquire()
        except OSError as err:
            problem = f"out_dir '{out}' is not writable ({err.strerror}); expected a writable folder"
        except UserError as err:
            problem = str(err)
    problem = broadcast_object_list([problem])[0] if accelerator.num_processes > 1 else problem
    if problem:
        raise UserError(problem)
    if not cfg.train.resume:
        try:
            checkpoint.refuse_another_runs_checkpoints(out)
        except UserError:
            if lock is not None:
                lock.release()
            raise
    return out, lock


@contextlib.contextmanager
def removed_if_refused(out: Path, created_here: bool, lock: RunLock | None):
    """A run refused during set-up (bad data path, incompatible checkpoint, ...) releases out_dir and
    leaves no empty out_dir behind when it created it."""
    try:
        yield
    except BaseException:
        if lock is not None:
            lock.release()
        if created_here and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
