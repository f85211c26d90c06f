"""Where the time of one training step goes: torch.profiler over `Trainer.train_step`, self time of
every operator grouped into what it is for (convolutions, normalization, the VAE ops, the
optimizer, ...), as a share of the step. Elementwise operators shared by several parts (mul, add)
are counted where they mostly come from, so the shares of the small groups are approximate.

    python benchmarks/profile_step.py [--workload "mnist conv_vae 1x28x28"] [--steps 5] [key=value ...]
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from harness import base_parser, print_table, write_json  # noqa: E402
from train_throughput import WORKLOADS, trainer_step  # noqa: E402

# operator -> what it is for; by exact aten name, else by prefix, else "other"
GROUPS = {
    "convolutions (fwd + bwd)": ("convolution", "convolution_backward", "mkldnn_convolution", "_convolution",
                                 "cudnn_convolution", "cudnn_convolution_transpose", "slow_conv2d_forward",
                                 "slow_conv_transpose2d", "convolution_overrideable"),
    "linear layers": ("mm", "addmm", "bmm"),
    "batch norm": ("native_batch_norm", "native_batch_norm_backward", "cudnn_batch_norm",
                   "cudnn_batch_norm_backward", "_batch_norm_impl_index"),
    "activations, upsampling, dropout": ("leaky_relu", "leaky_relu_backward", "upsample_nearest2d",
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


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workload", default="mnist conv_vae 1x28x28", choices=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.memory_format=contiguous")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config_path, batch, extra = WORKLOADS[args.workload]
    from fastvae.config import image_hw, load_config

    cfg = load_config(config_path, [f"data.batch_size={batch}", *extra])
    x = torch.rand(batch, cfg.data.channels, *image_hw(cfg.data), device=device)
    with tempfile.TemporaryDirectory() as tmp:
        step = trainer_step(config_path, [f"data.batch_size={batch}", "model.dropout=0.0", "train.ops=eager",
                                          f"train.cpu={device.type == 'cpu'}", *extra, *args.overrides], x, Path(tmp))
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
    write_json(args.json, {"benchmark": "profile_step", "workload": args.workload, "device": str(device),
                           "overrides": args.overrides, "results": rows})


if __name__ == "__main__":
    main()
