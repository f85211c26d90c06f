"""Images/s of one VAE training step (forward, loss, backward, Adam step):
eager vs torch.compile, fp32 vs bf16 autocast, on the MNIST conv VAE and the
64x64 CelebA DFC-VAE (synthetic tensors: this measures compute, not data loading).

    python benchmarks/train_throughput.py [--repeats 7] [--json results.json]
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import base_parser, interleaved, print_table, summarize, write_json  # noqa: E402

from fastvae.config import load_config  # noqa: E402
from fastvae.models import build_model  # noqa: E402
from fastvae.select_ops import select_ops  # noqa: E402
from fastvae.train import build_optimizer, compute_loss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "mnist conv_vae 1x28x28": (ROOT / "configs" / "mnist.yaml", 128),
    "celeba dfc_vae 3x64x64": (ROOT / "configs" / "celeba.yaml", 64),
}
VARIANTS = [("eager", "fp32"), ("eager", "bf16"), ("compiled", "fp32"), ("compiled", "bf16")]


def make_step(cfg, base_model, x, device, compiled: bool, precision: str):
    """The same step as fastvae.train, on its own copy of the same initial model."""
    model = copy.deepcopy(base_model).to(device).train()
    ops = select_ops("eager", device)
    model.reparam_kl = ops.reparam_kl
    optimizer = build_optimizer(cfg, model.parameters())
    run_model = torch.compile(model) if compiled else model

    def autocast():
        # what accelerate's mixed_precision="bf16" does around the forward pass
        if precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        with autocast():
            loss, _, _ = compute_loss(run_model, x, ops, cfg.loss, cfg.loss.beta)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing sample")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for workload in args.workloads:
        config_path, batch = WORKLOADS[workload]
        cfg = load_config(config_path, ["model.dropout=0.0"])
        torch.manual_seed(0)
        base_model = build_model(cfg)
        x = torch.rand(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device)
        print(f"{workload}: building {len(VARIANTS)} variants (compiling takes a while on first use)...",
              flush=True)
        cases = {f"{mode} {prec}": make_step(cfg, base_model, x, device, mode == "compiled", prec)
                 for mode, prec in VARIANTS}
        samples = interleaved(cases, device, repeats=args.repeats, calls_per_sample=args.steps, warmup=2)
        base = summarize(samples["eager fp32"])["median_s"]
        for name, times in samples.items():
            s = summarize(times)
            rows.append({"workload": workload, "variant": name, "batch": batch, **s,
                         "images_per_s": batch / s["median_s"], "speedup_vs_eager_fp32": base / s["median_s"]})
    for r in rows:
        r["median_ms"] = r["median_s"] * 1e3
    print()
    print(f"device: {device}, {args.repeats} interleaved repeats x {args.steps} steps, median step time")
    print_table(rows, [("workload", "workload", ""), ("variant", "variant", ""), ("batch", "batch", "d"),
                       ("median_ms", "step ms", ".1f"), ("images_per_s", "images/s", ".0f"),
                       ("speedup_vs_eager_fp32", "x eager fp32", ".2f")])
    write_json(args.json, {"benchmark": "train_throughput", "device": str(device), "repeats": args.repeats,
                           "steps_per_sample": args.steps, "results": rows})


if __name__ == "__main__":
    main()
