"""Checkpoints: accelerate's save_state (model, optimizer, scheduler, per-rank RNG) in a
directory, plus `fastvae.json` (config, step, epoch, position in the epoch).

Why the hand-written part: accelerate writes into the final directory file by
file, so a crash mid-write leaves a checkpoint that looks complete. We write to
a hidden temporary directory, fsync, write fastvae.json last, then rename: a
directory without fastvae.json is never a checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from fastvae.config import RESUME_MAY_DIFFER, Config, flatten, from_dict, to_dict
from fastvae.errors import OutputError, UserError, read_json

META_FILE = "fastvae.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"  # the weights' moving average (fastvae.ema), by parameter name
CHECKPOINT_RE = re.compile(r"^step_(\d+)$")
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class TrainState:
    """Where a run is: what a checkpoint holds beside accelerate's state (model, optimizer,
    scheduler, RNG). batch_in_epoch = global batches of `epoch` already trained (resume skips
    them), of global_batch images each (data.batch_size x processes; None in checkpoints older
    than this field)."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    wandb_run_id: str | None = None  # the tracking run's id (W&B's, when logging there): a resume continues it
    global_batch: int | None = None
    ema_updates: int | None = None  # updates the weights' moving average has had (train.ema_decay)
    mlflow_run_id: str | None = None  # logger=mlflow: the MLflow run a resume continues
    # a checkpoint taken mid-epoch: the epoch's loss sums so far, per rank (Trainer's LossSums.state)
    epoch_sums: dict | None = None

    def rebatch(self, global_batch: int) -> str | None:
        """Continue with global batches of `global_batch` images (another data.batch_size or number
        of processes than the checkpoint's): the position in the epoch converted to them. Every
        loader cuts the epoch's one order into consecutive global batches (fastvae.data.sharding),
        so a position on a boundary of the new batches continues at the same image; any other
        would repeat or skip images and is refused. Returns what changed, in words."""
        saved, self.global_batch = self.global_batch, global_batch
        if saved in (None, global_batch) or self.batch_in_epoch == 0:
            return None
        images = self.batch_in_epoch * saved
        if images % global_batch:
            raise UserError(f"the checkpoint stopped {images} images into epoch {self.epoch + 1} (global batch "
                            f"{saved}), which is no whole number of this run's global batches of {global_batch} "
                            f"(data.batch_size x processes); expected a global batch that divides {images}, "
                            f"{saved} as saved, or a checkpoint from an epoch's end")
        self.batch_in_epoch = images // global_batch
        return (f"{images} images into epoch {self.epoch + 1}: {self.batch_in_epoch} global batches of "
                f"{global_batch} (the checkpoint's global batch was {saved})")

    @classmethod
    def from_meta(cls, meta: dict) -> "TrainState":
        return cls(**{f.name: meta.get(f.name) for f in dataclasses.fields(cls) if f.name in meta})


def checkpoint_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _share_like(reference: Path) -> None:
    """Give every file of the checkpoint the mode of `reference` (written with the user's umask):
    safetensors writes model.safetensors 0600, which teammates on a shared cluster cannot read."""
    mode = reference.stat().st_mode & 0o777
    for path in reference.parent.iterdir():
        if path.is_file():
            path.chmod(mode)


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (~1.3 GB/s here: 0.03 s for a 42 MB DFC-VAE checkpoint, docs/notes.md)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def save_checkpoint(accelerator, out_dir: str | Path, cfg: Config, state: TrainState, keep: int,
                    scheduler=None, extra: dict[str, dict] | None = None) -> Path:
    """All ranks call this (each saves its RNG state); rank 0 finalizes. Returns the checkpoint path.
    extra: more safetensors files of rank 0's ({file name: tensors}, e.g. the EMA weights), in the
    manifest like accelerate's. A write that fails (disk full, read-only) removes its partial folder
    and says, in one line, which checkpoint is the last good one."""
    root = checkpoint_dir(out_dir)
    name = f"step_{state.step:08d}"
    final, tmp = root / name, root / f".tmp-{name}"
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left over by a crash: never a checkpoint
                shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name, tensors in (extra or {}).items():
                save_file(tensors, str(tmp / name))
            _finalize(tmp, final, cfg, state, scheduler)
            for old in list_checkpoints(out_dir)[:-keep]:
                shutil.rmtree(old)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"could not write checkpoint {final} ({err.strerror or err}); the last good checkpoint is "
                          f"{last_good(out_dir)}; expected room and write access in {root}") from None
    accelerator.wait_for_everyone()
    return final


def _finalize(tmp: Path, final: Path, cfg: Config, state: TrainState, scheduler) -> None:
    """Rank 0: the manifest (sizes and sha256 of every file, so later damage is detected before
    loading), the scheduler's state as JSON (no pickle), fsync, then the rename that makes it a checkpoint."""
    files = sorted(p for p in tmp.iterdir() if p.is_file())
    meta = {"format": 2, "config": to_dict(cfg), **dataclasses.asdict(state),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "files": {p.name: p.stat().st_size for p in files}, "sha256": {p.name: file_digest(p) for p in files}}
    with open(tmp / META_FILE, "w") as fh:
        json.dump(meta, fh, indent=2)
    _share_like(tmp / META_FILE)
    _fsync_tree(tmp)
    if final.exists():  # same step saved again (e.g. resumed and stopped at once)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_tree(final.parent)


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those holding fastvae.json), oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def last_good(out_dir: str | Path) -> str:
    """The newest complete checkpoint in out_dir, or 'none': what failure messages point a user to."""
    found = list_checkpoints(out_dir)
    return str(found[-1]) if found else "none"


def refuse_another_runs_checkpoints(out_dir: str | Path) -> None:
    """A fresh run (train.resume empty) into an out_dir that holds checkpoints would mix two runs:
    refused in one line, before anything is written or submitted."""
    existing = list_checkpoints(out_dir)
    if existing:
        raise UserError(f"out_dir '{out_dir}' already holds checkpoints (newest: {existing[-1].name}); expected "
                        f"an empty out_dir, train.resume=auto to continue that run, or another out_dir")


def read_meta(path: str | Path) -> dict:
    """A checkpoint's fastvae.json, checked field by field: whatever it holds, a bad one is one line."""
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise UserError(f"checkpoint '{path}' not found; expected a directory written by fastvae.train "
                        f"(e.g. runs/mnist/checkpoints/step_00001000)")
    if not meta_path.is_file():
        raise UserError(f"checkpoint '{path}' has no {META_FILE}; expected a complete fastvae checkpoint")
    meta = read_json(meta_path, lambda err: f"checkpoint file '{meta_path}' is corrupt ({one_line(err)}); expected "
                                            f"JSON as fastvae writes it")
    _check_meta(meta, meta_path)
    return meta


MAX_COUNT = 2**53  # steps, epochs and batches: integers JSON and float64 hold exactly


def _check_meta(meta, where: Path) -> None:
    def bad(key: str, expected: str):
        shown = repr(meta.get(key))[:60]
        return UserError(f"checkpoint file '{where}': {key} is {shown}; expected {expected}")

    if not isinstance(meta, dict):
        raise UserError(f"checkpoint file '{where}' holds a JSON {type(meta).__name__}; expected an object")
    for key in ("step", "epoch", "batch_in_epoch"):
        value = meta.get(key)
        if type(value) is not int or not 0 <= value < MAX_COUNT:
            raise bad(key, "an integer from 0 to 2^53")
    if meta.get("global_batch") is not None and (type(meta["global_batch"]) is not int or meta["global_batch"] < 1):
        raise bad("global_batch", "a positive integer or null")
    if meta.get("ema_updates") is not None and (type(meta["ema_updates"]) is not int or meta["ema_updates"] < 0):
        raise bad("ema_updates", "a count or null")
    if meta.get("epoch_sums") is not None and not _sums_shape(meta["epoch_sums"]):
        raise bad("epoch_sums", "the epoch's sums so far as fastvae writes them, or null")
    for key in ("wandb_run_id", "mlflow_run_id"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "a string or null")
    files = meta.get("files")
    if not isinstance(files, dict) or not all(isinstance(k, str) and type(v) is int and v >= 0 for k, v in files.items()):
        raise bad("files", "an object of file names and sizes")
    digests = meta.get("sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(v, str) and len(v) == 64 for v in digests.values()):
        raise bad("sha256", "an object of file names and sha256 hex digests")
    if not isinstance(meta.get("config"), dict):
        raise bad("config", "the run's config as an object")
    if meta.get("scheduler") is not None and not isinstance(meta["scheduler"], dict):
        raise bad("scheduler", "the learning-rate scheduler's state as an object")
    if any(Path(name).name != name or name in (".", "..") for name in files):
        raise bad("files", "plain file names inside the checkpoint")
    if meta.get("format", 1) not in (1, 2):
        raise bad("format", "1 or 2")
    if meta.get("format", 1) == 1 and ("sha256" in meta or meta.get("scheduler") is not None):
        raise bad("format", "2 for a manifest with sha256 or the schedule's state (format 1 had neither: a "
                            "fastvae.json edited to skip the hashes is refused)")


def _sums_shape(sums) -> bool:
    """{"terms": [names], "ranks": [[numbers] per rank], "seconds": number}: rows of 4 + 2 x terms."""
    def number(v):
        return type(v) in (int, float) and v == v and abs(v) != float("inf")

    if not isinstance(sums, dict) or not isinstance(sums.get("terms"), list) or not isinstance(sums.get("ranks"), list):
        return False
    width = 4 + 2 * len(sums["terms"])
    return (all(isinstance(t, str) for t in sums["terms"]) and 0 < len(sums["ranks"]) <= 2**16
            and all(isinstance(r, list) and len(r) == width and all(number(v) for v in r) for r in sums["ranks"])
            and number(sums.get("seconds", 0.0)))


def problem(path: str | Path) -> str | None:
    """Why a complete-looking checkpoint cannot be loaded, or None if it is intact: every file its
    manifest lists is there with its size and (format 2) its sha256, and nothing else is."""
    path = Path(path)
    try:
        meta = read_meta(path)
    except UserError as err:
        return str(err)
    files, digests = meta["files"], meta.get("sha256", {})
    links = sorted(p.name for p in path.iterdir() if p.is_symlink())
    if links:
        return f"{links[0]} is a link (refused: a checkpoint loads only files of its own folder)"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
        if name in digests and file_digest(f) != digests[name]:
            return f"file {name} does not match its sha256 in {META_FILE} (changed or damaged)"
    unexpected = sorted(p.name for p in path.iterdir() if p.name not in files and p.name != META_FILE)
    if unexpected:
        return f"it holds {unexpected[0]}, which its {META_FILE} does not list (refused: a checkpoint loads only its own files)"
    try:
        with safe_open(str(path / MODEL_FILE), "pt"):
            pass
    except Exception as err:  # safetensors raises its own error types
        return f"{MODEL_FILE} unreadable ({one_line(err)})"
    return None


def one_line(err: BaseException, limit: int = 160) -> str:
    """An exception as a short plain line: its first line, without terminal colour codes."""
    text = ANSI.sub("", str(err)).strip().splitlines()
    first = text[0] if text else type(err).__name__
    return first if len(first) <= limit else first[:limit - 3] + "..."


def resolve_resume(resume: str, out_dir: str | Path, announce=print) -> Path | None:
    """`auto` -> newest intact checkpoint in out_dir (None if there is none), saying which ones
    were skipped and why; only damaged ones: refused (never started over, never deleted). A path ->
    that checkpoint, which must be intact."""
    if not resume:
        return None
    if resume.lower() in ("auto", "true"):
        found = list_checkpoints(out_dir)
        problems = []
        for path in reversed(found):
            why = problem(path)
            if why is None:
                return path
            announce(f"fastvae: skipping checkpoint {path}: {why}")
            problems.append(f"{path.name}: {why}")
        if found:  # a fresh start would rotate them away: the optimizer and RNG files may be all that is wrong
            raise UserError(f"train.resume=auto found only damaged checkpoints in {checkpoint_dir(out_dir)} "
                            f"({'; '.join(problems)}); expected an intact one: repair or move them, or use another out_dir")
        return None
    read_meta(resume)  # its own clear error for a missing or foreign path
    why = problem(resume)
    if why is not None:
        raise UserError(f"checkpoint '{resume}' cannot be resumed: {why}")
    return Path(resume)


def check_compatible(meta: dict, cfg: Config, path: Path) -> None:
    """A checkpoint resumes only the same model on the same data: every key outside
    config.RESUME_MAY_DIFFER must be what it was."""
    saved = flatten(from_dict(meta["config"]))
    for key, value in flatten(cfg).items():
        if key not in RESUME_MAY_DIFFER and saved[key] != value:
            raise UserError(f"checkpoint '{path}' was trained with {key}={saved[key]!r}; "
                            f"expected it to match this run's {value!r}")


def restore(accelerator, cfg: Config, out_dir: Path, scheduler=None) -> tuple[TrainState, Path | None]:
    """The state to start from: a fresh TrainState, or for train.resume the checkpoint's, with
    its model, optimizer, RNG and LR schedule loaded. No file of it can run code: torch files load
    with weights_only=True (checked here first, file by file), the schedule comes from JSON."""
    path = resolve_resume(cfg.train.resume, out_dir, announce=accelerator.print)
    if path is None:
        if cfg.train.resume:
            accelerator.print(f"fastvae: no checkpoint in {checkpoint_dir(out_dir)}; starting fresh")
        return TrainState(), None
    meta = read_meta(path)
    check_compatible(meta, cfg, path)
    plain = {name: _plain_data(path / name) for name in meta["files"] if name.endswith((".bin", ".pkl"))}
    try:
        with _without_legacy_scheduler(path) as folder:
            accelerator.load_state(str(folder))
    except Exception as err:  # torch/safetensors raise their own types
        raise UserError(f"checkpoint '{path}' could not be loaded ({type(err).__name__}: {one_line(err)}); "
                        f"expected an intact checkpoint of this model") from None
    if scheduler is not None:
        # checkpoints before format 2 kept it in accelerate's custom_checkpoint_0.pkl: read as plain data
        scheduler.load_state_dict(meta.get("scheduler") or plain.get(LEGACY_SCHEDULER_FILE) or scheduler.state_dict())
    state = TrainState.from_meta(meta)
    accelerator.print(f"fastvae: resumed from {path} (step {state.step}, epoch {state.epoch})")
    return state, path


LEGACY_SCHEDULER_FILE = "custom_checkpoint_0.pkl"


@contextlib.contextmanager
def _without_legacy_scheduler(path: Path):
    """The checkpoint folder as accelerate.load_state should see it. Checkpoints before format 2 hold
    the scheduler's pickle, which accelerate would load with weights_only=False and, nothing being
    registered now, refuse to count: it sees a folder of links to every other file instead."""
    if not (path / LEGACY_SCHEDULER_FILE).exists():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="fastvae-resume-") as tmp:
        for f in path.iterdir():
            if f.name != LEGACY_SCHEDULER_FILE:
                os.symlink(f.resolve(), Path(tmp) / f.name)
        yield Path(tmp)


def _plain_data(path: Path):
    """A torch file loaded as plain tensors, numbers and containers (weights_only=True, with numpy's
    arrays that accelerate's RNG files hold); anything else is refused in one line naming the file."""
    from accelerate.utils import load as accelerate_load  # weights_only=True + numpy's array types

    try:
        return accelerate_load(path, map_location="cpu")
    except Exception as err:  # pickle's and torch's own types
        # torch's first sentence only: the rest tells how to load the file anyway, which a file that
        # would run code must not be
        reason = one_line(err).split(". ")[0]
        raise UserError(f"checkpoint file '{path}' refused: it is not plain tensors and numbers "
                        f"({type(err).__name__}: {reason}); expected a file fastvae wrote") from None
