"""Images/s of the training step users run, `Trainer.train_step` (through accelerate: accumulate,
backward, optimizer step, the selected ops, the non-finite guard), against a plain PyTorch step
(the lecture's loop: eager fp32 model, eager losses, backward, Adam) in the same run.

Variants: eager / torch.compile x fp32 / bf16 autocast, for the MNIST conv VAE (batch 128) and the
64x64 CelebA DFC-VAE (batch 64), on one fixed batch of synthetic images (this measures the step,
not data loading). Every row is a ratio to the plain step.

    python benchmarks/train_throughput.py [--repeats 7] [--steps 3] [--precisions fp32 bf16] [--json PATH]
"""

from __future__ import annotations

import copy
import sys
import tempfile
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, GradientState, PartialState

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import base_parser, interleaved, print_table, summarize, write_json  # noqa: E402

from fastvae import losses  # noqa: E402
from fastvae.config import load_config  # noqa: E402
from fastvae.data.base import ImageTensorDataset  # noqa: E402
from fastvae.models import build_model  # noqa: E402
from fastvae.optim import build_optimizer  # noqa: E402
from fastvae.trainer import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {
    "mnist conv_vae 1x28x28": (ROOT / "configs" / "mnist.yaml", 128),
    "celeba dfc_vae 3x64x64": (ROOT / "configs" / "celeba.yaml", 64),
}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
BASELINE = "plain PyTorch fp32"


def plain_step(cfg, model, x):
    """The lecture's loop written out: no accelerate, eager fp32, the eager reference losses."""
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(cfg, model.parameters())

    def step():
        mu, logvar = model.encode(x)
        z, kl = losses.reparam_kl(mu, logvar)
        recon = losses.reconstruction_loss(model.decode(z), x, cfg.loss.recon)
        losses.vae_loss(recon, kl, cfg.loss.recon_weight, cfg.loss.beta).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def trainer_step(config_path, overrides, x, out_dir: Path):
    """Trainer.train_step on the batch x. Each Trainer gets its own accelerate state: accelerate keeps
    one process-wide state and refuses a second precision; the precision a variant runs with is
    fixed when its model is prepared (autocast wraps forward), which the check below confirms."""
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
    cfg = load_config(config_path, [*overrides, f"out_dir={out_dir}", "train.epochs=1000", "logger=none"])
    images = (x.cpu() * 255).to(torch.uint8)
    trainer = Trainer(cfg, datasets=(ImageTensorDataset(images, torch.zeros(len(x))),) * 2)
    batch = (x.to(trainer.accelerator.device), None, None)
    seen = []
    hook = trainer.raw_model.encoder[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    trainer.train_step(batch)
    hook.remove()
    want = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
    assert seen == [want], f"{overrides}: first layer ran in {seen}, expected {want}"
    return lambda: trainer.train_step(batch)


def cases_for(workload: str, precisions: list[str], device, tmp: Path) -> dict:
    config_path, batch = WORKLOADS[workload]
    common = ["model.dropout=0.0", "train.ops=eager", f"data.batch_size={batch}", f"train.cpu={device.type == 'cpu'}"]
    torch.manual_seed(0)
    cfg = load_config(config_path, common)
    x = torch.rand(batch, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device)
    cases = {BASELINE: plain_step(cfg, build_model(cfg).to(device), x)}
    for compile_ in (False, True):
        for precision in precisions:
            name = f"train_step {'compiled' if compile_ else 'eager'} {precision}"
            overrides = [*common, f"train.compile={str(compile_).lower()}",
                         f"train.mixed_precision={PRECISIONS[precision]}"]
            cases[name] = trainer_step(config_path, overrides, x, tmp / f"{len(cases)}")
    return cases


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing sample")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastvae-bench-") as tmp:
        for workload in args.workloads:
            print(f"{workload}: building the variants (compiling takes a while on first use)...", flush=True)
            cases = cases_for(workload, args.precisions, device, Path(tmp) / workload.split()[0])
            samples = interleaved(cases, device, repeats=args.repeats, calls_per_sample=args.steps, warmup=2)
            base = summarize(samples[BASELINE])["median_s"]
            batch = WORKLOADS[workload][1]
            for name, times in samples.items():
                s = summarize(times)
                rows.append({"workload": workload, "variant": name, "batch": batch, **s, "median_ms": s["median_s"] * 1e3,
                             "images_per_s": batch / s["median_s"], "x_plain_pytorch": base / s["median_s"]})
    print()
    print(f"device: {device}, {args.repeats} interleaved repeats x {args.steps} steps, median step time")
    print_table(rows, [("workload", "workload", ""), ("variant", "variant", ""), ("batch", "batch", "d"),
                       ("median_ms", "step ms", ".1f"), ("images_per_s", "images/s", ".0f"),
                       ("x_plain_pytorch", "x plain PyTorch", ".2f")])
    write_json(args.json, {"benchmark": "train_throughput", "device": str(device), "repeats": args.repeats,
                           "steps_per_sample": args.steps, "baseline": BASELINE, "results": rows})


if __name__ == "__main__":
    main()
