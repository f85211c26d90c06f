"""Two real processes on CPU (gloo DDP) through `accelerate launch` (slow; bounded by a timeout)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CONFIGS, ROOT, TINY
from record_sample_ids import read_sample_ids

RECORDING_TRAIN = str(ROOT / "tests" / "support" / "record_sample_ids.py")  # fastvae.train + sample ids

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


@pytest.mark.slow
def test_two_process_cpu_run_shards_data_and_ranks_agree(tmp_path):
    out = tmp_path / "ddp"
    # The shipped config file (accelerate's --cpu would start one process; --multi_gpu spawns two,
    # and fastvae.train puts them on the CPU with gloo because this machine has no GPU).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [ACCELERATE, "launch", "--config_file", "launch/accelerate/cpu_2proc.yaml",
           "--main_process_port", "29517", RECORDING_TRAIN, "--config", str(CONFIGS / "mnist.yaml"),
           *TINY, "data.batch_size=16", "train.epochs=2", f"out_dir={out}"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ranks_agree"] is True
    assert summary["step"] == 16  # 256 images / (16 per rank x 2 ranks) = 8 steps per epoch
    ids = [read_sample_ids(out, r) for r in (0, 1)]
    per_epoch = [[ids[r][e * 128:(e + 1) * 128] for r in (0, 1)] for e in (0, 1)]
    for rank0, rank1 in per_epoch:
        assert len(rank0) == len(rank1) == 128
        assert not set(rank0) & set(rank1)  # disjoint shards
        assert set(rank0) | set(rank1) == set(range(256))  # that cover the data
    assert per_epoch[0][0] != per_epoch[1][0]  # reshuffled each epoch
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]  # written once, by rank 0


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
