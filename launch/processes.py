"""Several training processes on one machine (or several) with `accelerate launch`: the command
line that tools/loss_compare.py, benchmarks/scaling.py and the tests start, written once."""

from __future__ import annotations

import shutil
import socket
import sys
from pathlib import Path


def free_port() -> int:
    """A TCP port that nothing on this machine listens on now: a rendezvous port per run, so runs
    started side by side (parallel tests, two users) never meet on a fixed one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_binary() -> str:
    """The `accelerate` command of this Python's environment (a venv's, even when it is not
    activated), else the one on PATH."""
    beside = Path(sys.executable).with_name("accelerate")
    return str(beside) if beside.is_file() else (shutil.which("accelerate") or "accelerate")


def accelerate_launch(module_args: list[str], processes: int, machines: int = 1, machine_rank: int = 0,
                      port: int | None = None, address: str = "127.0.0.1", mixed_precision: str = "no") -> list[str]:
    """argv of `accelerate launch` running `python -m ...` (module_args start with "-m") as `processes`
    processes over `machines` machines, this one being `machine_rank`. --multi_gpu also on a CPU:
    fastvae puts launched processes on the CPU (gloo) when there is no GPU (docs/notes.md). port: the
    rendezvous port; None = a free one (all machines of one run must be given the same). Every value
    accelerate would otherwise default with a four-line warning per launch is passed."""
    multi = ["--multi_gpu"] if processes > 1 else []
    rendezvous = ["--machine_rank", str(machine_rank), "--main_process_ip", address, "--rdzv_backend", "static",
                  "--same_network"] if machines > 1 else []
    return [accelerate_binary(), "launch", *multi, "--num_processes", str(processes), "--num_machines", str(machines),
            *rendezvous, "--main_process_port", str(port or free_port()), "--mixed_precision", mixed_precision,
            "--dynamo_backend", "no", *module_args]
