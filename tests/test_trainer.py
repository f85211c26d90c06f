"""The Trainer's parts on their own: train_step, TrainState, optimizer builders, config docs and
the resume key lists."""

import os
import subprocess
import sys

import pytest
import torch

from fastvae.checkpoint import list_checkpoints
from fastvae.config import Config, flatten
from fastvae.optim import build_optimizer
from fastvae.train import train
from fastvae.trainer import Trainer
from helpers import ROOT, tiny_config


def test_train_step_is_one_accumulated_optimizer_step(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.grad_accum_steps=2"))
    batch = next(iter(trainer.train_loader))
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    first = trainer.train_step(batch)
    assert not first["stepped"] and trainer.state.step == 0  # the window is not complete yet
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    second = trainer.train_step(batch)
    assert second["stepped"] and trainer.state.step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))
    assert second["loss"].shape == () and second["recon"].shape == second["kl"].shape == (32,)
    assert second["images"] == 32 and torch.isfinite(second["loss"])


def test_trainer_trains_on_given_datasets(tmp_path):
    from fastvae.data.base import ImageTensorDataset

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    own = ImageTensorDataset(images, torch.arange(64) % 10)
    result = train(tiny_config(tmp_path / "run", "train.epochs=1"), datasets=(own, own))
    assert result["step"] == 2  # 64 images / batch 32, not the 256 of the tiny config's data


def test_unknown_optimizer_is_an_error_not_sgd():
    cfg = Config()
    cfg.optim.name = "lamb"  # past validation, as code (not a config file) could set it
    with pytest.raises(ValueError, match="optim.name 'lamb': expected adam, adamw or sgd"):
        build_optimizer(cfg, torch.nn.Linear(2, 2).parameters())


def test_help_lists_every_key_with_type_default_and_doc():
    proc = subprocess.run([sys.executable, "-m", "fastvae.train", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0
    for key in flatten(Config()):
        assert f"\n  {key} = " in proc.stdout, key
    assert '  train.ops = "auto"  (eager | compiled | triton | auto)\n      VAE ops: eager reference' in proc.stdout
    assert "  optim.lr = 0.0005  (float)\n      learning rate" in proc.stdout
    assert "  train.mixed_precision = \"auto\"  (auto | no | bf16 | fp16 | null)" in proc.stdout


def test_run_folder_holds_its_resolved_config_and_shareable_checkpoints(tmp_path):
    from fastvae.config import load_config

    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        train(tiny_config(out, "train.max_steps=2", "optim.lr=1e-3"))
    finally:
        os.umask(old)
    assert load_config(out / "config.yaml") == tiny_config(out, "train.max_steps=2", "optim.lr=1e-3")
    for path in list_checkpoints(out)[-1].iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path.name  # group and others may read, as with any file


def test_train_step_takes_batches_without_sample_ids(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run"))
    x, y, _ = next(iter(trainer.train_loader))
    assert trainer.train_step((x, y))["stepped"]  # eps from torch's generator instead of keyed ones


class HostReads:
    """Fails on what would stall a GPU in the step: a tensor read on the host (.item(), .tolist(),
    bool()/float()/int() of a tensor), a tensor built from Python numbers on a device
    (torch.tensor(x, device=...): a blocking copy), a blocking .to(device) copy. The same code runs
    on CPU and CUDA, so catching it here catches it for the GPU."""

    READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.monkeypatch, self.active, self.seen = monkeypatch, False, []

    def __enter__(self):
        for name in self.READS:
            original = getattr(torch.Tensor, name)
            self.monkeypatch.setattr(torch.Tensor, name, self._watch(f"Tensor.{name}", original))
        original_tensor = torch.tensor
        self.monkeypatch.setattr(torch, "tensor", lambda *a, **k: (self._note("torch.tensor(..., device=...)")
                                                                   if "device" in k else None)
                                 or original_tensor(*a, **k))
        original_to = torch.Tensor.to

        def to(t, *args, **kwargs):
            moves = args and isinstance(args[0], (torch.device, str)) or "device" in kwargs
            if moves and not kwargs.get("non_blocking", False):
                self._note("a blocking .to(device)")
            return original_to(t, *args, **kwargs)

        self.monkeypatch.setattr(torch.Tensor, "to", to)
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False
        self.monkeypatch.undo()

    def _note(self, what):
        import traceback

        frame = traceback.extract_stack()[-3]
        # excused: torch's own CPU Adam reads its step counter with .item() (on CUDA fastvae runs fused
        # Adam, fastvae/optim.py, which does not); the DataLoader's sampler makes host index lists
        excused = "torch/optim/" in frame.filename or frame.name == "host_index_lists"
        if self.active and not excused:
            self.seen.append(f"{what} at {frame}")

    def _watch(self, what, original):
        def watched(t, *args, **kwargs):
            self._note(what)
            return original(t, *args, **kwargs)

        return watched


@pytest.mark.parametrize("loader", ["memory", "torch"])
def test_steps_between_log_points_read_nothing_on_the_host(tmp_path, monkeypatch, loader):
    """The steps between two log points, KL warm-up on (beta changes every step), as fit() runs them."""
    trainer = Trainer(tiny_config(tmp_path / "run", f"data.loader={loader}", "loss.kl_warmup_steps=100",
                                  "train.log_every=50"))
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))  # the first step may set things up
    with HostReads(monkeypatch) as reads:
        for _ in range(4):
            batch = next(batches)
            trainer.train_step(batch)
            trainer.state.batch_in_epoch += 1
    assert reads.seen == [], "\n".join(reads.seen[:5])
    trainer.close()
