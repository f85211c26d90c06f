"""A tokenizer's product: every image's token indices, for the autoregressive or masked model trained next.

    fastvae tokenize --checkpoint CKPT [--split train] --out DIR [--shard-size 10000] [--max-images N]
    accelerate launch -m fastvae.tokenize ...           (each process its shards: the same files)

DIR/tokens-NNNNN.safetensors holds shard NNNNN: images [N * shard_size, (N + 1) * shard_size) of the
split, as `indices` [n, h, w] in the smallest integer type that holds the codebook (uint8 up to 256
codes, uint16 up to 65,536, int32, int64) and `image_index` [n] (int64); DIR/tokens.json says the
codebook size, the token grid, the split, the checkpoint and the shard files. Shard k is written by
process k mod N, encoded in the same batches whatever N: N processes write the files one writes.
`fastvae generate decode --tokens FILE` draws a shard's tokens back as images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from fastvae.commands import tokenize_parser
from fastvae.errors import UserError, exit_on_user_error
from fastvae.outputs import checked_output

MANIFEST = "tokens.json"


def index_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer type that holds indices 0 ... codebook_size - 1."""
    for dtype, bits in ((torch.uint8, 8), (torch.uint16, 16), (torch.int32, 31)):
        if codebook_size <= 2 ** bits:
            return dtype
    return torch.int64


@torch.no_grad()
def shard_tokens(model, dataset, positions: list[int], batch_size: int, device) -> torch.Tensor:
    """The token indices [n, h, w] of the images at `positions`, in batches of batch_size (eval mode)."""
    from torch.utils.data import Subset

    from fastvae.data import in_order_loader

    out = []
    for x, _, _ in in_order_loader(Subset(dataset, positions), batch_size):
        out.append(model.bottleneck()(model.encode(x.to(device))).posterior.cpu())
    return torch.cat(out)


def write_shard(path: Path, indices: torch.Tensor, positions: list[int], codebook_size: int) -> None:
    from safetensors.torch import save_file

    from fastvae.atomic import replaced

    with replaced(path) as tmp:
        save_file({"indices": indices.to(index_dtype(codebook_size)).contiguous(),
                   "image_index": torch.tensor(positions, dtype=torch.int64)}, str(tmp),
                  metadata={"codebook_size": str(codebook_size)})


@exit_on_user_error
def main(argv=None) -> dict:
    from fastvae.loading import load

    args = tokenize_parser().parse_args(argv)
    if args.shard_size < 1 or args.batch_size < 1 or (args.max_images is not None and args.max_images < 1):
        raise UserError("--shard-size, --batch-size and --max-images: expected positive values")
    out = checked_output(args.out, "--out", "folder")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    vae = load(args.checkpoint, args.device or ("cuda" if torch.cuda.is_available() else "cpu"), args.overrides,
               args.trust_model, args.ema)
    quantizer = vae.model.bottleneck()
    if quantizer is None:
        raise UserError(f"checkpoint '{args.checkpoint}' is a {vae.cfg.model.name} with a Gaussian latent; expected a "
                        f"tokenizer (model.name=vq_autoencoder, quantizer.kind vq, fsq or lfq)")
    dataset = vae.split(args.split)
    total = min(len(dataset), args.max_images or len(dataset))
    shards = math.ceil(total / args.shard_size)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(shards):
        name = f"tokens-{k:05d}.safetensors"
        files.append(name)
        if k % world != rank:
            continue
        positions = list(range(k * args.shard_size, min(total, (k + 1) * args.shard_size)))
        indices = shard_tokens(vae.model, dataset, positions, args.batch_size, vae.device)
        write_shard(out / name, indices, positions, quantizer.codebook_size)
    manifest = {"checkpoint": str(vae.path), "split": args.split, "images": total, "shard_size": args.shard_size,
                "codebook_size": quantizer.codebook_size, "token_grid": list(vae.model.latent_shape[1:]),
                "index_dtype": str(index_dtype(quantizer.codebook_size)).replace("torch.", ""), "files": files}
    if rank == 0:
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
        print(f"fastvae: wrote {total} images' tokens ({manifest['token_grid'][0]}x{manifest['token_grid'][1]} of "
              f"{quantizer.codebook_size:,} codes) in {shards} shard(s) to {out}", flush=True)
    return manifest


def read_tokens(path: str | Path, model) -> torch.Tensor:
    """A shard's indices [n, h, w], checked against the model: its token grid and codebook (one line)."""
    from safetensors.torch import load_file

    try:
        indices = load_file(str(path))["indices"].long()
    except Exception as err:  # safetensors' own errors, KeyError for a file of other tensors
        raise UserError(f"--tokens '{path}' is not a tokens file ({type(err).__name__}); expected a "
                        f"tokens-NNNNN.safetensors of fastvae tokenize") from None
    grid, size = tuple(model.latent_shape[1:]), model.bottleneck().codebook_size
    if indices.dim() != 3 or tuple(indices.shape[1:]) != grid:
        raise UserError(f"--tokens '{path}' holds indices {list(indices.shape)}; expected [n, {grid[0]}, {grid[1]}], "
                        f"this model's token grid")
    if indices.numel() and (indices.min() < 0 or indices.max() >= size):
        raise UserError(f"--tokens '{path}' holds index {int(indices.max())}; expected 0 to {size - 1} "
                        f"(this model's {size:,} codes)")
    return indices


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from fastvae.distributed import leave_launched_process

        leave_launched_process(0)
