"""Loading a trained model for inference: `fastvae.load` and the `LoadedVAE` it returns, and
`load_model` (the model, its config and its checkpoint's metadata). Training's own writing and
resuming of checkpoints is fastvae/checkpoint.py's; this side only reads, and checks what it reads
(the manifest's sha256, safetensors only, a user's model class imported only with consent)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastvae.checkpoint import EMA_FILE, META_FILE, MODEL_FILE, file_digest, one_line, read_meta
from fastvae.config import SPLITS, Config, from_dict, override_data
from fastvae.errors import UserError


def load_model(path: str | Path, device: str | torch.device = "cpu", trust_model: str | tuple[str, ...] = (),
               ema: bool = True):
    """Rebuild the model from a checkpoint's stored config: (model in eval mode, config, meta).
    trust_model: the modules (or package.module:Class names) of your own models this may import; a
    checkpoint naming any other module is refused before anything is imported (importing runs it).
    ema: use the weights' moving average where the checkpoint has one (train.ema_decay)."""
    from fastvae.models import build_model
    from fastvae.sizes import check_fits

    path = Path(path)
    meta = read_meta(path)
    cfg = from_dict(meta["config"])
    weights = path / MODEL_FILE
    if weights.is_symlink() or not weights.is_file():
        raise UserError(f"checkpoint '{path}' has no {MODEL_FILE} of its own (missing, or a link); expected a "
                        f"complete fastvae checkpoint")
    trusted = (trust_model,) if isinstance(trust_model, str) else tuple(trust_model)
    check_fits(cfg, torch.device(device), training=False, trusted=trusted)  # before anything is allocated
    model = build_model(cfg, trusted)
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as err:  # safetensors raises its own error types for truncated files
        raise UserError(f"checkpoint file '{weights}' is unreadable ({one_line(err)}); expected safetensors") from None
    _check_digest(weights, meta)
    averaged = path / EMA_FILE
    if ema and averaged.is_file() and not averaged.is_symlink():
        _check_digest(averaged, meta)
        state.update(load_file(str(averaged), device=str(device)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint '{path}' does not fit model {cfg.model.name} "
                        f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)")
    return model.to(device).eval(), cfg, meta


def _check_digest(file: Path, meta: dict) -> None:
    digest = meta.get("sha256", {}).get(file.name)
    if digest is not None and file_digest(file) != digest:  # e.g. weights changed behind an intact header
        raise UserError(f"checkpoint file '{file}' does not match its sha256 in {META_FILE} (changed or "
                        f"damaged); expected the file as training wrote it")


@dataclass
class LoadedVAE:
    """A trained model in eval mode with the config it was trained with (from `load`)."""

    model: torch.nn.Module
    cfg: Config
    meta: dict
    path: Path
    device: torch.device
    _datasets: tuple | None = field(default=None, repr=False)

    def split(self, name: str):
        from fastvae.data import build_datasets

        if name not in SPLITS:
            raise UserError(f"split {name!r}: expected one of {', '.join(SPLITS)}")
        if self._datasets is None:
            self._datasets = build_datasets(self.cfg.data)
        return self._datasets[SPLITS.index(name)]

    @property
    def run_dir(self) -> Path:
        return self.path.parent.parent  # RUN_DIR/checkpoints/step_N

    @property
    def conditioning(self):
        """A conditional model's conditioning (fastvae.conditions), not bound to data; else None."""
        from fastvae.conditions import conditioning_of

        return conditioning_of(self.cfg.model)

    def conditioning_for(self, split: str):
        """The conditioning bound to a split's images (CelebA attributes: that split's table); else None."""
        return None if self.conditioning is None else self.conditioning.for_dataset(self.split(split))


def newest_if_run_folder(path: Path) -> Path:
    """A run's folder (out_dir) stands for its newest complete checkpoint, said in one line."""
    from fastvae.checkpoint import list_checkpoints

    if path.is_dir() and not (path / META_FILE).exists() and list_checkpoints(path):
        newest = list_checkpoints(path)[-1]
        print(f"fastvae: {path} is a run's folder: using its newest checkpoint {newest}", flush=True)
        return newest
    return path


def load(checkpoint: str | Path, device: str | torch.device | None = None, data_overrides=(),
         trust_model: str | tuple[str, ...] = (), ema: bool = True) -> LoadedVAE:
    """Rebuild the model from a checkpoint's stored config, on CUDA when there is one.
    data_overrides: `data.key=value` changes of where and how its data is read (data.root=...).
    trust_model: your own model's module (or modules) that this checkpoint may import: a
    checkpoint's model.name outside fastvae is imported only when named here (load_model). ema: the
    weights' moving average where there is one (ema=False: the trained weights themselves)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device}: no CUDA device here; expected --device cpu")
    checkpoint = newest_if_run_folder(Path(checkpoint))
    model, cfg, meta = load_model(checkpoint, device, trust_model, ema)
    return LoadedVAE(model, override_data(cfg, data_overrides), meta, Path(checkpoint), device)
