"""A trained latent-diffusion autoencoder (model.name=kl_autoencoder) as the folder diffusers and
every Stable Diffusion pipeline read: `AutoencoderKL.from_pretrained(OUT)`; a tokenizer
(model.name=vq_autoencoder with a plain VQ codebook) as `VQModel.from_pretrained(OUT)`.

    python -m fastvae.export --checkpoint runs/kl/checkpoints/step_N --out my-vae [--no-ema]

The weights are the moving average where the run kept one (train.ema_decay), as SD's ft-EMA VAE
ships them; --no-ema for the trained weights. Written as safetensors; the folder is written beside
its final name and renamed, so an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from fastvae.commands import export_parser
from fastvae.errors import UserError, exit_on_user_error
from fastvae.outputs import checked_output


@exit_on_user_error
def main(argv=None) -> Path:
    args = export_parser().parse_args(argv)
    from fastvae.checkpoint import EMA_FILE
    from fastvae.loading import load
    from fastvae.models.kl_autoencoder import KLAutoencoder, export_diffusers
    from fastvae.models.vq_autoencoder import VQAutoencoder, export_vqmodel, plain_codebook

    out = checked_output(args.out, "--out", "folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out '{out}' is not empty; expected a new folder (nothing is overwritten)")
    vae = load(args.checkpoint, "cpu", ema=args.ema)
    if isinstance(vae.model, VQAutoencoder):
        plain_codebook(vae.model)  # one line before any work for a quantizer VQModel cannot hold
    elif not isinstance(vae.model, KLAutoencoder):
        raise UserError(f"checkpoint '{args.checkpoint}' is a {vae.cfg.model.name}; expected a kl_autoencoder or "
                        f"vq_autoencoder checkpoint (diffusers' AutoencoderKL and VQModel have that format)")
    write, cls = (export_vqmodel, "VQModel") if isinstance(vae.model, VQAutoencoder) else (export_diffusers,
                                                                                          "AutoencoderKL")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    stopped = signal.signal(signal.SIGTERM, _stop)  # a SIGTERM mid-write leaves nothing behind, like Ctrl-C
    try:
        write(vae.model, tmp)
        _share(tmp)
        _move_into_place(tmp, out)
    except KeyboardInterrupt:
        raise SystemExit(f"fastvae: export stopped; {out} was not written") from None
    finally:
        signal.signal(signal.SIGTERM, stopped)
        shutil.rmtree(tmp, ignore_errors=True)
    weights = "the moving average" if args.ema and (vae.path / EMA_FILE).is_file() else "the trained weights"
    print(f"fastvae: wrote {out} ({weights}; diffusers.{cls}.from_pretrained reads it)")
    return out


def _stop(signum, frame):
    raise KeyboardInterrupt


def _share(folder: Path) -> None:
    """The user's umask on the folder and its files, as every other output has (mkdtemp makes it 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for f in folder.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)


def _move_into_place(tmp: Path, out: Path) -> None:
    """The finished folder renamed to --out, which is absent or empty; another export that got there
    first is one line."""
    try:
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except OSError as err:
        raise UserError(f"--out '{out}' was written by another export meanwhile ({err.strerror}); expected one "
                        f"export per folder") from None


if __name__ == "__main__":
    main()
