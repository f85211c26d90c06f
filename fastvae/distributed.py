"""Every collective fastvae runs, in one room: what N processes must compute over the global batch
(so that they train what one process does), what they compare, gather and sum, and the process
group's own helpers. One process: each is the plain local computation, with no process group needed.
"""

from __future__ import annotations

import os
import sys

import torch


def several_processes() -> bool:
    """Whether this process is one of several in an initialized process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# ---------------------------------------------------------------- over the global batch, with gradients


def global_batch(values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] of every process concatenated in rank order [N * B, ...], differentiably: an
    all-gather whose backward is a reduce-scatter (each rank gets the sum of every rank's gradient
    of its rows). torch's functional collective, which torch.compile traces into the graph (the
    torch.distributed.nn.functional ones are deprecated and break it). Every rank must hold B
    rows (data.drop_last=true). One process: the values themselves."""
    if not several_processes():
        return values
    import torch.distributed as dist
    from torch.distributed._functional_collectives import all_gather_single_autograd

    return all_gather_single_autograd(values.contiguous(), 0, dist.group.WORLD)


def global_batch_mean(values: torch.Tensor) -> torch.Tensor:
    """values [B, ...] averaged over the global batch of all processes, differentiably: the ranks'
    (sum, count) gathered (global_batch) and summed, whose backward sums the gradients over ranks,
    so that DDP's average of the ranks' gradients is the gradient one process with the whole batch
    gets (as GlooSyncBatchNorm does). One process: the plain mean."""
    if not several_processes():
        return values.mean(0)
    local = torch.cat([values.sum(0).flatten(), values.new_full((1,), values.shape[0])])
    total = global_batch(local.unsqueeze(0)).sum(0)
    return (total[:-1] / total[-1]).view(values.shape[1:])


# ---------------------------------------------------------------- without gradients


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """t summed over all processes (no gradient), a new tensor: global counts and sums (evaluation's,
    a quantizer's). One process: t itself."""
    if not several_processes():
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """t averaged over all processes (no gradient): the global batch's gradient from each rank's."""
    if not several_processes():
        return t
    import torch.distributed as dist

    return sum_over_processes(t) / dist.get_world_size()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every process's rows [N_rank, D], joined in rank order on each process (shares may differ in size)."""
    from accelerate import PartialState
    from accelerate.utils import gather, pad_across_processes

    device = PartialState().device
    counts = gather(torch.tensor([len(t)], device=device)).tolist()
    padded = pad_across_processes(t.to(device), dim=0)
    rows = gather(padded).cpu()
    m = padded.shape[0]
    return torch.cat([rows[i * m:i * m + c] for i, c in enumerate(counts)])


def ranks_agree(module: torch.nn.Module) -> bool:
    """Every rank holds the same parameters (what DDP promises) and buffers (a tokenizer's codebook, its
    EMA sums and usage window), by one all-reduce of a checksum (sum and sum of squares): max == min over
    ranks. BatchNorm's running statistics are left out: without synchronized BatchNorm each rank's are
    its own share's."""
    import torch.distributed as dist

    from torch.nn.modules.batchnorm import _BatchNorm

    params = [p.detach().double() for p in module.parameters()]
    params += [b.detach().double() for m in module.modules() if not isinstance(m, _BatchNorm)
               for b in m.buffers(recurse=False)]
    local = torch.stack([sum(p.sum() for p in params), sum(p.square().sum() for p in params)])
    both = torch.cat([local, -local])  # MAX of -x is -MIN of x: one all-reduce gives both
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    if not torch.equal(both[:2], -both[2:]):
        raise RuntimeError("parameters or buffers differ across ranks after training")
    return True


# ---------------------------------------------------------------- the process group


def watch_group(num_processes: int):
    """With several processes: a gloo group of all ranks kept aside, on which a survivor can ask who
    stopped answering after a collective of the training group failed (any backend)."""
    if num_processes == 1:
        return None
    import torch.distributed as dist

    return dist.new_group(backend="gloo")


def leave_launched_process(code: int = 0) -> None:
    """End a process that `accelerate launch` (or torchrun) started, after its work is done and written.
    Gloo can abort at interpreter exit after correct work (SIGABRT, "terminate called without an
    active exception": 2-3 of 10 training runs, and once in evaluate's 2-process test): the process
    group is torn down here and the process leaves without running finalizers."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def processes_the_launcher_asked_for() -> int | None:
    """--num_processes of the `accelerate launch` (or torchrun --nproc_per_node) that started this
    process, read from the parent's command line (Linux); None when not launched so or unreadable."""
    try:
        argv = open(f"/proc/{os.getppid()}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith(("accelerate", "torchrun")) for a in argv[:4]):
        return None
    for flag in ("--num_processes", "--num-processes", "--nproc_per_node", "--nproc-per-node"):
        for i, arg in enumerate(argv):
            value = arg.split("=", 1)[1] if arg.startswith(flag + "=") else argv[i + 1] if arg == flag and \
                i + 1 < len(argv) else None
            if value is not None and value.isdigit():
                return int(value)
    return None


def check_launched_processes(num_processes: int) -> None:
    """A launcher that was asked for N processes and started one (accelerate launch --num_processes 2 on a
    CPU without --multi_gpu does, silently) is one line, not a run on one process."""
    from fastvae.errors import UserError

    asked = processes_the_launcher_asked_for()
    if asked is not None and asked > 1 and num_processes == 1:
        raise UserError(f"the launcher was asked for --num_processes {asked} and started 1 process (accelerate does "
                        f"that without --multi_gpu, or with --cpu); expected `accelerate launch --multi_gpu "
                        f"--num_processes {asked} --num_machines 1 ...` or --config_file "
                        f"launch/accelerate/cpu_2proc.yaml (docs/scale_out.md)")
