"""What a SLURM task runs: one training process of one run, preemption-safe.

Layout: one SLURM task per training process (per GPU; per process on CPU nodes),
with torch.distributed's env:// variables set from SLURM (rank = SLURM_PROCID,
local rank = SLURM_LOCALID, world size = SLURM_NTASKS, main address = the first
host of the node list, port from the job id). Why not one task per node running
`accelerate launch`: submitit's checkpoint/requeue, its signal handling and its
result files are per task, and SLURM's time-limit signal then reaches the
training processes themselves instead of a launcher that would have to forward it.
accelerate picks the backend from that environment: NCCL on GPUs, gloo on
CPU-only nodes (fastvae.train asks for the CPU where there is no GPU).

Preemption / time limit: submitit asks for SIGUSR2 90 s before the limit (and
`job._interrupt()` sends SIGTERM then SIGUSR2). The training loop treats SIGTERM,
SIGINT and SIGUSR2 alike: checkpoint at the next step boundary, stop. If SIGUSR2
was among them, rank 0 then hands over to submitit's own handler, which calls
`checkpoint()` (this same job, resume=auto) and requeues the job; the requeued
job resumes from the newest checkpoint, and W&B continues the run whose id is
stored in it. A SIGTERM alone (scancel, or SLURM requeueing a preempted job)
only checkpoints: SLURM decides whether the job comes back.
"""

from __future__ import annotations

import copy
import signal

import submitit

from fastvae.config import Config

JOB_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def export_distributed_env() -> int:
    """Set env:// variables from SLURM for a multi-task job; returns the world size."""
    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        # every task sees all GPUs of its node; accelerate selects cuda:LOCAL_RANK
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return env.num_tasks


class TrainJob(submitit.helpers.Checkpointable):
    """Pickled at submission with the fully resolved config: a later edit of the YAML does
    not change a queued or requeued run."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """What submitit requeues on SIGUSR2: this run again, from its newest checkpoint."""
        cfg = copy.deepcopy(self.cfg)
        cfg.train.resume = "auto"
        return submitit.helpers.DelayedSubmission(TrainJob(cfg))

    def __call__(self) -> dict:
        from fastvae.train import train

        world_size = export_distributed_env()
        try:
            result = train(self.cfg, stop_signals=JOB_STOP_SIGNALS)
        finally:
            if world_size > 1:
                import torch.distributed as dist

                if dist.is_initialized():  # else gloo may abort at interpreter exit (SIGABRT) after correct work
                    dist.destroy_process_group()
        if "SIGUSR2" in result["signals"]:
            handler = signal.getsignal(signal.SIGUSR2)  # submitit's, put back when training stopped
            if callable(handler):
                handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + requeue + exit; other ranks: no-op
        return result
