"""What a run will allocate, estimated before anything is allocated, and refused in one line when it
cannot fit: a config (or a checkpoint's fastvae.json) can ask for 10^9 latent dimensions, 10^6
condition names or 100,000 x 100,000 images, and the allocator's traceback, or a machine swapping
to a halt, is no answer.

The estimate: the model is built on PyTorch's meta device (shapes, no memory) for its parameter
count; for training, one image also goes through encode and decode there while every operation's
output is counted (views excluded), for the activations per image. Training needs 16 bytes per
parameter (fp32 weights, gradients and Adam's two moments) and twice the activations of a step
(kept for the backward pass, and their gradients) at data.batch_size x loss.samples images;
inference (generate, evaluate) 4 bytes per parameter and one image (its activations are not
traced there: the meta device's convolutions import torch._dynamo, ~2 s of those commands'
start-up, which training pays anyway for its optimizer). Rough, on the high side; compared with the
memory this process can have: on a GPU what is free on it, on the CPU the least of the system's
available memory, the cgroup's limit and the address-space limit (ulimit -v).
"""

from __future__ import annotations

import copy
import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastvae.config import image_hw
from fastvae.errors import UserError

TRAINING_BYTES_PER_PARAMETER = 16
GB = 1e9


@dataclass(frozen=True)
class Estimate:
    parameters: int
    activation_bytes_per_image: int

    def bytes(self, images: int, training: bool) -> int:
        if training:
            return self.parameters * TRAINING_BYTES_PER_PARAMETER + 2 * self.activation_bytes_per_image * images
        return self.parameters * 4 + self.activation_bytes_per_image * images


class _OutputBytes(TorchDispatchMode):
    """Sums the bytes of every tensor an operation returns (views share their input's memory)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.total += t.numel() * t.element_size()
        return out


def estimate(cfg, trusted: tuple[str, ...] | None = None, trace: bool = True) -> Estimate | None:
    """Parameters and activation bytes per image of the model cfg describes, from the meta device
    (trace=False: the image's own bytes stand for its activations); None for a model that cannot be
    built or run there (then nothing is estimated)."""
    from fastvae.models import model_class, model_kwargs

    cls = model_class(cfg.model.name, trusted)
    kwargs = model_kwargs(cls, cfg)
    condition_dim = len(cfg.model.condition_names) if cfg.model.condition != "none" else 0
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):  # the real build's seeded init is untouched
            model = cls(**kwargs).eval()
            x = torch.empty(1, cfg.data.channels, *image_hw(cfg.data))
            activations = x.numel() * x.element_size()
            if trace:
                condition = torch.empty(1, condition_dim) if condition_dim else None
                with torch.no_grad(), _OutputBytes() as counted:
                    encoded = model.encode_with(x, condition)  # (mu, logvar), or a tokenizer's z_e
                    model.decode_with(encoded[0] if isinstance(encoded, tuple) else encoded, condition)
                activations = counted.total
    except Exception:  # whatever a user's model does that the meta device cannot (data-dependent code, files)
        return None
    return Estimate(sum(p.numel() for p in model.parameters()), activations)


def memory_free(device: torch.device) -> tuple[int, str]:
    """Bytes this process can still allocate on `device`, and where that number comes from."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    found = [(_meminfo("MemAvailable"), "available on this machine")]
    cgroup = Path("/sys/fs/cgroup")
    limit = _read_int(cgroup / "memory.max")
    if limit is not None:
        found.append((limit - (_read_int(cgroup / "memory.current") or 0), "left under this cgroup's memory.max"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append((soft - _status_kb("VmSize") * 1024, "left under the address-space limit (ulimit -v)"))
    return min((f for f in found if f[0] is not None), key=lambda f: f[0])


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def step_images(cfg, training: bool) -> int:
    """Images whose activations one step holds at once."""
    if not training:
        return 1
    from fastvae.objectives import objective_class

    return cfg.data.batch_size * objective_class(cfg.loss).samples_per_image(cfg.loss)


# What each key is set to when asking which one makes a run too big (the first that fits wins).
SMALLER = (("model.latent_dim", 2), ("model.condition_names", []), ("loss.samples", 1), ("data.image_size", 8),
           ("data.batch_size", 1), ("model.kwargs", {}), ("quantizer.codebook_size", 2))


def check_fits(cfg, device: torch.device, training: bool, trusted: tuple[str, ...] | None = None,
               copies: int = 1) -> None:
    """Refuse, in one line naming the key that makes it so, a run whose model and step need more
    memory than `device` has free. copies: processes sharing that memory (several on one CPU)."""
    found = estimate(cfg, trusted, trace=training)
    if found is None:
        return
    need = found.bytes(step_images(cfg, training), training) * copies
    free, where = memory_free(device)
    if need <= free:
        return
    key, value = _culprit(cfg, trusted, training, copies, need)
    per = f"{found.parameters:.3g} parameters, {found.activation_bytes_per_image / GB:.3g} GB of activations per image"
    raise UserError(f"config key '{key}' ({_shown(value)}): this {'training run' if training else 'model'} needs "
                    f"about {need / GB:.3g} GB ({per}{', at ' + str(step_images(cfg, True)) + ' images a step' if training else ''}) "
                    f"and {free / GB:.3g} GB are {where}; expected a smaller {key} (docs/reliability.md)")


def _culprit(cfg, trusted, training: bool, copies: int, need: int) -> tuple[str, object]:
    """The key whose smaller value shrinks the estimate most."""
    best, best_need = SMALLER[0][0], need
    for key, small in SMALLER:
        section, name = key.split(".")
        variant = copy.deepcopy(cfg)
        setattr(getattr(variant, section), name, small)
        found = estimate(variant, trusted, trace=training)
        if found is not None:
            smaller = found.bytes(step_images(variant, training), training) * copies
            if smaller < best_need:
                best, best_need = key, smaller
    section, name = best.split(".")
    return best, getattr(getattr(cfg, section), name)


def _shown(value) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"{len(value)} entries"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def processes_sharing(device: torch.device) -> int:
    """Processes of this run on this machine's memory: on the CPU all local ranks share it."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
