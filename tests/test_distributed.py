"""accelerate launch and its config files (multi-process parity: tests/test_scale_out.py)."""

import json
import subprocess

import pytest

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
