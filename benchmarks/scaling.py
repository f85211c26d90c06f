"""Data-parallel scaling: measured 1 -> 2 processes here (gloo, CPU), and a model of many GPUs.

    python benchmarks/scaling.py [--config mnist] [--steps 60] [--repeats 2] [--json PATH] [key=value ...]
    python benchmarks/scaling.py --model-only [--step-ms 64=1.5,128=5.0] [--batch 256] [--json PATH]

Measured: `fastvae.train` (the loop users run, data loading and DDP included) on the same global
batch B as 1 process using every core, 1 process on one core, and 2 processes on one core each
(B/2 each: the run tools/loss_compare.py shows equal to 1 x B); images/s from steps.jsonl after a
warm-up, median of the log points, runs interleaved and repeated. Efficiency = 2-process images/s
/ (2 x one-core images/s); vs all cores = 2-process / 1-process-on-all-cores.

Model (benchmarks/scaling.md explains it): step time on N GPUs = compute + the part of the gradient
all-reduce that backward does not hide. Its inputs are printed with the table; the step times of
one GPU are predictions until benchmarks/gpu_check.sh has measured them (pass --step-ms then).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
from harness import machine, write_json  # noqa: E402

WARMUP_STEPS = 10


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="mnist")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per run (the first 10 are warm-up)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model-only", action="store_true", help="print the GPU model only; measure nothing")
    p.add_argument("--step-ms", default="64=1.5,128=5.0",
                   help="one GPU's step time (ms) at --batch per image size; default: predictions")
    p.add_argument("--batch", type=int, default=256, help="images per GPU per step (the model)")
    p.add_argument("--json")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


# ---------------------------------------------------------------- measured here


def run(args, processes: int, threads: int, batch: int, out: Path) -> float:
    """Median images/s of the run's log points after the warm-up."""
    train = ["-m", "fastvae.train", "--config", args.config, *args.overrides, f"data.batch_size={batch}",
             f"train.max_steps={args.steps}", "train.log_every=5", "train.mixed_precision=no", "train.samples=16",
             f"out_dir={out}"]
    from fastvae.launch.processes import accelerate_launch

    cmd = [sys.executable, *train] if processes == 1 else accelerate_launch(train, processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise SystemExit(f"scaling: {processes} process(es) failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    from fastvae.tracking import STEPS_FILE, read_records

    records = read_records(out, STEPS_FILE)
    return statistics.median(r["images_per_sec"] for r in records if r["step"] > WARMUP_STEPS)


def measure(args) -> dict:
    from fastvae.config import load_config

    cores = os.cpu_count() or 1
    batch = load_config(args.config, args.overrides).data.batch_size
    cases = {f"1 process x {cores} threads": (1, cores, batch), "1 process x 1 thread": (1, 1, batch),
             "2 processes x 1 thread": (2, 1, batch // 2)}
    rates = {name: [] for name in cases}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):  # interleaved: drift of the machine hits every case alike
            for i, (name, (procs, threads, b)) in enumerate(cases.items()):
                rates[name].append(run(args, procs, threads, b, Path(tmp) / f"{r}_{i}"))
    median = {name: statistics.median(v) for name, v in rates.items()}
    two, one_core, all_cores = median["2 processes x 1 thread"], median["1 process x 1 thread"], \
        median[f"1 process x {cores} threads"]
    return {"config": args.config, "overrides": args.overrides, "global_batch": batch, "cores": cores,
            "images_per_sec": rates, "median": median,
            "efficiency_vs_one_core": two / (2 * one_core), "speedup_vs_all_cores": two / all_cores}


# ---------------------------------------------------------------- the model

# Link assumptions (bus bandwidth as nccl-tests reports it for ~2-25 MB messages, and the latency
# of one ring step); benchmarks/scaling.md says where they come from.
NVLINK = {"name": "NVLink (H100 SXM)", "busbw_gbs": 250.0, "latency_us": 10.0}
INFINIBAND = {"name": "InfiniBand NDR, one 400 Gb/s NIC per GPU", "busbw_gbs": 40.0, "latency_us": 25.0}
GPUS_PER_NODE = 8
BACKWARD_SHARE = 2 / 3  # of a step's compute: what gradient buckets can overlap with
DDP_BUCKET_MB = 25.0


def dfc_gradient_bytes(image_size: int) -> int:
    from fastvae.models import DFCVAE

    return 4 * sum(p.numel() for p in DFCVAE(latent_dim=200, image_size=image_size).parameters())  # fp32 grads


def ring_ms(nbytes: float, members: int, link: dict) -> float:
    """Ring all-reduce: 2(N-1)/N of the bytes through each member's link, plus 2(N-1) latencies."""
    if members == 1:
        return 0.0
    seconds = 2 * (members - 1) / members * nbytes / (link["busbw_gbs"] * 1e9) + 2 * (members - 1) * link["latency_us"] * 1e-6
    return seconds * 1e3


def allreduce_ms(nbytes: float, gpus: int) -> float:
    """Hierarchical, as NCCL does across nodes: reduce-scatter + all-gather inside a node over NVLink,
    and between nodes each GPU all-reduces its 1/8 share over its own NIC (a ring over the nodes)."""
    per_node = min(gpus, GPUS_PER_NODE)
    nodes = -(-gpus // GPUS_PER_NODE)
    return ring_ms(nbytes, per_node, NVLINK) + ring_ms(nbytes / per_node, nodes, INFINIBAND)


def model_rows(step_ms: dict[int, float], batch: int) -> list[dict]:
    rows = []
    for size, compute in step_ms.items():
        nbytes = dfc_gradient_bytes(size)
        # DDP hides a bucket's all-reduce behind the rest of backward; with one bucket (the whole
        # gradient under 25 MB) only DDP's small first bucket overlaps, so the all-reduce is exposed
        overlap = BACKWARD_SHARE * compute if nbytes / 2**20 > DDP_BUCKET_MB else 0.0
        for gpus in (1, 2, 8, 16, 32, 64, 128):
            comm = allreduce_ms(nbytes, gpus)
            step = compute + max(0.0, comm - overlap)
            nodes = -(-gpus // GPUS_PER_NODE)
            rows.append({"image_size": size, "gpus": gpus, "nodes": nodes, "grad_mb": nbytes / 2**20,
                         "compute_ms": compute, "allreduce_ms": comm, "step_ms": step,
                         "efficiency": compute / step, "images_per_sec": gpus * batch / step * 1e3,
                         "images_per_sec_per_node": min(gpus, GPUS_PER_NODE) * batch / step * 1e3})
    return rows


def print_model(rows: list[dict], batch: int) -> None:
    print(f"\nModel, DFC-VAE (latent 200), {batch} images per GPU per step, fp32 gradients "
          f"(step times of one GPU: predictions unless measured)")
    print(f"links: {NVLINK['name']} {NVLINK['busbw_gbs']:.0f} GB/s, {NVLINK['latency_us']:.0f} us per ring step; "
          f"{INFINIBAND['name']} {INFINIBAND['busbw_gbs']:.0f} GB/s, {INFINIBAND['latency_us']:.0f} us")
    print(f"{'px':>4} {'GPUs':>5} {'nodes':>5} {'grad MB':>8} {'compute':>8} {'allreduce':>10} {'step ms':>8} "
          f"{'eff':>5} {'images/s':>11} {'per node':>10}")
    for r in rows:
        print(f"{r['image_size']:>4} {r['gpus']:>5} {r['nodes']:>5} {r['grad_mb']:>8.1f} {r['compute_ms']:>8.2f} "
              f"{r['allreduce_ms']:>10.3f} {r['step_ms']:>8.2f} {r['efficiency']:>5.2f} {r['images_per_sec']:>11,.0f} "
              f"{r['images_per_sec_per_node']:>10,.0f}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    step_ms = {int(k): float(v) for k, v in (item.split("=") for item in args.step_ms.split(","))}
    result = {"model": {"links": [NVLINK, INFINIBAND], "backward_share": BACKWARD_SHARE, "step_ms": step_ms, "batch": args.batch,
                        "rows": model_rows(step_ms, args.batch)}}
    if not args.model_only:
        measured = measure(args)
        result["measured"] = measured
        print(f"Measured here ({machine()['cpu']}), {args.config}, global batch {measured['global_batch']}:")
        for name, rate in measured["median"].items():
            runs = ", ".join(f"{v:.0f}" for v in measured["images_per_sec"][name])
            print(f"  {name:<26} {rate:8.0f} images/s  (runs: {runs})")
        print(f"  2-process efficiency vs one core each: {measured['efficiency_vs_one_core']:.2f}; "
              f"speed vs 1 process on all {measured['cores']} cores: {measured['speedup_vs_all_cores']:.2f}x")
    print_model(result["model"]["rows"], args.batch)
    write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
