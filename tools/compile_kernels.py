"""Compile every fused-kernel variant for real GPU targets, on a machine without a GPU.

    python tools/compile_kernels.py [--arch 80 90] [--json PATH]

Each variant the launchers pick at the real shapes (reparam+KL B=256 D=200 and B=128 D=2; recon
256x1x28x28, 256x3x64x64, 256x3x128x128; fp32/bf16/fp16; eps given, drawn in-kernel, keyed per
row; the nearest-code lookup at LlamaGen's 32768 vectors x 16384 codes x 8 and at 1024 x 256) is compiled by triton.compile for an explicit GPUTarget (no driver, no GPU needed), and the
PTX goes through the ptxas Triton ships (`-v`): registers, spills and shared memory per variant.
A table is printed; exit 1 if any variant fails to compile or spills. Tiles are the launchers'
own (fastvae.kernels.utils.tile_settings) for an A100 (108 SMs, sm_80) and an H100 (132, sm_90).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastvae.kernels import recon_loss, reparam_kl, vector_quantize  # noqa: E402
from fastvae.kernels.utils import per_sample_dtype, tile_settings  # noqa: E402

SMS = {80: 108, 90: 132}  # A100, H100
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TL_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
LATENTS = [(256, 200), (128, 2)]
IMAGES = [(256, 1, 28, 28), (256, 3, 64, 64), (256, 3, 128, 128)]
NOISE = {"eps given": (True, False), "in-kernel": (False, False), "in-kernel keyed": (False, True)}


def pointer(dtype: torch.dtype) -> str:
    return f"*{TL_NAME[dtype]}"


def reparam_variants():
    for (b, d), (precision, dtype), (noise, (has_eps, has_rows)) in (
            (s, p, n) for s in LATENTS for p in DTYPES.items() for n in NOISE.items()):
        x, kl = pointer(dtype), pointer(per_sample_dtype(dtype))
        eps = x if has_eps else x  # a placeholder pointer of mu's type when eps is drawn
        rows = "*i64"  # the row counters, or the seed tensor as a placeholder
        consts = {"HAS_EPS": has_eps, "HAS_ROWS": has_rows, "ACC": tl.float32}
        fwd = {"mu_ptr": x, "logvar_ptr": x, "eps_ptr": eps, "seed_ptr": "*i64", "row_offsets_ptr": rows,
               "z_ptr": x, "kl_ptr": kl, "B": "i32", "D": "i32"}
        bwd = {"dz_ptr": x, "dkl_ptr": kl, "mu_ptr": x, "logvar_ptr": x, "eps_ptr": eps, "seed_ptr": "*i64",
               "row_offsets_ptr": rows, "dmu_ptr": x, "dlogvar_ptr": x, "B": "i32", "D": "i32"}
        for name, kernel, sig in (("reparam fwd", reparam_kl._forward_kernel, fwd),
                                  ("reparam bwd", reparam_kl._backward_kernel, bwd)):
            yield {"kernel": name, "shape": f"{b}x{d}", "dtype": precision, "variant": noise}, kernel, sig, consts, (b, d)


def recon_variants():
    for shape, (precision, dtype), kind in ((s, p, k) for s in IMAGES for p in DTYPES.items() for k in ("bce", "mse")):
        for target in sorted({torch.float32, dtype}, key=str):  # training's fp32 images; or the logits' dtype
            n = shape[1] * shape[2] * shape[3]
            sig = {"logits_ptr": pointer(dtype), "target_ptr": pointer(target), "loss_ptr": pointer(per_sample_dtype(dtype)),
                   "grad_ptr": pointer(recon_loss.gradient_dtype(dtype)), "B": "i32", "N": "i32"}
            consts = {"KIND_BCE": kind == "bce", "ACC": tl.float32}
            yield ({"kernel": f"recon {kind}", "shape": "x".join(map(str, shape)), "dtype": precision,
                    "variant": f"target {TL_NAME[target]}"}, recon_loss._forward_kernel, sig, consts, (shape[0], n))


VQ_SHAPES = [(32768, 16384, 8), (8192, 1024, 256), (4096, 1024, 4)]  # (N vectors, K codes, D): LlamaGen's, VQGAN's


def vq_variants():
    for n, k, d in VQ_SHAPES:
        sig = {"v_ptr": "*fp32", "codes_ptr": "*fp32", "code_norms_ptr": "*fp32", "index_ptr": "*i64", "q_ptr": "*fp32",
               "distance_ptr": "*fp32", "N": "i32", "K": "i32", "D": "i32"}
        yield ({"kernel": "vq lookup", "shape": f"{n}x{k}x{d}", "dtype": "fp32", "variant": "codes x vectors"},
               vector_quantize._nearest_code_kernel, sig, {"ACC": tl.float32},
               lambda sms, d=d, n=n: vector_quantize.tile_settings(n, d, on_gpu=True), (n, k, d))


def fused_op_variants():
    """Every variant with its tile (for a GPU of `sms` SMs) and its integer arguments."""
    for row, kernel, sig, consts, (n_rows, n_cols) in [*reparam_variants(), *recon_variants()]:
        yield row, kernel, sig, consts, lambda sms, r=n_rows, c=n_cols: tile_settings(r, c, sms), (n_rows, n_cols)
    yield from vq_variants()


def widest_load_bytes(ptx: str) -> int:
    """Bytes of the widest global load in the PTX (ld.global.v4.b32 = 16: fully vectorized)."""
    widths = [int(v or 1) * int(bits) // 8 for v, bits in
              re.findall(r"ld\.global(?:\.[a-z0-9_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx)]
    return max(widths, default=0)


def ptxas_report(ptx: str, arch: int) -> dict:
    """Registers, spill bytes and shared memory from the bundled ptxas -v."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        proc = subprocess.run([str(PTXAS), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[:300]}")
    text = proc.stderr
    number = lambda pattern: int(m.group(1)) if (m := re.search(pattern, text)) else 0  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "smem_bytes": number(r"(\d+) bytes smem")}


def compile_all(archs: list[int]) -> list[dict]:
    rows, done = [], {}
    for arch in archs:
        for row, kernel, sig, consts, tile, int_args in fused_op_variants():
            settings = tile(SMS[arch])
            blocks = {k: v for k, v in settings.items() if k.startswith("BLOCK_")}
            signature = {**sig, **{k: "constexpr" for k in (*consts, *blocks)}}
            constexprs = {**consts, **blocks}
            # what the JIT specializes at launch: torch's allocations are 16-byte aligned, and an int
            # argument divisible by 16 is marked so (B=256, N=784 are; D=200 is not)
            ints = iter(int_args)
            attrs = {(i,): [["tt.divisibility", 16]] for i, kind in enumerate(sig.values())
                     if kind.startswith("*") or (kind == "i32" and next(ints) % 16 == 0)}
            key = (arch, kernel.fn.__qualname__, kernel.fn.__module__, tuple(sorted(sig.items())),
                   tuple(sorted((k, str(v)) for k, v in constexprs.items())), settings["num_warps"])
            if key not in done:  # several shapes share one tile: compiled once
                compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                                          options={"num_warps": settings["num_warps"]})
                done[key] = {**ptxas_report(compiled.asm["ptx"], arch),
                             "load_bytes": widest_load_bytes(compiled.asm["ptx"])}
            rows.append({"arch": f"sm_{arch}", **row, "tile": "x".join(str(v) for v in blocks.values()),
                         "num_warps": settings["num_warps"], **done[key]})
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'arch':<6} {'kernel':<12} {'shape':<14} {'dtype':<5} {'variant':<16} {'tile':<8} {'warps':>5} "
          f"{'regs':>5} {'spills':>7} {'smem':>6} {'load B':>6}")
    for r in rows:
        print(f"{r['arch']:<6} {r['kernel']:<12} {r['shape']:<14} {r['dtype']:<5} {r['variant']:<16} {r['tile']:<8} "
              f"{r['num_warps']:>5} {r['registers']:>5} {r['spill_stores'] + r['spill_loads']:>7} {r['smem_bytes']:>6} "
              f"{r['load_bytes']:>6}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMS))
    parser.add_argument("--json", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows = compile_all(args.arch)
    print_table(rows)
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"{len(rows)} variants compiled for {', '.join(f'sm_{a}' for a in args.arch)} "
          f"(triton {triton.__version__}); {len(spilled)} spill")
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "rows": rows}, indent=2))
    return 1 if spilled else 0


if __name__ == "__main__":
    sys.exit(main())
