"""fastvae: the lecture's VAEs, and yours, trained fast with accelerate, fused Triton kernels and SLURM.

    import fastvae
    class MyVAE(fastvae.VAE): ...                      # encode -> (mu, logvar), decode -> logits
    trainer = fastvae.Trainer(fastvae.load_config("mnist", ["model.name=my_module:MyVAE"]))
    trainer.fit()
    vae = fastvae.load("runs/mnist/checkpoints/step_00001050"); images = fastvae.sample(vae, 16)

The names are imported on first use, so `import fastvae` (and `fastvae --help`) stays quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "VAE": "fastvae.models.base",
    "Trainer": "fastvae.trainer",
    "load_config": "fastvae.config",
    "load": "fastvae.loading",
    "sample": "fastvae.generate",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fastvae' has no attribute {name!r}")
