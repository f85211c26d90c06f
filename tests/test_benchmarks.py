"""The kernel benchmark runs end to end and reports parity honestly (no speed thresholds here)."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_kernel_benchmark_quick_writes_json_with_parity(tmp_path):
    out = tmp_path / "kernels.json"
    proc = subprocess.run([sys.executable, "benchmarks/kernels.py", "--quick", "--repeats", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Triton timings need a GPU" in proc.stdout
    report = json.loads(out.read_text())
    assert report["triton_timed"] is False and report["copy_bandwidth_GB_per_s"] > 0
    rows = report["results"]
    assert {r["op"] for r in rows} == {"reparam_kl", "recon_bce", "recon_mse"}
    assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
    for r in rows:
        if r["impl"] == "triton rng":
            continue
        assert r["max_rel_error_vs_fp64"] <= 1e-5, r
        if r["impl"].startswith("triton"):
            assert r["time_us"] is None  # the interpreter is not a timing
        else:
            assert r["time_us"] > 0 and r["GB_per_s"] > 0
