"""The CPU tokenizer configs side by side at the same budget: codebook usage and perplexity over the test
split, PSNR and SSIM of the reconstructions, seconds of training. The table of docs/tokenizers.md.

    python benchmarks/tokenizers.py [--epochs 2] [--limit 6000] [--configs vq_fashion_mnist ...] [--json PATH]
        [--figure PATH.png]

Each row trains a shipped config (configs/*_fashion_mnist.yaml) in this process, then runs
`fastvae evaluate --ssim` on its final checkpoint over the 10,000 test images. Plain VQ is the
baseline: with 1,024 learned codes it uses few of them (codebook collapse); l2 + low-dim + EMA +
restart, FSQ and LFQ are the published fixes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from harness import base_parser, machine, print_table, write_json  # noqa: E402

CONFIGS = ["vq_fashion_mnist", "vq_l2_ema_fashion_mnist", "fsq_fashion_mnist", "lfq_fashion_mnist"]
COLUMNS = [("config", "config", ""), ("codes", "codes", "d"), ("usage", "usage", ".1%"),
           ("perplexity", "perplexity", ".1f"), ("psnr_db", "PSNR dB", ".2f"), ("ssim", "SSIM", ".3f"),
           ("train_s", "train s", ".0f")]


def row(name: str, args, out: Path) -> dict:
    from fastvae.checkpoint import list_checkpoints
    from fastvae.config import load_config
    from fastvae.evaluate import main as evaluate
    from fastvae.run_setup import reset_accelerate_state
    from fastvae.train import train

    started = time.perf_counter()
    data = [] if args.data == "fashion_mnist" else [f"data.name={args.data}"]
    train(load_config(name, [f"train.epochs={args.epochs}", f"data.limit={args.limit}", f"out_dir={out / name}",
                             "train.samples=16", *data]))
    seconds = time.perf_counter() - started
    reset_accelerate_state()
    report = evaluate(["--checkpoint", str(list_checkpoints(out / name)[-1]), "--ssim",
                       *(["--max-images", str(args.eval_images)] if args.eval_images else [])])
    pictures = reconstructions_and_counts(list_checkpoints(out / name)[-1], args.eval_images)
    return {"config": name, "codes": report["codebook_size"], "usage": report["codebook_usage"],
            "perplexity": report["codebook_perplexity"], "psnr_db": report["psnr_db"], "ssim": report["ssim"],
            "train_s": seconds, "images": report["images"], **pictures}


def reconstructions_and_counts(checkpoint: Path, limit: int) -> dict:
    """The first 8 test images and their reconstructions, and how often each code is used over the
    test images (what the figure draws)."""
    import torch

    from fastvae.loading import load

    vae = load(checkpoint, "cpu")
    test = vae.split("test")
    n = min(len(test), limit or len(test))
    counts = torch.zeros(vae.model.quantizer.codebook_size, dtype=torch.long)
    shown = None
    with torch.no_grad():
        for start in range(0, n, 500):
            x = torch.stack([test[i][0] for i in range(start, min(n, start + 500))]).float()
            x = x / 255 if x.max() > 1 else x
            latent = vae.model.quantizer(vae.model.encode(x))
            counts += torch.bincount(latent.posterior.flatten(), minlength=counts.numel())
            if shown is None:
                shown = torch.cat([x[:8], vae.model.images(vae.model.decode(latent.z[:8]))])
    return {"code_counts": counts.tolist(), "shown": shown.tolist()}


def draw(rows: list[dict], path: str) -> None:
    """Per config: 8 test images over their reconstructions, and its codes' use sorted (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.3 * len(rows)), gridspec_kw={"width_ratios": [2, 1.2]},
                             squeeze=False)
    for (picture, histogram), r in zip(axes, rows):
        grid = make_grid(torch.tensor(r["shown"]), nrow=8, padding=1, pad_value=1.0)
        picture.imshow(grid.permute(1, 2, 0).clamp(0, 1).numpy(), cmap="gray")
        picture.set_title(f"{r['config']}: test images (top), reconstructions", fontsize=9)
        picture.axis("off")
        counts = sorted(r["code_counts"], reverse=True)
        histogram.bar(range(len(counts)), [max(c, 0.5) for c in counts], width=1.0)
        histogram.set_yscale("log")
        histogram.set_xlim(0, len(counts))
        histogram.set_title(f"codes by use: {r['usage']:.1%} used, perplexity {r['perplexity']:.1f}", fontsize=9)
        histogram.set_xlabel("code (most used first)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = base_parser(__doc__)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=6000, help="training images (Fashion-MNIST has 60,000)")
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--eval-images", type=int, default=0, help="test images evaluated; 0 = all 10,000")
    p.add_argument("--data", default="fashion_mnist", choices=["fashion_mnist", "mnist"],
                   help="mnist: the 5,000 embedded digits (500 test images; a quick check of the plumbing)")
    p.add_argument("--out", help="folder for the runs (default: a temporary one)")
    p.add_argument("--figure", help="also draw each config's reconstructions and code use into this PNG")
    args = p.parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="tokenizers-"))
    rows = [row(name, args, out) for name in args.configs]
    data = "Fashion-MNIST" if args.data == "fashion_mnist" else "embedded MNIST"
    print(f"\n{args.epochs} epochs of {args.limit} {data} images each, {machine()['cpu']}:")
    print_table(rows, COLUMNS)
    if args.figure:
        draw(rows, args.figure)
    for r in rows:  # the pictures' numbers stay out of the JSON; the counts are its usage
        r.pop("shown")
    write_json(args.json, {"machine": machine(), "epochs": args.epochs, "limit": args.limit, "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
