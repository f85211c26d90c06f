"""Does a refactoring change what training computes? Each objective's loss trace and final parameter
checksum, on 1 and 2 processes, to compare between two checkouts.

    python tools/behaviour_trace.py --out trace.json [--steps 20] [--cases elbo_bce iwae ...] [--nproc 1 2]
    python tools/behaviour_trace.py --compare before.json after.json

Run it once with the previous checkout first on PYTHONPATH (its `fastvae` imported instead of this
one) and once as it is, then --compare: it prints, per case and process count, whether the losses
of every step and the final checksum are bit-identical, or the largest relative difference. Each
run is a real `python -m fastvae.train` (or `accelerate launch -m fastvae.train` with 2 processes)
of the tiny MNIST config, in float32, logging every step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["data.limit=256", "data.batch_size=32", "train.log_every=1", "train.samples=4", "train.mixed_precision=no",
        "train.final_eval=false", "data.num_workers=0"]
KL = ["model.name=kl_autoencoder",
      "model.kwargs={block_out_channels: [8, 16], norm_num_groups: 4, latent_channels: 2}",
      "loss.objective=ldm", "loss.beta=1e-6", "disc.weight=0.5", "disc.start=2", "data.batch_size=16",
      "train.ema_decay=0.99", "disc.norm=none"]
CASES = {
    "elbo_bce": [],
    "elbo_mse": ["loss.recon=mse"],
    "free_bits_cyclical": ["loss.free_bits=0.3", "loss.kl_cycle_steps=4"],
    "capacity": ["loss.capacity=5", "loss.capacity_steps=10"],
    "iwae": ["loss.objective=iwae", "loss.samples=4"],
    "iwae_dreg": ["loss.objective=iwae", "loss.samples=4", "loss.dreg=true"],
    "tcvae": ["loss.objective=tcvae"],
    "sigma_vae": ["loss.recon=mse", "loss.sigma=optimal"],
    "conditional": ["model.condition=labels"],
    "ldm_disc_ema": KL,
}
# the discriminator's keys before they moved under disc. (checkouts from before 2026-12-07)
OLD_KEYS = {"disc.weight": "loss.disc_weight", "disc.start": "loss.disc_start", "disc.factor": "loss.disc_factor",
            "disc.loss": "loss.disc_loss"}


def keys_of_this_checkout(overrides: list[str]) -> list[str]:
    from fastvae.config import DiscConfig

    if hasattr(DiscConfig(), "start"):
        return overrides
    return [OLD_KEYS.get(o.split("=", 1)[0], o.split("=", 1)[0]) + "=" + o.split("=", 1)[1] for o in overrides]


def run(case: str, nproc: int, steps: int, lpips: str, out: Path, timeout: float) -> dict:
    overrides = keys_of_this_checkout([*TINY, *CASES[case], f"train.max_steps={steps}", f"out_dir={out}"])
    if case.startswith("ldm"):
        overrides.append(f"loss.lpips_weights={lpips}")
    if nproc == 1:
        cmd = [sys.executable, "-m", "fastvae.train", "--config", "mnist", *overrides]
    else:
        from fastvae.launch.processes import accelerate_launch

        cmd = accelerate_launch(["-m", "fastvae.train", "--config", "mnist", *overrides], nproc)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{case} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    losses = [json.loads(line)["loss"] for line in (out / "steps.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"losses": losses, "param_checksum": summary["param_checksum"]}


def trace(args) -> None:
    sys.path.insert(0, str(ROOT))
    from tools.random_weights import write_random_backbone

    results = {}
    with tempfile.TemporaryDirectory(prefix="behaviour-trace-") as tmp:
        lpips = str(write_random_backbone("vgg", Path(tmp) / "lpips"))
        for case in args.cases:
            for nproc in args.nproc:
                results[f"{case} x{nproc}"] = run(case, nproc, args.steps, lpips, Path(tmp) / f"{case}-{nproc}",
                                                  args.timeout)
                print(f"{case} x{nproc}: loss[-1] {results[f'{case} x{nproc}']['losses'][-1]:.8g}", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    differ = 0
    print(f"{'case':24} {'steps':>5} {'losses':>22} {'checksum':>22}")
    for name in a:
        if name not in b:
            print(f"{name:24} missing after")
            differ += 1
            continue
        same_losses = a[name]["losses"] == b[name]["losses"]
        same_sum = a[name]["param_checksum"] == b[name]["param_checksum"]
        worst = max((relative(x, y) for x, y in zip(b[name]["losses"], a[name]["losses"])), default=0.0)
        loss_text = "bit-identical" if same_losses else f"max rel {worst:.2e}"
        sum_text = "bit-identical" if same_sum else f"rel {relative(b[name]['param_checksum'], a[name]['param_checksum']):.2e}"
        print(f"{name:24} {len(a[name]['losses']):>5} {loss_text:>22} {sum_text:>22}")
        differ += not (same_losses and same_sum)
    return 1 if differ else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the traces here")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--nproc", nargs="+", type=int, default=[1, 2])
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out is needed to write traces")
    trace(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
