"""Fused Triton ops vs the eager reference vs torch.compile of the reference.

For each op, forward and forward+backward, from small to large sizes: median
time, achieved GB/s on the minimum bytes (each input read once, each output
written once), that as a fraction of the measured copy bandwidth, and the max
error against float64.

On CUDA everything is timed with triton.testing.do_bench (median). Without a
GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1), which
checks parity but says nothing about speed: the table then times eager vs
compiled on the CPU and leaves the Triton timing empty.

The vector quantizer's lookup (forward + backward, fp32) is also timed against vector-quantize-pytorch's
VectorQuantize layer, with each implementation's peak memory measured in a process of its own.

    python benchmarks/kernels.py [--quick] [--repeats 7] [--ops vector_quantize] [--json results.json]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined (first call)

from harness import base_parser, interleaved, max_relative_error, print_table, summarize, write_json  # noqa: E402

from fastvae import losses  # noqa: E402
from fastvae.kernels import fused_recon_loss, fused_reparam_kl  # noqa: E402
from fastvae.ops import recon_loss_fp32  # noqa: E402

REPARAM_SIZES = [(64, 2), (256, 200), (1024, 512), (4096, 512)]
IMAGE_SIZES = [(64, 1, 28, 28), (128, 3, 64, 64), (256, 3, 128, 128)]
QUICK_REPARAM, QUICK_IMAGES = REPARAM_SIZES[:2], IMAGE_SIZES[:2]


@dataclass
class Case:
    op: str
    size: str
    mode: str  # fwd | fwd+bwd
    impls: dict[str, Callable[[], object]]  # name -> callable returning the tensors to compare
    reference: Callable[[], list[torch.Tensor]]  # float64 results
    min_bytes: int


def _grads(outputs, inputs, grad_outputs):
    return list(torch.autograd.grad(outputs, inputs, grad_outputs))


def reparam_cases(B: int, D: int, device, dtype) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    mu = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_(True)
    logvar = torch.randn(B, D, generator=g).to(device, dtype).requires_grad_(True)
    eps = torch.randn(B, D, generator=g).to(device, dtype)
    dz, dkl = torch.randn(B, D, generator=g).to(device, dtype), torch.randn(B, generator=g).to(device)
    compiled = torch.compile(losses.reparam_kl)
    seed = torch.tensor(1, dtype=torch.int64, device=device)  # as training passes it: a device tensor, made once
    s = mu.element_size()
    # Parity runs all impls on the same explicit eps; the in-kernel Philox draw is what training uses
    # and has the same cost model minus one read, so it is timed as its own row ("triton rng").
    impls = {
        "eager": lambda: losses.reparam_kl(mu, logvar, eps),
        "compiled": lambda: compiled(mu, logvar, eps),
        "triton": lambda: fused_reparam_kl(mu, logvar, eps),
        "triton rng": lambda: fused_reparam_kl(mu, logvar, seed=seed),
    }

    def fwd_bwd(fn):
        def run():
            z, kl = fn()
            return [z, kl, *_grads((z, kl), (mu, logvar), (dz.to(z.dtype), dkl.to(kl.dtype)))]
        return run

    def ref(with_grads):
        m, lv = mu.detach().double().requires_grad_(True), logvar.detach().double().requires_grad_(True)
        z, kl = losses.reparameterize(m, lv, eps.double()), losses.kl_divergence(m, lv)
        return [z, kl] + (_grads((z, kl), (m, lv), (dz.double(), dkl.double())) if with_grads else [])

    size = f"B={B} D={D}"
    fwd_bytes = 3 * B * D * s + 4 * B  # read mu, logvar, eps; write z, kl
    bwd_bytes = 4 * B * D * s + 4 * B  # read dz, mu, logvar (eps regenerated), dkl; write dmu, dlogvar
    return [
        Case("reparam_kl", size, "fwd", {k: (lambda f=f: list(f())) for k, f in impls.items()},
             lambda: ref(False), fwd_bytes),
        Case("reparam_kl", size, "fwd+bwd", {k: fwd_bwd(f) for k, f in impls.items()},
             lambda: ref(True), fwd_bytes + bwd_bytes),
    ]


def recon_cases(shape, kind: str, device, dtype) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(shape, generator=g) * 3).to(device, dtype).requires_grad_(True)
    target = torch.rand(shape, generator=g).to(device)
    dloss = torch.rand(shape[0], generator=g).to(device)
    compiled = torch.compile(recon_loss_fp32)
    impls = {
        "eager": lambda: recon_loss_fp32(logits, target, kind),
        "compiled": lambda: compiled(logits, target, kind),
        "triton": lambda: fused_recon_loss(logits, target, kind),
    }

    def fwd_bwd(fn):
        def run():
            loss = fn()
            return [loss, *_grads(loss, logits, dloss)]
        return run

    def ref(with_grads):
        x = logits.detach().double().requires_grad_(True)
        loss = losses.reconstruction_loss(x, target.double(), kind)
        return [loss] + (_grads(loss, x, dloss.double()) if with_grads else [])

    n = logits.numel()
    size = "x".join(map(str, shape))
    fwd_bytes = n * logits.element_size() + n * target.element_size() + 4 * shape[0]
    return [
        Case(f"recon_{kind}", size, "fwd", {k: (lambda f=f: [f()]) for k, f in impls.items()},
             lambda: ref(False), fwd_bytes),
        Case(f"recon_{kind}", size, "fwd+bwd", {k: fwd_bwd(f) for k, f in impls.items()},
             lambda: ref(True), fwd_bytes + n * logits.element_size() + 4 * shape[0]),
    ]


VQ_SIZES = [(8192, 1024, 256, False), (8192, 16384, 8, True), (32768, 16384, 8, False)]  # (N, K, D, l2 inputs)
QUICK_VQ = [(512, 256, 64, False), (512, 1024, 8, True)]
VQ_PEER = "vector-quantize-pytorch"


def vq_inputs(n: int, k: int, d: int, l2: bool, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    v, codes = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    if l2:  # l2-normalized vectors and codes (LlamaGen's lookup): the nearest code is the most similar one
        v, codes = torch.nn.functional.normalize(v, dim=1), torch.nn.functional.normalize(codes, dim=1)
    dq = torch.randn(n, d, generator=g)
    return v.to(device).requires_grad_(True), codes.to(device).requires_grad_(True), dq.to(device)


def vq_impls(v, codes, dq, on_gpu: bool) -> dict:
    """name -> () -> (z_q, its loss, the codebook tensor its gradient goes to): fastvae's eager lookup, its kernel (timed on a GPU only: the
    interpreter is no timing, tests/test_kernel_vector_quantize.py checks its parity), and the peer's
    VectorQuantize layer (a learned codebook, straight-through, 0.25 x mse(z, e)): the same gradients as
    fastvae's op with codebook and commitment weights 0.25 and its loss averaged (docs/tokenizers.md)."""
    from fastvae.kernels import fused_vector_quantize

    impls = {"eager": lambda: (*losses.vector_quantize(v, codes, 0.25, 0.25)[::2], codes)}
    if on_gpu:
        impls["triton"] = lambda: (*fused_vector_quantize(v, codes, 0.25, 0.25)[::2], codes)
    try:
        from vector_quantize_pytorch import VectorQuantize
    except ImportError:
        return impls
    peer = VectorQuantize(dim=v.shape[1], codebook_size=codes.shape[0], learnable_codebook=True, ema_update=False,
                          rotation_trick=False, commitment_weight=0.25).to(v.device)
    peer._codebook.embed.data.copy_(codes.detach()[None])  # the same codebook

    def run_peer():
        quantized, _, loss = peer(v[None])
        return quantized[0], loss, peer._codebook.embed

    impls[VQ_PEER] = run_peer
    return impls


def vq_cases(n: int, k: int, d: int, l2: bool, device, dtype) -> list[Case]:
    v, codes, dq = vq_inputs(n, k, d, l2, device)
    impls = vq_impls(v, codes, dq, device.type == "cuda")

    def fwd_bwd(fn):
        def run():
            q, loss, codebook = fn()
            dv, dcodes = _grads((q * dq).sum() + loss.mean(), (v, codebook), None)
            return [q, dv, dcodes.reshape(codes.shape)]
        return run

    def ref():
        v64, codes64 = v.detach().double().requires_grad_(True), codes.detach().double().requires_grad_(True)
        q, _, loss = losses.vector_quantize(v64, codes64, 0.25, 0.25)
        return [q, *_grads((q * dq.double()).sum() + loss.mean(), (v64, codes64), None)]

    size = f"N={n} K={k} D={d}{' l2' if l2 else ''}"
    s = v.element_size()
    # read the vectors and the codebook, write the codes (and indices): the lookup's minimum
    fwd_bytes = 2 * n * d * s + k * d * s + 8 * n
    return [Case("vector_quantize", size, "fwd+bwd", {name: fwd_bwd(f) for name, f in impls.items()}, ref,
                 fwd_bytes + 3 * n * d * s + k * d * s)]


def vq_peak_bytes(n: int, k: int, d: int, l2: bool, impl: str, device: str) -> int:
    """Peak memory of one forward + backward of `impl`, above what its inputs hold; run in a fresh
    process (CUDA: max allocated; CPU: the peak RSS, reset through /proc/self/clear_refs)."""
    from harness import current_rss, peak_rss

    case = vq_cases(n, k, d, l2, torch.device(device), torch.float32)[0]
    fn = case.impls[impl]
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = current_rss()
    open("/proc/self/clear_refs", "w").write("5")
    fn()
    return peak_rss() - before


def vq_memory(sizes, device: torch.device) -> dict:
    """(size, impl) -> peak bytes, each in its own process."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    peaks = {}
    for n, k, d, l2 in sizes:
        v, codes, dq = vq_inputs(2, 2, d, False, "cpu")
        for impl in vq_impls(v, codes, dq, device.type == "cuda"):
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                peaks[(n, k, d, l2, impl)] = pool.submit(vq_peak_bytes, n, k, d, l2, impl, device.type).result()
    return peaks


def max_error(results: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """Largest max_relative_error over the compared tensors."""
    return max(max_relative_error(a, r) for a, r in zip(results, reference))


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s (read + write of a 256 MiB buffer)."""
    src = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        import triton.testing

        ms = triton.testing.do_bench(lambda: dst.copy_(src))
        return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9
    samples = interleaved({"copy": lambda: dst.copy_(src)}, device, repeats=5, calls_per_sample=3)["copy"]
    t = summarize(samples)["median_s"]
    return 2 * src.numel() * 4 / t / 1e9


def time_case(case: Case, device: torch.device, repeats: int) -> dict[str, float | None]:
    """Median seconds per call for each impl; Triton only on CUDA (the interpreter is not a timing)."""
    if device.type == "cuda":
        import triton.testing

        return {name: triton.testing.do_bench(fn, return_mode="median") * 1e-3 for name, fn in case.impls.items()}
    timed = {k: v for k, v in case.impls.items() if not k.startswith("triton")}
    samples = interleaved(timed, device, repeats=repeats, calls_per_sample=3)
    return {name: (summarize(samples[name])["median_s"] if name in samples else None) for name in case.impls}


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the small sizes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--ops", nargs="*", default=["reparam_kl", "recon", "vector_quantize"],
                        choices=["reparam_kl", "recon", "vector_quantize"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cases = []
    for B, D in (QUICK_REPARAM if args.quick else REPARAM_SIZES) if "reparam_kl" in args.ops else []:
        cases += reparam_cases(B, D, device, dtype)
    for kind in ("bce", "mse") if "recon" in args.ops else ():
        for shape in QUICK_IMAGES if args.quick else IMAGE_SIZES:
            cases += recon_cases(shape, kind, device, dtype)
    vq_sizes = (QUICK_VQ if args.quick else VQ_SIZES) if args.dtype == "float32" and "vector_quantize" in args.ops \
        else []  # the lookup is fp32
    for n, k, d, l2 in vq_sizes:
        cases += vq_cases(n, k, d, l2, device, dtype)
    peaks = {} if args.quick else vq_memory(vq_sizes, device)  # (a process per case: seconds each)

    bandwidth = copy_bandwidth(device)
    on_gpu = device.type == "cuda"
    print(f"device {device}, dtype {args.dtype}, measured copy bandwidth {bandwidth:.1f} GB/s")
    if not on_gpu:
        print("no GPU: Triton runs under the interpreter for parity only; Triton timings need a GPU")
    rows = []
    for case in cases:
        print(f"  {case.op} {case.size} {case.mode}...", flush=True)
        reference = case.reference()
        times = time_case(case, device, args.repeats)
        for name, fn in case.impls.items():
            results = fn()
            error = max_error(results, reference) if name != "triton rng" else None  # other noise: no parity
            # a lookup's z_q rows that are another code than float64's: fp32 rounding at near-ties
            flips = int(((results[0] - reference[0]).abs().amax(1) > 1e-4).sum()) if case.op == "vector_quantize" \
                else None
            t = times[name]
            gbps = case.min_bytes / t / 1e9 if t else None
            rows.append({"op": case.op, "size": case.size, "mode": case.mode, "impl": name,
                         "time_us": t * 1e6 if t else None, "GB_per_s": gbps,
                         "frac_copy_bw": gbps / bandwidth if gbps else None,
                         "speedup_vs_eager": times["eager"] / t if t else None,
                         "max_rel_error_vs_fp64": error, "min_bytes": case.min_bytes, "codes_off_fp64": flips,
                         "peak_MB": next((b / 2**20 for (n, k, d, l2, impl), b in peaks.items()
                                          if impl == name and case.op == "vector_quantize"
                                          and case.size == f"N={n} K={k} D={d}{' l2' if l2 else ''}"), None)})
    print()

    def show(value, fmt):
        return "-" if value is None else format(value, fmt)

    table = [{**r, **{k: show(r[k], f) for k, f in (("time_us", ".1f"), ("GB_per_s", ".2f"),
                                                      ("frac_copy_bw", ".3f"), ("speedup_vs_eager", ".2f"),
                                                      ("max_rel_error_vs_fp64", ".1e"), ("peak_MB", ".0f"),
                                                      ("codes_off_fp64", "d"))}}
             for r in rows]
    print_table(table, [("op", "op", ""), ("size", "size", ""), ("mode", "mode", ""), ("impl", "impl", ""),
                        ("time_us", "time us", ""), ("GB_per_s", "GB/s", ""), ("frac_copy_bw", "of copy bw", ""),
                        ("speedup_vs_eager", "x eager", ""), ("max_rel_error_vs_fp64", "max err", ""),
                        ("peak_MB", "peak MB", ""), ("codes_off_fp64", "codes != fp64", "")])
    write_json(args.json, {"benchmark": "kernels", "device": str(device), "dtype": args.dtype,
                           "triton_timed": on_gpu, "copy_bandwidth_GB_per_s": bandwidth, "results": rows})


if __name__ == "__main__":
    main()
