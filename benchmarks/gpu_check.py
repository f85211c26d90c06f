"""The checks only a GPU can answer, in one run, every number into one JSON with the GPU's name.

1. parity of both fused ops against fastvae.losses in float64, fp32 / bf16 / fp16, at the real
   shapes (latents B=128 D=2 and B=256 D=200; images 256x1x28x28, 256x3x64x64, 256x3x128x128)
2. CUDA graphs: replaying a captured fused_reparam_kl must draw new eps every replay
3. torch.compile of the full training step with train.ops=triton: graph breaks (want 0)
4. benchmarks/kernels.py (fused vs eager vs compiled, fraction of copy bandwidth)
5. benchmarks/train_throughput.py step rows for every ops mode: MNIST, CelebA 64 and 128 px, bf16
6. a 40-step training run with train.ops=triton
7. a DFC-VAE run on CelebA-format JPEGs (tools/celeba_fixture.py) with the shipped
   defaults (data.loader=auto: decoded once into GPU memory; bf16 where native) and flips
8. the in-kernel RNG against fastvae.noise (forward, and backward regenerating the same eps)
9. steps between log points under torch.cuda.set_sync_debug_mode("error"): no host sync
10. the compiled step with KL warm-up (reduce-overhead on a GPU): graphs, breaks, recompiles
11. a synthetic CelebA-size data set (162,770 x 3 x 64 x 64 uint8) held on the GPU: images/s
12. an fp16 (GradScaler) run, a run that must stop on a non-finite loss, and with 2+ GPUs a
    2-GPU DDP run (NCCL, SyncBatchNorm, ranks_agree; smoke: 2 gloo processes)
13. the latent-diffusion autoencoder (AutoencoderKL 64/128/128 at kl-f8's 256 px; smoke: 32 px):
    fastvae's step against the diffusers-script-style step before and after disc_start, fp32 vs bf16,
    NCHW vs channels_last, FLOPs and peak memory (benchmarks/train_throughput.py --parts kl), and the
    256 px step's memory with and without gradient checkpointing (benchmarks/kl_memory.py; GPU only)
14. the tokenizer: the fused nearest-code lookup's parity at LlamaGen's 32,768 x 16,384 x 8 (l2) and at
    8,192 x 1,024 x 256 (parity, with the vectors whose fp32 code differs from float64's), and its 256 px
    step against the same step on vector-quantize-pytorch (benchmarks/train_throughput.py --parts vq)
Every check has a time budget; the kit stays under BUDGET_S and the JSON names what did not run.

    bash benchmarks/gpu_check.sh OUT          # on a GPU machine: < 9 minutes on one H100
    bash benchmarks/gpu_check.sh OUT --smoke  # on a CPU: tiny shapes under TRITON_INTERPRET=1 (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before fastvae.kernels defines the kernels

from harness import PARITY_TOLERANCE, celeba_folder, machine, max_relative_error  # noqa: E402  (benchmarks/, this script's folder)

from fastvae import losses  # noqa: E402
from fastvae.kernels import fused_recon_loss, fused_reparam_kl, fused_vector_quantize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LATENTS = [(128, 2), (256, 200)]
IMAGES = [(256, 1, 28, 28), (256, 3, 64, 64), (256, 3, 128, 128)]
SMOKE_LATENTS, SMOKE_IMAGES = [(8, 2), (16, 20)], [(4, 1, 28, 28), (2, 3, 64, 64)]
# the nearest-code lookup (N vectors, K codes, D, l2): LlamaGen's tokenizer at 256 px, batch 128, and VQGAN's
VQ_SHAPES, SMOKE_VQ_SHAPES = [(32768, 16384, 8, True), (8192, 1024, 256, False)], [(300, 100, 8, True), (70, 40, 64, False)]
MAX_CODES_OFF = 1e-4  # the share of vectors whose fp32 nearest code may differ from float64's (near-ties)
BUDGET_S = 540  # the whole kit on one GPU: under 9 minutes
# the kit's training runs in OUT and their faces: scratch, cleared when the kit runs again into the same OUT
# (a run refuses an out_dir holding another run's checkpoints)
RUN_FOLDERS = ("celeba", "sync_free", "compiled", "celeba_size", "run_triton", "run_fp16", "run_nonfinite",
               "run_celeba", "run_ddp")
KEYED_TOLERANCE = 1e-5  # the GPU's approximate sqrt/log/cos in Box-Muller: a few float32 ulp (docs/kernels_benchmarks.md)
CELEBA_TRAIN_IMAGES = 162_770


class Budget:
    """Wall-clock seconds left for the kit: a check runs only if its own budget still fits."""

    def __init__(self, total_s: float) -> None:
        self.end = time.perf_counter() + total_s

    def left(self) -> float:
        return self.end - time.perf_counter()

    def run(self, name: str, need_s: float, check, *args) -> dict:
        if self.left() < need_s:
            return {"not_run": f"{name}: {need_s:.0f} s needed, {max(0.0, self.left()):.0f} s of the kit's "
                               f"{BUDGET_S} s left", "ok": True}
        start = time.perf_counter()
        result = check(*args, timeout=min(need_s, self.left()))
        return {**result, "seconds": round(time.perf_counter() - start, 1)}


def reparam_parity(shape, dtype, device) -> dict:
    g = torch.Generator().manual_seed(0)
    mu, logvar, eps = (torch.randn(*shape, generator=g).to(device, dtype) for _ in range(3))
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl = fused_reparam_kl(mu, logvar, eps)
    dz, dkl = torch.randn(*shape, generator=g).to(device, dtype), torch.randn(shape[0], generator=g).to(device)
    dmu, dlogvar = torch.autograd.grad((z, kl), (mu, logvar), (dz, dkl))
    m64, l64 = (t.detach().double().requires_grad_(True) for t in (mu, logvar))
    z64, kl64 = losses.reparameterize(m64, l64, eps.double()), losses.kl_divergence(m64, l64)
    dm64, dl64 = torch.autograd.grad((z64, kl64), (m64, l64), (dz.double(), dkl.double()))
    return {"z": max_relative_error(z, z64), "kl": max_relative_error(kl, kl64), "dmu": max_relative_error(dmu, dm64),
            "dlogvar": max_relative_error(dlogvar, dl64)}


def recon_parity(shape, dtype, device, kind) -> dict:
    g = torch.Generator().manual_seed(1)
    logits = (3 * torch.randn(*shape, generator=g)).to(device, dtype).requires_grad_(True)
    target = torch.rand(*shape, generator=g).to(device, dtype)
    loss = fused_recon_loss(logits, target, kind)
    dloss = (torch.rand(shape[0], generator=g) + 0.5).to(device)
    (dlogits,) = torch.autograd.grad(loss, logits, dloss)
    x64 = logits.detach().double().requires_grad_(True)
    loss64 = losses.reconstruction_loss(x64, target.double(), kind)
    (dx64,) = torch.autograd.grad(loss64, x64, dloss.double())
    return {"loss": max_relative_error(loss, loss64), "dlogits": max_relative_error(dlogits, dx64)}


def vq_parity(n, k, d, l2, device) -> dict:
    """fused_vector_quantize (fp32) against the float64 eager lookup: the vectors whose code differs (near-
    ties), and the errors of z_q, loss and dv on the others; of dcodes where no code differs."""
    g = torch.Generator().manual_seed(2)
    v, codes, dq = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((n, d), (k, d), (n, d)))
    if l2:
        v, codes = torch.nn.functional.normalize(v, dim=1), torch.nn.functional.normalize(codes, dim=1)
    results = []
    for fn, dtype, dev in ((fused_vector_quantize, torch.float32, device), (losses.vector_quantize, torch.float64, "cpu")):
        vv, cc = v.to(dev, dtype).requires_grad_(True), codes.to(dev, dtype).requires_grad_(True)
        q, indices, loss = fn(vv, cc, 0.25, 1.0)
        dv, dcodes = torch.autograd.grad((q * dq.to(dev, dtype)).sum() + loss.sum(), (vv, cc))
        results.append([t.detach().cpu() for t in (q, indices, loss, dv, dcodes)])
    (q, i, loss, dv, dc), (q64, i64, loss64, dv64, dc64) = results
    agree = i == i64
    errors = {"z_q": max_relative_error(q[agree], q64[agree]), "loss": max_relative_error(loss[agree], loss64[agree]),
              "dv": max_relative_error(dv[agree], dv64[agree])}
    if agree.all():
        errors["dcodes"] = max_relative_error(dc, dc64)
    return {"errors": errors, "codes_off": int((~agree).sum())}


def parity(device) -> list[dict]:
    rows = []
    latents, images = (SMOKE_LATENTS, SMOKE_IMAGES) if SMOKE else (LATENTS, IMAGES)
    for precision, dtype in DTYPES.items():
        for shape in latents:
            rows.append({"op": "reparam_kl", "shape": list(shape), "dtype": precision,
                         "errors": reparam_parity(shape, dtype, device)})
        for shape in images:
            for kind in ("bce", "mse"):
                rows.append({"op": f"recon_{kind}", "shape": list(shape), "dtype": precision,
                             "errors": recon_parity(shape, dtype, device, kind)})
    for n, k, d, l2 in SMOKE_VQ_SHAPES if SMOKE else VQ_SHAPES:
        rows.append({"op": "vector_quantize", "shape": [n, k, d], "dtype": "fp32", "l2": l2,
                     **vq_parity(n, k, d, l2, device)})
    for row in rows:
        row["max_error"] = max(row["errors"].values())
        row["ok"] = row["max_error"] <= PARITY_TOLERANCE[DTYPES[row["dtype"]]] and \
            row.get("codes_off", 0) <= MAX_CODES_OFF * row["shape"][0]
    return rows


MIN_DRIVER = 580  # torch==2.14.1 from PyPI is a CUDA 13 build: NVIDIA's driver 580 or newer


def why_no_cuda() -> str:
    """One line: a driver too old for this torch's CUDA (torch then just sees no GPU), or no GPU at all."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        out = None
    if out is not None and out.returncode == 0 and out.stdout.strip():
        driver, _, name = out.stdout.strip().splitlines()[0].partition(",")
        major = int(driver.split(".")[0]) if driver.split(".")[0].isdigit() else 0
        if major < MIN_DRIVER:
            return (f"the NVIDIA driver {driver.strip()} ({name.strip()}) is too old for torch {torch.__version__} "
                    f"(CUDA {torch.version.cuda}): torch sees no GPU; expected driver >= {MIN_DRIVER}, or a torch "
                    f"built for the CUDA this driver supports")
        return f"nvidia-smi sees {name.strip()} (driver {driver.strip()}) but torch {torch.__version__} does not"
    return "no CUDA device; expected a GPU machine (or --smoke on a CPU)"


def cuda_graph_replays_draw_new_eps(device) -> dict:
    if device.type != "cuda":
        return {"skipped": "no CUDA device"}
    mu = torch.zeros(256, 200, device=device)
    logvar = torch.zeros_like(mu)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile the kernels) outside the capture
        for _ in range(3):
            fused_reparam_kl(mu, logvar)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        z, _ = fused_reparam_kl(mu, logvar)  # mu = 0, sigma = 1: z is eps
    draws = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        draws.append(z.clone())
    distinct = all(not torch.equal(a, b) for i, a in enumerate(draws) for b in draws[i + 1:])
    return {"replays": len(draws), "all_different": distinct, "eps_std": float(draws[0].std()), "ok": distinct}


def keyed_rng_matches_its_twin(device, timeout=None) -> dict:
    """z = eps with mu = 0, logvar = 0: the kernel's in-kernel keyed draw against fastvae.noise, and
    backward's regenerated eps (dlogvar = 0.5 * dz * eps for dz = 1, dkl = 0)."""
    from fastvae import noise

    b, d = (16, 20) if SMOKE else (256, 200)
    rows = noise.row_offsets(torch.arange(b, device=device) * 7 + 3, d, 11)
    seed = torch.tensor(2**31 + 5, dtype=torch.int64, device=device)  # past the old modulo boundary
    mu = torch.zeros(b, d, device=device, requires_grad=True)
    logvar = torch.zeros(b, d, device=device, requires_grad=True)
    z, kl = fused_reparam_kl(mu, logvar, seed=seed, row_offsets=rows)
    _, dlogvar = torch.autograd.grad((z, kl), (mu, logvar), (torch.ones_like(z), torch.zeros_like(kl)))
    twin = noise.keyed_normal(seed, rows, d)
    errors = {"z": max_relative_error(z, twin), "backward_eps": max_relative_error(2 * dlogvar, twin)}
    return {"errors": errors, "tolerance": KEYED_TOLERANCE, "ok": max(errors.values()) <= KEYED_TOLERANCE}


def tiny_trainer(out: Path, *overrides):
    from fastvae.config import load_config
    from fastvae.run_setup import reset_accelerate_state
    from fastvae.trainer import Trainer

    reset_accelerate_state()
    return Trainer(load_config("mnist", ["data.limit=1024", "data.batch_size=64", "train.log_every=1000",
                                         "loss.kl_warmup_steps=100", f"out_dir={out}", *overrides]))


def steps_without_host_sync(device, out: Path, timeout=None) -> dict:
    """The steps between log points, as fit() runs them, with CUDA's sync debug mode set to error: any
    host sync raises (on a CPU the mode does not exist: tests/test_trainer.py checks host reads there)."""
    trainer = tiny_trainer(out / "sync_free")
    batches = iter(trainer.train_loader)
    trainer.train_step(next(batches))
    steps = 3 if SMOKE else 8
    mode = "error" if device.type == "cuda" else "not available on a CPU"
    try:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        for _ in range(steps):
            trainer.train_step(next(batches))
        error = None
    except RuntimeError as err:
        error = str(err).splitlines()[0]
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    return {"steps": steps, "sync_debug_mode": mode, "error": error, "ok": error is None}


def compiled_step_counts(device, out: Path, timeout=None) -> dict:
    """train.compile=true with KL warm-up (beta changes every step): graphs, graph breaks and
    recompiles over the steps; reduce-overhead (CUDA graphs) on a GPU. Want 1 graph, 0, 0."""
    from torch._dynamo.utils import counters

    from fastvae.trainer import compile_counts

    torch._dynamo.reset()
    counters.clear()
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    trainer = tiny_trainer(out / "compiled", "data.limit=2048", "train.compile=true", f"train.compile_mode={mode}")
    batches, steps = iter(trainer.train_loader), 30  # KL warm-up: beta differs at every one
    for _ in range(steps):
        trainer.train_step(next(batches))
    trainer.close()
    graphs, breaks = compile_counts().values()
    # one compiled frame: every frame dynamo compiled past the first is a recompile or a break's resume
    recompiles = max(0, counters["frames"]["total"] - 1 - breaks)
    return {"mode": mode, "steps": steps, "graphs": graphs, "graph_breaks": breaks, "recompiles": recompiles,
            "break_reasons": list(counters["graph_break"])[:5], "ok": graphs == 1 and breaks == 0 and not recompiles}


def celeba_size_throughput(device, out: Path, timeout=None) -> dict:
    """A CelebA-size training set of random uint8 faces held on the device (data.loader=memory): the
    end-to-end images/s of one epoch, data included, as fit() reports it."""
    from fastvae.config import load_config
    from fastvae.data.base import ImageTensorDataset
    from fastvae.run_setup import reset_accelerate_state
    from fastvae.trainer import Trainer

    n = 16 if SMOKE else CELEBA_TRAIN_IMAGES  # smoke: one epoch of 2 steps (a stop mid-epoch writes no epoch row)
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    data = ImageTensorDataset(images, torch.zeros(n, dtype=torch.long))
    reset_accelerate_state()
    extra = ["data.batch_size=8", "model.latent_dim=8"] if SMOKE else ["data.batch_size=256"]
    trainer = Trainer(load_config("celeba", ["train.epochs=1", "data.loader=memory", "train.samples=4",
                                             f"out_dir={out / 'celeba_size'}", *extra]), datasets=(data, data))
    result = trainer.fit()
    from fastvae.tracking import read_records

    record = read_records(out / "celeba_size")[-1]
    return {"images": n, "steps": result["step"], "images_per_sec": record["images_per_sec"], "ok": True}


def graph_breaks(device) -> dict:
    from fastvae.config import load_config
    from fastvae.models import build_model

    torch._dynamo.reset()
    cfg = load_config("celeba", ["model.latent_dim=16" if SMOKE else "model.latent_dim=200"])
    model = build_model(cfg).to(device)
    model.use_reparam_kl(fused_reparam_kl)
    x = torch.rand(4 if SMOKE else 64, 3, 64, 64, device=device)

    def step(x):
        logits, _, _, kl = model(x)
        return losses.vae_loss(fused_recon_loss(logits, x, "mse"), kl, 1.0, 1.0)

    explanation = torch._dynamo.explain(step)(x)
    return {"graph_breaks": explanation.graph_break_count, "graphs": explanation.graph_count,
            "reasons": [str(r.reason) for r in explanation.break_reasons], "ok": explanation.graph_break_count == 0}


def run(name: str, command: list[str], out: Path, timeout: float) -> dict:
    """A benchmark or training run as a subprocess, bounded in time; its output kept in OUT."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as err:
        code, output = "timeout", f"{err.stdout or ''}{err.stderr or ''}"
    (out / f"{name}.log").write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    return {"command": " ".join(command), "returncode": code, "seconds": round(time.perf_counter() - start, 1),
            "ok": code == 0}


def subprocess_checks(out: Path, budget: Budget) -> dict:
    py = sys.executable
    if SMOKE:
        kernels = [py, "benchmarks/kernels.py", "--quick", "--repeats", "1"]
        throughput = [py, "benchmarks/train_throughput.py", "--parts", "step", "--workloads", "mnist conv_vae 1x28x28",
                      "--repeats", "1", "--steps", "1", "--precisions", "fp32", "--formats", "channels_last",
                      "--modes", "eager"]
        training = ["train.max_steps=4", "data.limit=256", "data.batch_size=32", "train.samples=4"]
        celeba = (60, ["train.max_steps=2", "data.batch_size=8", "model.latent_dim=8", "train.samples=4",
                       "train.mixed_precision=no", "data.loader=memory"])  # what auto picks on a GPU
        kl = [py, "benchmarks/train_throughput.py", "--parts", "kl", "--kl-size", "32", "--repeats", "1",
              "--precisions", "fp32", "--formats", "channels_last"]
        vq = [py, "benchmarks/train_throughput.py", "--parts", "vq", "--kl-size", "32", "--repeats", "1",
              "--precisions", "fp32", "--formats", "channels_last", "--phases", "after"]  # (the kl run has both)
    else:
        kernels = [py, "benchmarks/kernels.py", "--repeats", "5"]
        throughput = [py, "benchmarks/train_throughput.py", "--parts", "step", "--repeats", "5", "--precisions", "bf16",
                      "--formats", "channels_last", "--workloads", "mnist conv_vae 1x28x28",
                      "celeba dfc_vae 3x64x64", "celeba dfc_vae 3x128x128"]
        training = ["train.max_steps=40"]
        celeba = (700, ["train.epochs=2", "data.batch_size=64"])  # 490 train faces: 7 steps per epoch
        # the latent-diffusion autoencoder's step against the diffusers-script-style step, both phases:
        # fp32 vs bf16, NCHW vs channels_last, with FLOPs and peak memory (kl-f8's 256 px needs a GPU)
        kl = [py, "benchmarks/train_throughput.py", "--parts", "kl", "--kl-size", "256", "--repeats", "3"]
        # the tokenizer's step at 256 px: 64 x 64 tokens x batch 8 = 32,768 vectors against 16,384 codes of 8
        # dimensions (LlamaGen's lookup), fastvae's (the fused lookup: train.ops=auto) against the peer's
        vq = [py, "benchmarks/train_throughput.py", "--parts", "vq", "--kl-size", "256", "--repeats", "3",
              "--formats", "channels_last"]
    return {
        "training_triton": budget.run("training_triton", 60, lambda timeout: run(
            "training_triton", [py, "-m", "fastvae.train", "--config", "mnist", "train.ops=triton", *training,
                                f"out_dir={out / 'run_triton'}"], out, timeout)),
        "training_fp16": budget.run("training_fp16", 60, lambda timeout: run(
            "training_fp16", [py, "-m", "fastvae.train", "--config", "mnist", "train.mixed_precision=fp16", *training,
                              f"out_dir={out / 'run_fp16'}"], out, timeout)) if not SMOKE else
        {"not_run": "fp16 autocast needs a GPU", "ok": True},
        "nonfinite_stops": budget.run("nonfinite_stops", 45, lambda timeout: stops_on_nonfinite(py, training, out,
                                                                                             timeout)),
        "training_celeba": budget.run("training_celeba", 90, lambda timeout: run(
            "training_celeba", [py, "-m", "fastvae.train", "--config", "celeba",
                                f"data.root={celeba_folder(out / 'celeba', celeba[0])}", "data.flip=true", *celeba[1],
                                f"out_dir={out / 'run_celeba'}"], out, timeout)),
        "ddp_2gpu": budget.run("ddp_2gpu", 120, lambda timeout: two_gpu_ddp(py, out, timeout)) if
        SMOKE or torch.cuda.device_count() >= 2 else {"not_run": "fewer than 2 GPUs visible", "ok": True},
        "kernels": budget.run("kernels", 90, lambda timeout: run(
            "kernels", [*kernels, "--json", str(out / "kernels.json")], out, timeout)),
        "train_throughput": budget.run("train_throughput", 150, lambda timeout: run(
            "train_throughput", [*throughput, "--json", str(out / "train_throughput.json")], out, timeout)),
        "kl_autoencoder": budget.run("kl_autoencoder", 150, lambda timeout: run(
            "kl_autoencoder", [*kl, "--json", str(out / "kl_autoencoder.json")], out, timeout)),
        "tokenizer_step": budget.run("tokenizer_step", 150, lambda timeout: run(
            "tokenizer_step", [*vq, "--json", str(out / "tokenizer_step.json")], out, timeout)),
        # max_memory_allocated of the 256 px step with and without gradient checkpointing, against the peer
        "kl_memory": {"not_run": "smoke: tests/test_benchmarks.py runs kl_memory.py on the CPU", "ok": True} if SMOKE
        else budget.run("kl_memory", 120, lambda timeout: run(
            "kl_memory", [py, "benchmarks/kl_memory.py", "--sizes", "256", "--batch", "8", "--json",
                          str(out / "kl_memory.json")], out, timeout)),
    }


def stops_on_nonfinite(py: str, training: list[str], out: Path, timeout: float) -> dict:
    """A learning rate that blows the model up: the run must stop with exit 3 naming the first bad step
    (the guard records it on the device and reads it at log points: no sync per step)."""
    result = run("nonfinite_stops", [py, "-m", "fastvae.train", "--config", "mnist", *training, "optim.lr=1e30",
                                      "train.log_every=2", f"out_dir={out / 'run_nonfinite'}"], out, timeout)
    log = (out / "nonfinite_stops.log").read_text()
    return {**result, "ok": result["returncode"] == 3 and "non-finite" in log}


def two_gpu_ddp(py: str, out: Path, timeout: float) -> dict:
    """2 GPUs, NCCL, SyncBatchNorm, compiled: the DFC-VAE trains, every rank ends with the same
    parameters, and the JSON says how many graphs torch's SyncBatchNorm split the compiled step into
    (on CPU/gloo fastvae's own synced BatchNorm gives one graph per BatchNorm layer: docs/scale_out.md)."""
    from fastvae.launch.processes import accelerate_launch

    # smoke: the same path with 2 gloo processes on the CPU (fastvae's own synced BatchNorm), not compiled
    size = ["train.max_steps=2", "data.batch_size=4", "model.latent_dim=8", "model.dropout=0", "train.samples=4",
            "train.mixed_precision=no"] if SMOKE else ["train.compile=true", "train.max_steps=20", "data.batch_size=32"]
    cmd = accelerate_launch(["-m", "fastvae.train", "--config", "celeba", f"data.root={out / 'celeba'}",
                             "train.sync_batchnorm=true", *size, f"out_dir={out / 'run_ddp'}"], processes=2)
    result = run("ddp_2gpu", cmd, out, timeout)
    summary = out / "run_ddp" / "summary.json"
    done = json.loads(summary.read_text()) if summary.is_file() else {}
    return {**result, "ranks_agree": done.get("ranks_agree"), "compiled_graphs": done.get("compiled_graphs"),
            "graph_breaks": done.get("graph_breaks"), "ok": result["ok"] and done.get("ranks_agree") is True}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json, the benchmarks' JSON and logs")
    parser.add_argument("--smoke", action="store_true", help="CPU smoke mode: tiny shapes under the interpreter")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.smoke else "cuda")
    if not args.smoke and not torch.cuda.is_available():
        print(f"gpu_check: error: {why_no_cuda()}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(out / name, ignore_errors=True)
    budget = Budget(BUDGET_S)
    report = {"machine": machine(), "smoke": args.smoke, "budget_s": BUDGET_S, "parity": parity(device),
              "cuda_graph_replay": cuda_graph_replays_draw_new_eps(device), "compile": graph_breaks(device),
              "keyed_rng": budget.run("keyed_rng", 10, lambda timeout: keyed_rng_matches_its_twin(device)),
              "sync_free_steps": budget.run("sync_free_steps", 60, lambda timeout: steps_without_host_sync(device, out)),
              "compiled_step": budget.run("compiled_step", 120, lambda timeout: compiled_step_counts(device, out)),
              "celeba_size": budget.run("celeba_size", 120, lambda timeout: celeba_size_throughput(device, out))}
    report["runs"] = subprocess_checks(out, budget)
    report["not_run"] = [r["not_run"] for r in (*report["runs"].values(), *(report[k] for k in (
        "keyed_rng", "sync_free_steps", "compiled_step", "celeba_size"))) if "not_run" in r]
    failed = [r for r in report["parity"] if not r["ok"]]
    report["ok"] = not failed and report["compile"]["ok"] and report["cuda_graph_replay"].get("ok", True) and all(
        report[k]["ok"] for k in ("keyed_rng", "sync_free_steps", "compiled_step", "celeba_size")) and all(
        r["ok"] for r in report["runs"].values())
    report["seconds"] = round(BUDGET_S - budget.left(), 1)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"{'op':<16}{'shape':<20}{'dtype':<7}{'max rel err':>12}  ok")
    for r in report["parity"]:
        off = f"  ({r['codes_off']} codes off float64's)" if "codes_off" in r else ""
        print(f"{r['op']:<16}{'x'.join(map(str, r['shape'])):<20}{r['dtype']:<7}{r['max_error']:>12.2e}  {r['ok']}{off}")
    print(f"CUDA graph replays draw new eps: {report['cuda_graph_replay']}")
    print(f"torch.compile of the step with fused ops: {report['compile']['graph_breaks']} graph break(s)")
    for name in ("keyed_rng", "sync_free_steps", "compiled_step", "celeba_size"):
        print(f"{name}: {json.dumps(report[name])}")
    for name, r in report["runs"].items():
        said = r["not_run"] if "not_run" in r else f"exit {r['returncode']} in {r['seconds']} s"
        print(f"{name}: {said} (log: {out / (name + '.log')})")
    print(f"the kit took {report['seconds']} s of its {BUDGET_S} s budget; not run: {report['not_run'] or 'none'}")
    print(f"{'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}; wrote {out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
