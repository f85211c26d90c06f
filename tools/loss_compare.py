"""Does N processes train the model one process trains? Loss-trace parity, after torchtitan's loss_compare.

    python tools/loss_compare.py --config mnist [--nproc 2] [--machines 1] [--steps 20]
                                 [--out runs/loss_compare] [--rtol 1e-4] [--assert-equal] [--json PATH]
                                 [key=value ...]

Trains the same config twice: 1 process x global batch B (B = data.batch_size after the overrides)
and --nproc processes x B/nproc, as --machines accelerate launchers on this host (--machines 2: a
real two-node rendezvous over localhost). fastvae shards every loader so both runs see the same
global batches (fastvae.data.sharding) and keys each sample's noise (fastvae.noise); with
BatchNorm, train.sync_batchnorm=true makes the statistics global. It prints the loss of every step
of both runs and the largest relative difference of the final parameters; --assert-equal exits 1
when a loss differs by more than --rtol or a parameter by more than --param-rtol (float reduction
order is all that may differ).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastvae.launch.processes import accelerate_launch, free_port
from fastvae.tracking import STEPS_FILE, read_records



def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="a shipped config's name or a YAML path")
    p.add_argument("--nproc", type=int, default=2, help="processes of the sharded run (all machines together)")
    p.add_argument("--machines", type=int, default=1, help="accelerate launchers (nodes) the processes are split over")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of each run")
    p.add_argument("--out", default="runs/loss_compare", help="folder of both runs (emptied first)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest relative loss difference that counts as equal")
    p.add_argument("--param-rtol", type=float, default=1e-3,
                   help="largest ||a - b|| / ||b|| of the final parameters (all tensors) that counts as equal")
    p.add_argument("--assert-equal", action="store_true", help="exit 1 when the runs differ by more than --rtol")
    p.add_argument("--port", type=int, default=0, help="rendezvous port of the sharded run; 0 = a free one")
    p.add_argument("--timeout", type=float, default=600, help="seconds each run may take")
    p.add_argument("--json", help="write the comparison here")
    p.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = p.parse_intermixed_args(argv)  # key=value overrides before and after options
    if args.nproc < 2 or args.machines < 1 or args.nproc % args.machines:
        p.error(f"--nproc {args.nproc} over --machines {args.machines}: expected nproc >= 2, a multiple of machines")
    return args


def launch(cmds: list[list[str]], timeout: float, what: str) -> None:
    """Start every command (one per machine), wait for all, and fail with the output of a failed one."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # run where loss_compare was started: a user's model module (model.name=module:Class) imports from there
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise SystemExit(f"loss_compare: the {what} run took longer than {timeout:.0f} s")
    for proc, out in zip(procs, outputs):
        if proc.returncode:
            raise SystemExit(f"loss_compare: the {what} run failed (exit {proc.returncode}):\n{out[-4000:]}")


def train_args(args, batch: int, out_dir: Path) -> list[str]:
    return ["-m", "fastvae.train", "--config", args.config, *args.overrides, f"data.batch_size={batch}",
            f"train.max_steps={args.steps}", "train.log_every=1", "train.checkpoint_every=0", "train.resume=",
            f"out_dir={out_dir}"]


def sharded_commands(args, batch: int, out_dir: Path) -> list[list[str]]:
    port = args.port or free_port()  # one port for all the run's launchers
    return [accelerate_launch(train_args(args, batch, out_dir), args.nproc, args.machines, rank, port)
            for rank in range(args.machines)]


def step_losses(out_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_records(out_dir, STEPS_FILE)}


def final_parameters(out_dir: Path) -> dict[str, torch.Tensor]:
    from fastvae.checkpoint import list_checkpoints

    return load_file(str(list_checkpoints(out_dir)[-1] / "model.safetensors"))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, not elementwise: Adam moves a weight whose gradient is ~0 (a conv bias
    before BatchNorm: 0 by construction) by about +-lr whatever that gradient's sign, so rounding
    decides those few weights; their share of the whole model's norm stays small."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare(single: Path, sharded: Path) -> dict:
    one, many = step_losses(single), step_losses(sharded)
    steps = sorted(set(one) & set(many))
    rows = [{"step": s, "single": one[s], "sharded": many[s], "rel_diff": abs(many[s] - one[s]) / abs(one[s])}
            for s in steps]
    p1, pn = final_parameters(single), final_parameters(sharded)
    names = [k for k in p1 if p1[k].is_floating_point()]  # weights and BatchNorm running statistics
    per_tensor = {k: relative_difference(pn[k], p1[k]) for k in names}
    whole = relative_difference(torch.cat([pn[k].flatten() for k in names]), torch.cat([p1[k].flatten() for k in names]))
    return {"steps": rows, "missing_steps": sorted(set(one) ^ set(many)),
            "max_loss_rel_diff": max((r["rel_diff"] for r in rows), default=float("nan")),
            "param_rel_diff": whole, "worst_tensor": max(per_tensor, key=per_tensor.get),
            "worst_tensor_rel_diff": max(per_tensor.values()),
            "test_loss": [test_loss(single), test_loss(sharded)]}


def test_loss(out_dir: Path) -> float | None:
    """The last epoch record's test loss (evaluated by all ranks of the run, each a share)."""
    records = read_records(out_dir)
    return records[-1].get("test_loss") if records else None


def print_table(result: dict, label_single: str, label_sharded: str) -> None:
    print(f"{'step':>5}  {label_single:>14}  {label_sharded:>14}  {'rel diff':>9}")
    for r in result["steps"]:
        print(f"{r['step']:>5}  {r['single']:>14.6f}  {r['sharded']:>14.6f}  {r['rel_diff']:>9.2e}")
    print(f"max loss rel diff {result['max_loss_rel_diff']:.2e}; final parameters ||a-b||/||b|| "
          f"{result['param_rel_diff']:.2e} (worst tensor {result['worst_tensor']}: "
          f"{result['worst_tensor_rel_diff']:.2e}); test loss {result['test_loss'][0]} vs {result['test_loss'][1]}")


def main(argv=None) -> dict:
    from fastvae.config import load_config

    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    batch = cfg.data.batch_size
    if batch % args.nproc:
        raise SystemExit(f"loss_compare: data.batch_size={batch} (the global batch): expected a multiple of "
                         f"--nproc {args.nproc}")
    if cfg.model.dropout:
        print(f"loss_compare: model.dropout={cfg.model.dropout}: dropout masks come from each process's own "
              f"generator, so the runs will differ; model.dropout=0 compares exactly", flush=True)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    single, sharded = out / f"1x{batch}", out / f"{args.nproc}x{batch // args.nproc}"
    label_single, label_sharded = f"1 x {batch}", f"{args.nproc} x {batch // args.nproc}"
    if args.machines > 1:
        label_sharded += f" ({args.machines} nodes)"
    print(f"loss_compare: {label_single} -> {single}", flush=True)
    launch([[sys.executable, *train_args(args, batch, single)]], args.timeout, label_single)
    print(f"loss_compare: {label_sharded} -> {sharded}", flush=True)
    launch(sharded_commands(args, batch // args.nproc, sharded), args.timeout, label_sharded)
    result = compare(single, sharded)
    result.update({"config": args.config, "overrides": args.overrides, "global_batch": batch, "nproc": args.nproc,
                   "machines": args.machines, "rtol": args.rtol, "param_rtol": args.param_rtol})
    print_table(result, label_single, label_sharded)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    equal = (not result["missing_steps"] and result["max_loss_rel_diff"] <= args.rtol
             and result["param_rel_diff"] <= args.param_rtol)
    result["equal"] = equal
    if args.assert_equal and not equal:
        raise SystemExit(f"loss_compare: the runs differ by more than --rtol {args.rtol:.0e} (losses) or "
                         f"--param-rtol {args.param_rtol:.0e} (parameters)")
    return result


if __name__ == "__main__":
    main()
