"""Memory of the KL autoencoder's training step per image, at several image sizes, with and without
gradient checkpointing, against the plain step written the diffusers research script's way (the
peer of train_throughput.py --parts kl) in the same run.

Each case runs in a fresh process: set-up, then two steps. Reported: the two steps' peak over the
process as set up (CPU: the peak RSS, reset before the steps through /proc/self/clear_refs, minus the
RSS then; CUDA: max_memory_allocated minus memory_allocated before them), per image: the activations
kept for the backward (what checkpointing trades for recomputation), plus gradients and Adam's state.
The discriminator is active (its forward and backward are in the step), fp32 unless --precision bf16.

    python benchmarks/kl_memory.py [--sizes 64 128 256] [--batch 4] [--precision fp32] [--json PATH]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from harness import base_parser, current_rss, peak_rss, print_table, random_backbone, write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = {"plain PyTorch, the diffusers script's way": [],
            "fastvae train_step": [],
            "fastvae train_step, gradient checkpointing": ["train.gradient_checkpointing=true"]}


def one_case(variant: str, size: int, batch: int, precision: str, device: torch.device) -> dict:
    """Runs in its own process: the measured step's memory above the resting process, in bytes."""
    import train_throughput as tt

    tt.KL_BATCH = batch
    with tempfile.TemporaryDirectory() as tmp:
        lpips_path = random_backbone("vgg", Path(tmp) / "lpips")
        torch.manual_seed(0)
        x = torch.rand(batch, 3, size, size, device=device)
        overrides = [*tt.kl_overrides(size, lpips_path, True), f"train.cpu={device.type == 'cpu'}",
                     f"train.mixed_precision={tt.PRECISIONS[precision]}", *VARIANTS[variant]]
        trainer, step = tt.kl_trainer_step(overrides, x, Path(tmp) / "run")
        if variant.startswith("plain"):
            step = tt.DiffusersScriptStep(trainer.raw_model, trainer.objective.perceptual, x,
                                          True)
            del trainer
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(), step()
            torch.cuda.synchronize(device)
            return {"step_bytes": torch.cuda.max_memory_allocated(device) - before, "resting_bytes": before}
        before = current_rss()
        Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from now
        step(), step()
        return {"step_bytes": peak_rss() - before, "resting_bytes": before}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128, 256])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "SIZE"), help=argparse_hidden())
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(one_case(args.one[0], int(args.one[1]), args.batch, args.precision, device)))
        return
    rows = []
    for size in args.sizes:
        for variant in VARIANTS:
            print(f"{size} px: {variant}...", flush=True)
            proc = subprocess.run([sys.executable, __file__, "--one", variant, str(size), "--batch", str(args.batch),
                                   "--precision", args.precision, "--device", args.device],
                                  capture_output=True, text=True, timeout=1800, cwd=HERE)
            if proc.returncode != 0:
                raise SystemExit(f"{variant} at {size} px failed:\n{proc.stderr[-3000:]}")
            measured = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append({"size": size, "variant": variant, "batch": args.batch, "precision": args.precision,
                         "step_MB": measured["step_bytes"] / 2**20,
                         "per_image_MB": measured["step_bytes"] / 2**20 / args.batch,
                         "resting_MB": measured["resting_bytes"] / 2**20})
    for row in rows:
        peer = next(r for r in rows if r["size"] == row["size"] and r["variant"].startswith("plain"))
        row["x_peer"] = row["step_MB"] / peer["step_MB"]
    what = "peak RSS above the set-up" if device.type == "cpu" else "max allocated above the set-up"
    print(f"\nKL autoencoder step memory ({what}), AutoencoderKL 64/128/128, LPIPS VGG, PatchGAN active, "
          f"batch {args.batch}, {args.precision}, {device}")
    print_table(rows, [("size", "px", "d"), ("variant", "variant", ""), ("step_MB", "step MB", ".0f"),
                       ("per_image_MB", "MB / image", ".0f"), ("x_peer", "x plain", ".2f"),
                       ("resting_MB", "set-up MB", ".0f")])
    write_json(args.json, {"benchmark": "kl_memory", "device": str(device), "results": rows})


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
