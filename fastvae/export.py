"""A trained latent-diffusion autoencoder (model.name=kl_autoencoder) as the folder diffusers and
every Stable Diffusion pipeline read: `AutoencoderKL.from_pretrained(OUT)`.

    python -m fastvae.export --checkpoint runs/kl/checkpoints/step_N --out my-vae [--no-ema]

The weights are the moving average where the run kept one (train.ema_decay), as SD's ft-EMA VAE
ships them; --no-ema for the trained weights. Written as safetensors; the folder is written beside
its final name and renamed, so an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fastvae.commands import export_parser
from fastvae.errors import UserError, exit_on_user_error


@exit_on_user_error
def main(argv=None) -> Path:
    args = export_parser().parse_args(argv)
    from fastvae.checkpoint import EMA_FILE
    from fastvae.loading import load
    from fastvae.models.kl_autoencoder import KLAutoencoder, export_diffusers

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' is not empty; expected a new folder (nothing is overwritten)")
    vae = load(args.checkpoint, "cpu", ema=args.ema)
    if not isinstance(vae.model, KLAutoencoder):
        raise UserError(f"checkpoint '{args.checkpoint}' is a {vae.cfg.model.name}; expected a kl_autoencoder "
                        f"checkpoint (only diffusers' AutoencoderKL has that format)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        export_diffusers(vae.model, tmp)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    weights = "the moving average" if args.ema and (vae.path / EMA_FILE).is_file() else "the trained weights"
    print(f"fastvae: wrote {out} ({weights}; diffusers.AutoencoderKL.from_pretrained reads it)")
    return out


if __name__ == "__main__":
    main()
