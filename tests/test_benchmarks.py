"""The benchmarks and the GPU kit run end to end and report parity honestly (no speed thresholds here)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_gpu_check_kit_smoke_mode_runs_every_check_on_the_cpu(tmp_path):
    """The kit a lent GPU runs, in its CPU smoke mode, so it cannot rot between GPU sessions."""
    out = tmp_path / "gpu"
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", str(out), "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["smoke"] is True and report["ok"] is True
    assert {r["op"] for r in report["parity"]} == {"reparam_kl", "recon_bce", "recon_mse", "vector_quantize"}
    assert {r["dtype"] for r in report["parity"]} == {"fp32", "bf16", "fp16"}
    assert report["compile"]["graph_breaks"] == 0
    assert report["cuda_graph_replay"] == {"skipped": "no CUDA device"}
    assert set(report["runs"]) == {"kernels", "train_throughput", "training_triton", "training_celeba",
                                   "training_fp16", "nonfinite_stops", "ddp_2gpu", "kl_autoencoder", "kl_memory",
                                   "tokenizer_step"}
    assert all(r["codes_off"] == 0 and len(r["errors"]) == 4 for r in report["parity"] if r["op"] == "vector_quantize")
    assert report["keyed_rng"]["ok"] and report["sync_free_steps"]["ok"] and report["celeba_size"]["ok"]
    # the compiled step, KL warm-up on: one graph, no break, no recompile over 30 steps (single process)
    assert {k: report["compiled_step"][k] for k in ("steps", "graphs", "graph_breaks", "recompiles")} == {
        "steps": 30, "graphs": 1, "graph_breaks": 0, "recompiles": 0}
    assert report["runs"]["nonfinite_stops"]["returncode"] == 3
    assert report["not_run"] == ["fp16 autocast needs a GPU",
                                 "smoke: tests/test_benchmarks.py runs kl_memory.py on the CPU"]
    assert report["runs"]["ddp_2gpu"]["ranks_agree"] is True  # smoke: 2 gloo processes, synced BatchNorm
    assert report["seconds"] < report["budget_s"]
    check_kernel_benchmark(out)
    assert json.loads((out / "train_throughput.json").read_text())["results"]
    kl = json.loads((out / "kl_autoencoder.json").read_text())["results"]  # both phases, the peer and fastvae
    assert {r["workload"].rsplit(", ", 1)[1] for r in kl} == {"before disc_start", "after disc_start"}
    assert all(r["gflop"] > 0 for r in kl) and sum(r["x_baseline"] == 1.0 for r in kl) >= 2
    vq = json.loads((out / "tokenizer_step.json").read_text())["results"]  # fastvae's and the peer's
    assert {r["part"] for r in vq} == {"vq"} and sum("vector-quantize-pytorch" in r["variant"] for r in vq) == 1
    assert all(r["workload"].endswith("after disc_start") and r["gflop"] > 0 for r in vq)
    assert (out / "run_triton" / "summary.json").is_file()
    assert json.loads((out / "run_celeba" / "summary.json").read_text())["step"] == 2


def check_kernel_benchmark(out):
    """The kit's run of `benchmarks/kernels.py --quick --repeats 1`: parity reported honestly."""
    assert "Triton timings need a GPU" in (out / "kernels.log").read_text()
    report = json.loads((out / "kernels.json").read_text())
    assert report["triton_timed"] is False and report["copy_bandwidth_GB_per_s"] > 0
    rows = report["results"]
    assert {r["op"] for r in rows} == {"reparam_kl", "recon_bce", "recon_mse", "vector_quantize"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        if r["impl"] == "triton rng":
            continue
        assert r["max_rel_error_vs_fp64"] <= 1e-5, r
        if r["impl"].startswith("triton"):
            assert r["time_us"] is None  # the interpreter is not a timing
        else:
            assert r["time_us"] > 0 and r["GB_per_s"] > 0


@pytest.mark.slow
def test_dataloader_benchmark_times_every_loader_and_the_memory_start_up(tmp_path):
    pytest.importorskip("ffcv", reason="ffcv not installed (scripts/setup.sh installs it)")
    out = tmp_path / "dataloader.json"
    proc = subprocess.run([sys.executable, "benchmarks/dataloader.py", "--images", "64", "--batch", "16",
                           "--repeats", "1", "--workers", "1", "--json", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["images"] == 64
    assert [r["loader"] for r in report["results"]] == ["torchvision DataLoader", "ffcv raw", "ffcv jpg q90"]
    assert all(r["median_images_per_s"] > 0 for r in report["results"])
    assert len(report["into_memory"]) == 4 and all(r["median_s"] > 0 for r in report["into_memory"])


def test_gpu_check_without_a_gpu_says_so():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", "/tmp/unused-gpu-check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "gpu_check: error: no CUDA device; expected a GPU machine (or --smoke on a CPU)"


def test_scaling_model_adds_the_allreduce_that_backward_cannot_hide(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/scaling.py", "--model-only", "--step-ms", "64=2.0", "--json",
                           str(tmp_path / "s.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "s.json").read_text())
    rows = {r["gpus"]: r for r in result["model"]["rows"]}
    assert rows[1]["step_ms"] == 2.0 and rows[1]["efficiency"] == 1.0  # one GPU: no all-reduce
    assert rows[1]["grad_mb"] * 2**20 == 4 * 3_541_811  # fp32 gradients of the 64 px DFC-VAE
    # under DDP's 25 MB bucket the whole gradient is one bucket: nothing overlaps, all of it is exposed
    assert rows[8]["step_ms"] == pytest.approx(2.0 + rows[8]["allreduce_ms"])
    assert rows[16]["nodes"] == 2 and rows[16]["allreduce_ms"] > rows[8]["allreduce_ms"]
    assert [rows[g]["efficiency"] for g in (2, 8, 16, 128)] == sorted(
        [rows[g]["efficiency"] for g in (2, 8, 16, 128)], reverse=True)
    assert result["machine"]["cpu"]


def test_gpu_check_names_a_driver_too_old_for_this_torch(tmp_path):
    """torch's CUDA 13 build sees no GPU under a driver older than 580: the kit says so in one line."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho '550.54.15, NVIDIA H100 80GB HBM3'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "the NVIDIA driver 550.54.15 (NVIDIA H100 80GB HBM3) is too old for torch" in proc.stderr
    assert "expected driver >= 580" in proc.stderr


@pytest.mark.slow
def test_objectives_benchmark_trains_and_evaluates_each_row(tmp_path):
    """The command behind the objectives table in docs/training.md, at a toy size."""
    out = tmp_path / "objectives.json"
    proc = subprocess.run([sys.executable, "benchmarks/objectives.py", "--epochs", "1", "--limit", "256",
                           "--iwae-samples", "3", "--iwae-images", "8", "--rows", "elbo", "cvae", "--threads", "1",
                           "--step-repeats", "2", "--step-calls", "1",
                           "--out", str(tmp_path / "runs"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert [r["row"] for r in rows] == ["elbo", "cvae"]
    steps = {r["objective"]: r for r in report["step_timing"]}
    assert steps["ELBO (baseline)"]["vs_elbo"] == 1.0 and len(steps["ELBO (baseline)"]["samples_ms"]) == 2
    assert all(r["step_ms"] > 0 for r in steps.values()) and len(steps) == 2
    for r in rows:
        assert r["test_images"] == 500 and r["s_per_epoch"] > 0 and 0 <= r["active_units"] <= 16
        assert r["elbo_nats"] < 0 < r["iwae_nll_nats"] and r["kl_nats"] >= 0


@pytest.mark.slow
def test_kl_memory_and_profile_benchmarks_measure_each_case(tmp_path):
    """kl_memory: every variant in its own process, a ratio to the plain step; profile_step's tokenizer
    workload: the operator groups (the quantizer's among them) and what LPIPS costs."""
    proc = subprocess.run([sys.executable, "benchmarks/kl_memory.py", "--sizes", "32", "--batch", "1", "--json",
                           str(tmp_path / "memory.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads((tmp_path / "memory.json").read_text())["results"]
    assert [r["variant"] for r in rows] == ["plain PyTorch, the diffusers script's way", "fastvae train_step",
                                            "fastvae train_step, gradient checkpointing"]
    assert all(r["step_MB"] > 0 for r in rows) and rows[0]["x_peer"] == 1.0
    # the tokenizer's workload before disc_start (two steps to build, not three: the kl and vq workloads
    # share their code, and the committed JSONs have the discriminator's cost)
    proc = subprocess.run([sys.executable, "benchmarks/profile_step.py", "--workload",
                           "vq_autoencoder 3x64x64, before disc_start", "--steps", "1", "--repeats", "1", "--json",
                           str(tmp_path / "profile.json")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    profile = json.loads((tmp_path / "profile.json").read_text())
    groups = {r["group"] for r in profile["results"]}
    assert "convolutions (fwd + bwd)" in groups and "quantizer: argmin, gather, codebook update" in groups
    assert [r["part"] for r in profile["network_costs"]] == ["whole step", "LPIPS"]


def test_tokenizers_benchmark_trains_and_evaluates_each_config(tmp_path):
    """The command behind docs/tokenizers.md's table, at a toy size: each row's usage, perplexity, PSNR."""
    pytest.importorskip("diffusers")
    out = tmp_path / "tokenizers.json"
    proc = subprocess.run([sys.executable, "benchmarks/tokenizers.py", "--epochs", "1", "--limit", "32",
                           "--eval-images", "20", "--configs", "vq_fashion_mnist", "--data", "mnist",
                           "--out", str(tmp_path / "runs"), "--json", str(out), "--figure", str(tmp_path / "t.png")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["config"], r["codes"], r["images"]) for r in rows] == [("vq_fashion_mnist", 1024, 20)]
    assert all(0 < r["usage"] <= 1 and r["perplexity"] >= 1 and r["psnr_db"] > 0 for r in rows)
    # the figure's code counts: the evaluated test images' tokens (7 x 7 each), the usage evaluate reported
    counts = rows[0]["code_counts"]
    assert sum(counts) == 20 * 49 and sum(c > 0 for c in counts) / 1024 == pytest.approx(rows[0]["usage"])
    assert (tmp_path / "t.png").stat().st_size > 10_000
    assert "usage" in proc.stdout and "PSNR dB" in proc.stdout and "of 32 embedded MNIST images" in proc.stdout
