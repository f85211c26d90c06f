"""accelerate launch and its config files (multi-process parity: tests/test_scale_out.py)."""

import json
import subprocess

import pytest
import torch

from fastvae.launch.processes import accelerate_binary
from helpers import ROOT, TINY


ACCELERATE = accelerate_binary()


@pytest.mark.slow
@pytest.mark.parametrize("setting, source", [("null", "from accelerate launch"), ("auto", "auto: accelerate launch says bf16")])
def test_accelerate_launch_single_process_takes_the_launchers_precision(tmp_path, setting, source):
    cmd = [ACCELERATE, "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "bf16", "-m", "fastvae.train",
           "--config", "mnist", *TINY, "train.max_steps=3", f"train.mixed_precision={setting}",
           f"out_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 process(es) on cpu" in proc.stdout and f"mixed_precision=bf16 ({source}" in proc.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["step"] == 3


def test_accelerate_config_files_describe_their_layouts():
    from accelerate.commands.config.config_args import load_config_from_file

    layouts = {name: load_config_from_file(str(ROOT / "launch" / "accelerate" / f"{name}.yaml"))
               for name in ("1gpu", "8gpu", "multinode", "cpu_2proc")}
    got = {k: (c.distributed_type.value, c.num_processes, c.num_machines) for k, c in layouts.items()}
    assert got == {"1gpu": ("NO", 1, 1), "8gpu": ("MULTI_GPU", 8, 1), "multinode": ("MULTI_GPU", 16, 2),
                   "cpu_2proc": ("MULTI_GPU", 2, 1)}


def buffers_checked(rank, world):
    """ranks_agree on 2 ranks: equal weights and codebooks; a codebook buffer that differs; BatchNorm
    statistics that differ (each rank's share: not checked)."""
    from fastvae.distributed import ranks_agree
    from fastvae.quantizers import VectorQuantizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(4), VectorQuantizer(4, 8, ema_decay=0.9))
    model[0].running_mean += rank  # unsynchronized statistics
    agree = ranks_agree(model)
    model[1].embed_sum[3, 1] += rank  # one rank's EMA sum moved
    try:
        ranks_agree(model)
        differ_found = False
    except RuntimeError:
        differ_found = True
    return agree, differ_found


def test_ranks_agree_checks_buffers_but_not_batchnorm_statistics(tmp_path):
    from ranks import on_ranks

    assert on_ranks(buffers_checked, 2, tmp_path) == [(True, True), (True, True)]
