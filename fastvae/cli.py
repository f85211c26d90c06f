"""The `fastvae` command: one entry point with a subcommand per tool.

    fastvae train --config mnist [key=value ...]        (= python -m fastvae.train)
    fastvae generate sample --checkpoint CKPT            (= python -m fastvae.generate)
    fastvae evaluate --checkpoint CKPT                   (= python -m fastvae.evaluate)
    fastvae export --checkpoint CKPT --out DIR           (= python -m fastvae.export)
    fastvae ffcv --config celeba --out DIR               (= python -m fastvae.data.ffcv)
    fastvae slurm --config mnist --dry-run               (= python -m fastvae.launch.slurm)

Each subcommand's module is imported only when it runs, so `fastvae --help` is quick.
"""

from __future__ import annotations

import importlib
import sys

from fastvae.commands import PARSERS

COMMANDS = {
    "train": ("fastvae.train", "train a VAE (--help lists every config key)"),
    "generate": ("fastvae.generate", "samples, reconstructions, interpolation, latent plots, attribute sweeps"),
    "evaluate": ("fastvae.evaluate", "test ELBO, IWAE bound, active units, PSNR of a checkpoint"),
    "export": ("fastvae.export", "a kl_autoencoder checkpoint as a diffusers AutoencoderKL folder"),
    "tokenize": ("fastvae.tokenize", "a tokenizer's token indices of every image, in safetensors shards"),
    "ffcv": ("fastvae.data.ffcv", "write a dataset as FFCV .beton files"),
    "slurm": ("fastvae.launch.slurm", "submit training to SLURM (submitit)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name.ljust(width)}  {doc}" for name, (_, doc) in COMMANDS.items()]
    return "usage: fastvae COMMAND [options]\n\ncommands:\n" + "\n".join(lines) + \
        "\n\n`fastvae COMMAND --help` for a command's options; configs: --config mnist | fashion_mnist | " \
        "celeba | imagefolder | kl_autoencoder | ... (shipped) or a YAML path"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"fastvae: error: unknown command {argv[0]!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    if argv[0] in PARSERS and {"-h", "--help"} & set(argv[1:]):  # without importing torch
        PARSERS[argv[0]]().parse_args(argv[1:])
    module = importlib.import_module(COMMANDS[argv[0]][0])
    result = module.main(argv[1:])
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
