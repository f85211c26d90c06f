"""Submit training runs to SLURM with submitit.

    python -m fastvae.launch.slurm --config configs/mnist.yaml [--nodes N] [--gpus-per-node G]
        [--tasks-per-node T] [--cpus-per-task C] [--mem-gb M] [--partition P] [--time MIN]
        [--account A] [--qos Q] [--sweep key=v1,v2 ...] [--max-parallel K]
        [--dry-run] [--wait [--wait-timeout S]] [key=value ...]

One SLURM task per training process (see fastvae.launch.job for why and for how
preemption works). Every run is submitted with train.resume=auto, so a requeued job
continues from its newest checkpoint. Logs go to OUT_DIR/slurm/ (the sweep's base
out_dir for arrays).
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from fastvae.config import BUILT_IN_MODELS, CONTROL_CHARACTERS, Config, load_config, to_dict
from fastvae.errors import UserError, exit_on_user_error
from fastvae.launch import sweep

SUBMITIT_HINT = "pip install 'fastvae[slurm]' (or pip install submitit==1.5.4)"

# sacct states after which a job never runs again (REQUEUED / PENDING / RUNNING / ... mean: keep waiting)
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")


@dataclass
class Submission:
    tag: str  # "" for a single run, the sweep combination otherwise
    cfg: Config


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2, like every other fastvae error
        raise UserError(f"{message}; expected the options in `python -m fastvae.launch.slurm --help`")


def parse_args(argv):
    p = _Parser(prog="python -m fastvae.launch.slurm", description="Submit fastvae training to SLURM (submitit).",
                allow_abbrev=False)  # a misspelt SLURM option is an error, never a guess
    p.add_argument("--config", help="YAML config, e.g. configs/mnist.yaml")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; one task (process) per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="training processes per node (default: --gpus-per-node, or 1 on CPU nodes)")
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--mem-gb", type=int, default=0, help="memory per node in GB (0 = the cluster's default)")
    p.add_argument("--partition", default="", help="SLURM partition (default: the cluster's default)")
    p.add_argument("--time", type=time_limit_minutes, default=60, metavar="MIN|[D-]HH:MM:SS",
                   help="time limit: minutes, or HH:MM:SS / D-HH:MM:SS as sbatch writes it (default 60)")
    p.add_argument("--account", default="")
    p.add_argument("--qos", default="")
    p.add_argument("--job-name", default="", help="default: fastvae-<out_dir name>")
    p.add_argument("--signal-delay", type=int, default=90, metavar="S",
                   help="SIGUSR2 this many seconds before the time limit: checkpoint and requeue (default 90)")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="train one run per value (repeat for a grid) as a job array")
    p.add_argument("--max-parallel", type=int, default=0, metavar="K", help="array runs at once (0 = no limit)")
    p.add_argument("--max-requeues", type=int, default=3, metavar="N",
                   help="times a job may checkpoint and requeue itself at its time limit (default 3)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE", type=sbatch_option,
                   help="any other sbatch option, e.g. --sbatch constraint=a100 --sbatch exclude=node7 "
                        "(repeatable; KEY as in `sbatch --KEY=VALUE`)")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and resolved configs; submit nothing")
    p.add_argument("--wait", action="store_true", help="block, stream the log, and report how the job(s) ended")
    p.add_argument("--wait-timeout", type=float, default=0, metavar="S", help="with --wait: give up after S seconds")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for fastvae.train")
    return p.parse_intermixed_args(argv)  # key=value overrides before and after options


def time_limit_minutes(text: str) -> int:
    """'90' -> 90; '01:30:00' -> 90; '1-00:00:00' -> 1440; seconds round up to a whole minute."""
    days, _, clock = text.rpartition("-") if ":" in text else ("", "", text)
    try:
        parts = [int(p) for p in clock.split(":")]
        if not 1 <= len(parts) <= 3 or min(parts) < 0 or (days and len(parts) != 3):
            raise ValueError
        if len(parts) == 1:
            return parts[0] + 1440 * int(days or 0)
        hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) == 3 else (0, *parts)
        return 1440 * int(days or 0) + 60 * hours + minutes + (seconds > 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid time {text!r}; expected minutes or [D-]HH:MM:SS") from None


SBATCH_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")  # sbatch's long option names


def sbatch_option(text: str) -> tuple[str, str]:
    """KEY=VALUE for `#SBATCH --KEY=VALUE`: a key of letters, digits, - and _ only, a value without
    control characters (a newline would start a line of shell in the script; submitit quotes the rest)."""
    key, sep, value = text.partition("=")
    key = key.strip().lstrip("-")
    if not SBATCH_KEY.match(key) or not sep:
        raise argparse.ArgumentTypeError(f"invalid sbatch option {text!r}; expected KEY=VALUE with KEY of letters, "
                                         f"digits, - and _, e.g. constraint=a100")
    if CONTROL_CHARACTERS.search(value):
        raise argparse.ArgumentTypeError(f"invalid sbatch option {text!r}; expected a value without control "
                                         f"characters (newline, tab, ...)")
    return key, value


def check_options(args) -> None:
    """Everything SLURM would reject that we can see before submitting."""
    for name in ("nodes", "cpus_per_task", "time"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a whole number >= 1")
    for name in ("gpus_per_node", "mem_gb", "max_parallel", "wait_timeout", "max_requeues"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a number >= 0")
    if args.signal_delay < 1 or args.signal_delay >= args.time * 60:
        raise UserError(f"--signal-delay {args.signal_delay}: expected 1 <= seconds < --time ({args.time * 60} s)")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.gpus_per_node or 1
    if args.tasks_per_node < 1:
        raise UserError(f"--tasks-per-node {args.tasks_per_node}: expected a whole number >= 1")
    if args.gpus_per_node and args.tasks_per_node != args.gpus_per_node:
        raise UserError(f"--tasks-per-node {args.tasks_per_node} with --gpus-per-node {args.gpus_per_node}: "
                        f"expected equal numbers (one training process per GPU)")
    if args.wait_timeout and not args.wait:
        raise UserError("--wait-timeout without --wait; expected both or neither")
    for name in ("job_name", "partition", "account", "qos"):  # they reach the sbatch script
        if CONTROL_CHARACTERS.search(getattr(args, name)):
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)!r}: expected no control characters")


def check_cluster(args) -> None:
    """The cluster exists and knows the partition (account and QoS are checked by sbatch itself)."""
    if not shutil.which("sbatch"):
        raise UserError("sbatch not found; expected a SLURM login node (or --dry-run to only see the script)")
    if args.partition:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=30)
        known = sorted(set(out.stdout.split()))
        if out.returncode == 0 and args.partition not in known:
            raise UserError(f"--partition '{args.partition}' does not exist; expected one of: {', '.join(known)}")


def build_submissions(args) -> list[Submission]:
    """One resolved, validated config per run; bad overrides fail here, before anything is submitted."""
    from fastvae.checkpoint import refuse_another_runs_checkpoints

    base = load_config(args.config, args.overrides)
    combos = sweep.expand(args.sweep)
    runs = []
    for combo, tag in zip(combos, sweep.run_tags(combos)):
        defaults = []
        if tag:  # a sweep: its own out_dir, W&B run name and group per combination, unless swept itself
            base_name = base.wandb.name or Path(base.out_dir).name
            defaults = [f"out_dir={Path(base.out_dir) / tag}", f"wandb.name={base_name}-{tag}",
                        f"wandb.group={base.wandb.group or base_name}"]
        cfg = load_config(args.config, [*args.overrides, *defaults, *combo])  # the swept values come last: they win
        if not cfg.train.resume:
            refuse_another_runs_checkpoints(cfg.out_dir)
            cfg.train.resume = "auto"  # so a requeued job continues from its checkpoint
        if cfg.model.name not in BUILT_IN_MODELS:  # a user's model: fails here, not after the queue
            from fastvae.models import build_model

            build_model(cfg)
        runs.append(Submission(tag, cfg))
    from fastvae.tracking import check_trackers_ready

    check_trackers_ready(cfg)
    return runs


def log_folder(args, runs: list[Submission]) -> Path:
    """OUT_DIR/slurm; for a sweep, in the base out_dir its runs' folders sit in."""
    first = Path(runs[0].cfg.out_dir)
    return (first.parent if runs[0].tag else first).resolve() / "slurm"


def require_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(f"the SLURM launcher needs submitit, which is not installed; expected: {SUBMITIT_HINT}") from None
    return submitit


def import_path_setup(model_names) -> list[str]:
    """The job imports a user's model from where the submission found it: that folder goes first on
    the job's PYTHONPATH (a job may start elsewhere, and sbatch's copy of the environment would not
    hold the working directory the submission imported it from)."""
    folders = []
    for name in model_names:
        if name in BUILT_IN_MODELS:
            continue
        folder = module_root(name.partition(":")[0])
        if folder and folder not in folders:
            folders.append(folder)
    return [f"export PYTHONPATH={shlex.quote(':'.join(folders))}${{PYTHONPATH:+:$PYTHONPATH}}"] if folders else []


def module_root(module_name: str) -> str | None:
    """The sys.path folder a module was imported from (None for one without a file)."""
    top = sys.modules.get(module_name.split(".")[0])
    origin = getattr(top, "__file__", None)
    if origin is None:
        return None
    path = Path(origin).resolve()
    return str(path.parent.parent if path.name == "__init__.py" else path.parent)


def make_executor(args, folder: Path, n_runs: int, model_names=()):
    submitit = require_submitit()

    if args.dry_run:
        # submitit refuses to build a SLURM executor where there is no srun; a dry run only
        # renders the script, so it may run anywhere (e.g. a laptop, before logging in).
        from unittest import mock

        with mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    else:  # cluster= explicit: never a silent local run
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=args.max_requeues)
    params = dict(name=args.job_name, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                  cpus_per_task=args.cpus_per_task, timeout_min=args.time,
                  slurm_signal_delay_s=args.signal_delay,
                  # each process uses the CPUs SLURM gave its task, not every core of the node
                  slurm_setup=["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}", *import_path_setup(model_names)])
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.mem_gb:
        params["mem_gb"] = args.mem_gb
    for key in ("partition", "account", "qos"):
        if getattr(args, key):
            params[f"slurm_{key}"] = getattr(args, key)
    if n_runs > 1:
        params["slurm_array_parallelism"] = args.max_parallel or n_runs
    if args.sbatch:  # written into the script as `#SBATCH --KEY=VALUE`
        params["slurm_additional_parameters"] = {key.replace("-", "_"): value for key, value in args.sbatch}
    executor.update_parameters(**params)
    return executor


def sbatch_script(executor, n_runs: int) -> str:
    """The script sbatch would get. submitit has no dry-run: this calls the function its
    own submission uses (a private name, pinned by submitit==1.5.4 and covered by a test)."""
    from submitit.slurm.slurm import _make_sbatch_string

    slurm = executor._executor
    params = dict(slurm.parameters)
    if n_runs > 1:
        params["map_count"] = n_runs
    return _make_sbatch_string(command=slurm._submitit_command_str, folder=slurm.folder, **params)


def submit(executor, runs: list[Submission]) -> list:
    submitit = require_submitit()
    from fastvae.launch.job import TrainJob

    try:
        if len(runs) == 1:
            return [executor.submit(TrainJob(runs[0].cfg))]
        with executor.batch():
            jobs = [executor.submit(TrainJob(r.cfg)) for r in runs]
        return jobs
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as err:
        lines = [line for line in str(err).splitlines() if "error" in line.lower()] or str(err).splitlines()
        raise UserError(f"sbatch refused the job: {lines[-1].strip()}") from None


def print_submitted(jobs, runs: list[Submission], args) -> None:
    first = jobs[0]
    array_id = first.job_id.split("_")[0]
    what = f"job array {array_id} ({len(jobs)} runs)" if len(jobs) > 1 else f"job {first.job_id}"
    layout = f"{args.nodes} node(s) x {args.tasks_per_node} task(s)"
    print(f"fastvae.launch.slurm: submitted {what}, {layout}, time limit {args.time} min")
    for job, run in zip(jobs, runs):
        print(f"  {job.job_id}: {run.tag + ' ' if run.tag else ''}-> {run.cfg.out_dir}")
        print(f"      log {job.paths.stdout}  errors {job.paths.stderr}")
    print(f"follow: tail -f {shlex.quote(str(first.paths.stdout))}; squeue -j {array_id}; "
          f"sacct -j {array_id}; cancel: scancel {array_id}")


class LogStream:
    """Prints what a job's log file gained since the last call (task 0's stdout)."""

    def __init__(self, job, prefix: str) -> None:
        self.path, self.prefix, self.offset = Path(job.paths.stdout), prefix, 0

    def pump(self) -> None:
        if not self.path.is_file():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        cut = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
        self.offset += cut
        for line in data[:cut].decode(errors="replace").splitlines():
            print(f"{self.prefix}{line.split(chr(13))[-1]}", flush=True)  # a progress bar: its last state


def wait_for(jobs, timeout_s: float = 0, poll_s: float = 2.0, stream: bool = True) -> dict[str, str]:
    """Poll sacct until every job reached a final state (a cancelled job counts); stream logs.
    Returns {job_id: final state}; raises TimeoutError after timeout_s (0 = no limit)."""
    deadline = time.monotonic() + timeout_s if timeout_s else None
    streams = {j.job_id: LogStream(j, f"[{j.job_id}] " if len(jobs) > 1 else "") for j in jobs}
    final: dict[str, str] = {}
    while True:
        for job in jobs:
            if job.job_id in final:
                continue
            if stream:
                streams[job.job_id].pump()
            state = job.state  # one sacct call
            state = state.split()[0] if state else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            if state in FINAL_STATES:
                if stream:
                    streams[job.job_id].pump()
                final[job.job_id] = state
        if len(final) == len(jobs):
            return final
        if deadline is not None and time.monotonic() > deadline:
            waiting = ", ".join(f"{j.job_id} {j.state}" for j in jobs if j.job_id not in final)
            raise TimeoutError(f"still waiting after {timeout_s:.0f}s: {waiting}")
        time.sleep(poll_s)


def report(jobs, final: dict[str, str]) -> int:
    """One line per job; 0 when all completed and returned a result."""
    code = 0
    for job in jobs:
        state = final[job.job_id]
        if state == "COMPLETED":
            try:
                results = job.results()  # one per task; rank 0's speaks for the run
                result = results[0]
                agree = f", {len(results)} ranks agree" if result.get("ranks_agree") else ""
                print(f"fastvae.launch.slurm: job {job.job_id} completed: step {result['step']}{agree}, "
                      f"out_dir {result['out_dir']}")
                continue
            except Exception as err:  # the training raised inside the job: its last line says why
                state = f"FAILED ({str(err).strip().splitlines()[-1]})"
        print(f"fastvae.launch.slurm: job {job.job_id} ended {state}; see {job.paths.stderr}", file=sys.stderr)
        code = 1
    return code


@exit_on_user_error
def main(argv=None) -> int:
    args = parse_args(argv)
    require_submitit()
    check_options(args)
    runs = build_submissions(args)
    folder = log_folder(args, runs)
    if not args.job_name:
        args.job_name = f"fastvae-{folder.parent.name}"
    if not args.dry_run:
        check_cluster(args)
    executor = make_executor(args, folder, len(runs), {r.cfg.model.name for r in runs})
    if args.dry_run:
        print("# sbatch script (submitit writes it, then `sbatch` it):")
        print(sbatch_script(executor, len(runs)))
        for run in runs:
            print(f"# resolved config{' for ' + run.tag if run.tag else ''}:")
            print(yaml.safe_dump(to_dict(run.cfg), sort_keys=False).rstrip())
        return 0
    jobs = submit(executor, runs)
    print_submitted(jobs, runs, args)
    if not args.wait:
        return 0
    try:
        final = wait_for(jobs, args.wait_timeout)
    except TimeoutError as err:
        print(f"fastvae.launch.slurm: {err}; the job keeps running (scancel to stop it)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fastvae.launch.slurm: stopped waiting; the job keeps running", file=sys.stderr)
        return 130
    return report(jobs, final)


if __name__ == "__main__":
    sys.exit(main())
