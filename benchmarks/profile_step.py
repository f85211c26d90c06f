"""Where the time of one training step goes: torch.profiler over `Trainer.train_step`, self time of
every operator grouped into what it is for (convolutions, normalization, the VAE ops, the
optimizer, ...), as a share of the step. Elementwise operators shared by several parts (mul, add)
are counted where they mostly come from, so the shares of the small groups are approximate.

    python benchmarks/profile_step.py [--workload "mnist conv_vae 1x28x28"] [--steps 5] [key=value ...]
    python benchmarks/profile_step.py --workload "kl_autoencoder 3x64x64, after disc_start" --steps 3
    python benchmarks/profile_step.py --workload "vq_autoencoder 3x64x64, before disc_start" --steps 3

The autoencoders' workloads (KL, and the tokenizer: VQ of 16,384 codes in 8 l2-normalized
dimensions) also say what each network costs, by taking it out of the step:
LPIPS (loss.perceptual_weight=0) and the discriminator (before disc.start it is not run),
timed interleaved against the whole step.
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import base_parser, interleaved, print_table, random_backbone, write_json  # noqa: E402
from train_throughput import (KL_CHANNELS, VQ_QUANTIZER, WORKLOADS, kl_overrides, kl_trainer_step,  # noqa: E402
                              trainer_step, vq_overrides)

# operator -> what it is for; by exact aten name, else by prefix, else "other"
GROUPS = {
    "convolutions (fwd + bwd)": ("convolution", "convolution_backward", "mkldnn_convolution", "_convolution",
                                 "cudnn_convolution", "cudnn_convolution_transpose", "slow_conv2d_forward",
                                 "slow_conv_transpose2d", "convolution_overrideable"),
    "linear layers (and the code distances' matmul)": ("mm", "addmm", "bmm"),
    "quantizer: argmin, gather, codebook update": ("argmin", "min", "bincount", "index_add_", "index", "index_select",
                                                   "_index_put_impl_", "index_put_", "embedding", "one_hot",
                                                   "linalg_vector_norm", "clamp_min", "norm"),
    "group norm + SiLU (memory-bound at full resolution)": ("native_group_norm", "native_group_norm_backward",
                                                           "silu", "silu_backward", "silu_"),
    "attention": ("_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention_for_cpu_backward", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_flash_attention_backward", "_softmax", "_softmax_backward_data", "baddbmm"),
    "ReLU, max pool (LPIPS's VGG)": ("relu", "relu_", "threshold_backward", "max_pool2d_with_indices",
                                     "max_pool2d_with_indices_backward"),
    "batch norm": ("native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm",
                   "cudnn_batch_norm_backward", "_batch_norm_impl_index"),
    "activations, upsampling, dropout": ("leaky_relu", "leaky_relu_backward", "leaky_relu_", "upsample_nearest2d",
                                         "upsample_nearest2d_backward", "bernoulli_", "native_dropout", "_to_copy"),
    "optimizer (Adam)": ("_foreach_add_", "_foreach_mul_", "_foreach_lerp_", "_foreach_addcmul_", "_foreach_sqrt",
                         "_foreach_div_", "_foreach_addcdiv_", "_fused_adam_", "sqrt", "addcdiv_", "lerp_",
                         "addcmul_", "add_", "mul_", "div"),
    "VAE ops: reparam, KL, reconstruction loss": ("exp", "randn", "normal_", "sigmoid", "sigmoid_backward", "pow",
                                                  "binary_cross_entropy_with_logits", "log_sigmoid_forward", "sum",
                                                  "mean", "sub", "rsub", "neg", "mul", "add", "fastvae::"),
    "copies and allocation": ("copy_", "fill_", "zero_", "empty", "empty_strided", "resize_", "clone",
                              "contiguous", "to", "as_strided"),
}
NAME_TO_GROUP = {name: group for group, names in GROUPS.items() for name in names}


def group_of(key: str) -> str:
    if key.startswith("fastvae::"):
        return "VAE ops: reparam, KL, reconstruction loss"
    name = key.split("::", 1)[1] if key.startswith("aten::") else None
    return NAME_TO_GROUP.get(name, "other (autograd engine, Python, small ops)")


# the latent-diffusion autoencoder and the tokenizer (train_throughput.py's kl and vq rows): (size, disc active,
# overrides of the part)
KL_WORKLOADS = {f"{name} 3x64x64, {phase} disc_start": (64, phase == "after", overrides)
                for name, overrides in (("kl_autoencoder", kl_overrides), ("vq_autoencoder", vq_overrides))
                for phase in ("before", "after")}
KL_BATCH = 8


def kl_steps(size: int, disc_active: bool, part_overrides, device, tmp: Path, overrides: list[str]) -> dict:
    """The autoencoder's whole step, and the step without LPIPS / without the discriminator."""
    lpips_path = random_backbone("vgg", tmp / "lpips")  # random weights: the same FLOPs
    torch.manual_seed(0)
    x = torch.rand(KL_BATCH, 3, size, size, device=device)
    extra = [f"train.cpu={device.type == 'cpu'}", *overrides]
    common = [*part_overrides(size, lpips_path, disc_active), *extra]
    cases = {"whole step": kl_trainer_step(common, x, tmp / "whole")[1],
             "without LPIPS": kl_trainer_step([*common, "loss.perceptual_weight=0"], x, tmp / "no_lpips")[1]}
    if disc_active:
        cases["without the discriminator"] = kl_trainer_step([*part_overrides(size, lpips_path, False), *extra], x,
                                                             tmp / "no_disc")[1]
    return cases


def network_costs(cases: dict, device, repeats: int) -> list[dict]:
    """What each network costs: the whole step's median minus the median without it (interleaved)."""
    samples = interleaved(cases, device, repeats=repeats, calls_per_sample=1, warmup=1)
    whole = statistics.median(samples["whole step"])
    rows = [{"part": "whole step", "ms": whole * 1e3, "share": 1.0}]
    for name, times in samples.items():
        if name != "whole step":
            cost = whole - statistics.median(times)
            rows.append({"part": name.replace("without ", ""), "ms": cost * 1e3, "share": cost / whole})
    return rows


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mnist conv_vae 1x28x28", choices=[*WORKLOADS, *KL_WORKLOADS])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.memory_format=contiguous")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    costs = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.workload in KL_WORKLOADS:
            batch = KL_BATCH
            cases = kl_steps(*KL_WORKLOADS[args.workload], device, Path(tmp), args.overrides)
            costs = network_costs(cases, device, args.repeats)
            step = cases["whole step"]
        else:
            step, batch = workload_step(args.workload, device, Path(tmp), args.overrides)
        for _ in range(2):
            step()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    totals: dict[str, float] = {}
    for event in prof.key_averages():
        totals[group_of(event.key)] = totals.get(group_of(event.key), 0.0) + getattr(event, key)
    whole = sum(totals.values())
    rows = [{"group": g, "ms_per_step": t / 1e3 / args.steps, "share": t / whole}
            for g, t in sorted(totals.items(), key=lambda kv: -kv[1])]
    print(f"{args.workload}, batch {batch}, {device}, {args.steps} steps, self time by group")
    print_table(rows, [("group", "group", ""), ("ms_per_step", "ms / step", ".1f"), ("share", "share", ".0%")])
    if costs:
        model = "AutoencoderKL" if args.workload.startswith("kl") else \
            f"tokenizer, VQ {VQ_QUANTIZER['codebook_size']} x {VQ_QUANTIZER['code_dim']}"
        print(f"\nwhat each network costs ({model} {KL_CHANNELS}): the whole step's median minus the step's "
              f"without it, {args.repeats} interleaved repeats")
        print_table(costs, [("part", "part", ""), ("ms", "ms / step", ".0f"), ("share", "share", ".0%")])
    write_json(args.json, {"benchmark": "profile_step", "workload": args.workload, "device": str(device),
                           "overrides": args.overrides, "results": rows, "network_costs": costs})


def workload_step(workload: str, device, tmp: Path, overrides: list[str]):
    config_path, batch, extra = WORKLOADS[workload]
    from fastvae.config import image_hw, load_config

    cfg = load_config(config_path, [f"data.batch_size={batch}", *extra])
    x = torch.rand(batch, cfg.data.channels, *image_hw(cfg.data), device=device)
    return trainer_step(config_path, [f"data.batch_size={batch}", "model.dropout=0.0", "train.ops=eager",
                                      f"train.cpu={device.type == 'cpu'}", *extra, *overrides], x, tmp), batch


if __name__ == "__main__":
    main()
