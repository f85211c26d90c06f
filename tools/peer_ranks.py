"""Does a quantizer keep 2 processes = 1? vector-quantize-pytorch's VectorQuantize (sync_codebook, k-means
init, code expiry) and fastvae's VectorQuantizer (EMA, restart), each trained on the same global batches:
once in one process, once on 2 gloo processes holding half of each batch. Float64, CPU, no model: the
quantizer's own state is compared after every step (the largest difference of the codebook from the one
process's, and between the two ranks). vector-quantize-pytorch computes in float32 whatever the input, so
differences up to FLOAT32_NOISE are its summation order, not a different codebook.

    python tools/peer_ranks.py [--steps 6] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

FLOAT32_NOISE = 1e-5
D, K, VECTORS = 8, 32, 64  # each step's global batch: VECTORS vectors of D channels
CASES = {
    "vector-quantize-pytorch: EMA": {},
    "vector-quantize-pytorch: EMA + kmeans_init": {"kmeans_init": True},
    "vector-quantize-pytorch: EMA + code expiry": {"threshold_ema_dead_code": 2},
    "fastvae: EMA": {"ema_decay": 0.8},
    "fastvae: EMA + restart": {"ema_decay": 0.8, "restart_after": 1},
}


def build(case: str):
    torch.manual_seed(0)  # the same initial codebook on every rank and in the one process
    kwargs = CASES[case]
    if case.startswith("fastvae"):
        from fastvae.quantizers import VectorQuantizer

        return VectorQuantizer(D, K, **kwargs).double()
    from vector_quantize_pytorch import VectorQuantize

    # sync_codebook defaults to "is torch.distributed initialized": true on the ranks, false alone
    return VectorQuantize(dim=D, codebook_size=K, decay=0.8, rotation_trick=False, **kwargs).double()


def codebook(quantizer) -> torch.Tensor:
    return (quantizer.codebook if hasattr(quantizer, "codebook") else quantizer._codebook.embed[0]).detach().clone()


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(VECTORS, D, generator=g, dtype=torch.float64)
    x[: VECTORS // 2] += 3.0  # two clusters: the first rank's half sees one, the second the other
    return x


def run(case: str, steps: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    quantizer = build(case).train()
    books = []
    for step in range(steps):
        x = batch(step).chunk(world)[rank]
        if case.startswith("fastvae"):
            quantizer(x[:, :, None, None])  # [B, C, 1, 1]: one vector per image
        else:
            quantizer(x[None])  # [1, N, D]
        books.append(codebook(quantizer))
    return books


def rank_main(rank: int, world: int, init: str, steps: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = {case: run(case, steps, rank, world) for case in CASES}
    torch.save(results, f"{out}.{rank}")
    dist.destroy_process_group()


def measure(steps: int) -> list[dict]:
    one = {case: run(case, steps) for case in CASES}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "books")
        mp.spawn(rank_main, args=(2, f"file://{tmp}/rendezvous", steps, out), nprocs=2, join=True)
        ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    rows = []
    for case in CASES:
        versus_one = [max((r[case][s] - one[case][s]).abs().max().item() for r in ranks) for s in range(steps)]
        between = [(ranks[0][case][s] - ranks[1][case][s]).abs().max().item() for s in range(steps)]
        rows.append({"quantizer": case, "max_diff_vs_one_process": max(versus_one),
                     "max_diff_between_ranks": max(between),
                     "first_step_differing": next((s + 1 for s, d in enumerate(versus_one) if d > FLOAT32_NOISE), None)})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = measure(args.steps)
    print(f"{'quantizer':<46} {'2 ranks vs 1 process':>21} {'rank 0 vs rank 1':>17} {'first step off':>15}")
    for r in rows:
        print(f"{r['quantizer']:<46} {r['max_diff_vs_one_process']:>21.3g} {r['max_diff_between_ranks']:>17.3g} "
              f"{str(r['first_step_differing'] or '-'):>15}")
    if args.json:
        from importlib.metadata import version

        Path(args.json).write_text(json.dumps({"vector_quantize_pytorch": version("vector-quantize-pytorch"),
                                               "steps": args.steps, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
