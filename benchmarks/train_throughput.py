"""Training speed as users get it, against the plain PyTorch loop of the lecture, in the same run.

step: `Trainer.train_step` (through accelerate: accumulate, backward, optimizer step, the selected
ops, the non-finite guard) on one fixed batch of synthetic images, for eager / torch.compile x
fp32 / bf16 autocast x contiguous / channels_last (x ops eager / triton where Triton runs), for the
MNIST conv VAE (batch 128) and the 64x64 CelebA DFC-VAE (batch 64); baseline: the lecture's step
written out (eager fp32 model, eager losses, backward, Adam).

kl: the latent-diffusion autoencoder's step (diffusers' AutoencoderKL, LDM's loss: L1 + LPIPS, KL, a
PatchGAN with the adaptive weight), fastvae's `Trainer.train_step` against a plain PyTorch step written
the way diffusers' research script (examples/research_projects/autoencoderkl) and LDM do it: eager,
fp32, NCHW, the discriminator and both gradient norms computed every step (LDM, before disc_start with
a zero weight), one optimizer step for each network. Both phases: before disc.start and after.
Each row also gives the step's FLOPs (torch.utils.flop_counter) and the GFLOP/s it achieved.

vq: the same for a tokenizer (diffusers' Encoder/Decoder blocks around a VQ of 16,384 codes looked up
in 8 l2-normalized dimensions, LlamaGen's), against the plain step with vector-quantize-pytorch's
VectorQuantize in place of fastvae's quantizer, written the taming-transformers way (as the kl peer).

loop: whole epochs on the embedded MNIST (4,500 images, batch 128), data loading included:
`Trainer.fit()` with the torch DataLoader or the in-memory loader, against the plain loop over
shuffled batches of the in-memory tensor. images/s is what fastvae writes to metrics.jsonl (the
epoch's training loop); the wall time of fit() (set-up, test metrics, checkpoint, pictures) is
reported beside it.

Every row is a ratio to its baseline, interleaved and repeated, with its peak memory (CUDA max
allocated, or the growth of the process's peak RSS while the case ran: a lower bound on CPU).

    python benchmarks/train_throughput.py [--parts step loop kl vq] [--repeats 5] [--steps 3] [--modes eager compiled]
        [--precisions fp32 bf16] [--formats contiguous channels_last] [--kl-size 64] [--kl-modes eager compiled] [--phases before after]
        [--json PATH]
"""

from __future__ import annotations

import copy
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch


from harness import base_parser, interleaved, print_table, random_backbone, summarize, write_json  # noqa: E402

from fastvae import losses, precision  # noqa: E402
from fastvae.config import image_hw, load_config  # noqa: E402
from fastvae.data import build_datasets  # noqa: E402
from fastvae.tracking import read_records  # noqa: E402
from fastvae.data.base import ImageTensorDataset  # noqa: E402
from fastvae.models import build_model  # noqa: E402
from fastvae.optim import build_optimizer  # noqa: E402
from fastvae.run_setup import reset_accelerate_state  # noqa: E402
from fastvae.trainer import Trainer, compile_counts  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = {  # name: (config, batch, overrides); the first two run by default
    "mnist conv_vae 1x28x28": (ROOT / "configs" / "mnist.yaml", 128, []),
    "celeba dfc_vae 3x64x64": (ROOT / "configs" / "celeba.yaml", 64, []),
    "celeba dfc_vae 3x128x128": (ROOT / "configs" / "celeba.yaml", 64, ["data.image_size=128"]),
}
PRECISIONS = {"fp32": "no", "bf16": "bf16"}
FORMATS = ("contiguous", "channels_last")
BASELINE = "plain PyTorch fp32"


class PeakMemory:
    """Peak memory of what runs inside: CUDA max allocated, or the growth of the peak RSS."""

    def __init__(self, device) -> None:
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
        else:
            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.rss_before
            self.peak = max(self.peak, grown)


def measured(fn, meter: PeakMemory):
    def run():
        with meter:
            fn()
    return run


# ---------------------------------------------------------------- the step


def lecture_step(cfg, model, optimizer, x) -> None:
    """The lecture's step written out: no accelerate, eager fp32, the eager reference losses."""
    mu, logvar = model.encode(x)
    z, kl = losses.reparam_kl(mu, logvar)
    recon = losses.reconstruction_loss(model.decode(z), x, cfg.loss.recon)
    losses.vae_loss(recon, kl, cfg.loss.recon_weight, cfg.loss.beta).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_step(cfg, model, x):
    model = copy.deepcopy(model).train()
    optimizer = build_optimizer(cfg, model.parameters())
    return lambda: lecture_step(cfg, model, optimizer, x)


def trainer_step(config_path, overrides, x, out_dir: Path):
    """Trainer.train_step on the batch x, checked to run in the precision asked for."""
    reset_accelerate_state()
    cfg = load_config(config_path, [*overrides, f"out_dir={out_dir}", "train.epochs=1000", "logger=none"])
    images = (x.cpu() * 255).to(torch.uint8)
    trainer = Trainer(cfg, datasets=(ImageTensorDataset(images, torch.zeros(len(x))),) * 2)
    device = trainer.accelerator.device
    batch = (x.to(device), None, torch.arange(len(x), device=device))  # (images, labels, sample ids: the noise keys)
    seen = []
    hook = trainer.raw_model.encoder[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    graphs = compile_counts()["compiled_graphs"]
    trainer.train_step(batch)
    hook.remove()
    trainer.train_step(batch)  # compiled rows: runs the graph built without the hook
    compiled = compile_counts()["compiled_graphs"] - graphs
    want = torch.bfloat16 if cfg.train.mixed_precision == "bf16" else torch.float32
    assert seen == [want], f"{overrides}: first layer ran in {seen}, expected {want}"
    # a row that says compiled must have compiled: dynamo's silent eager fallback is made an error
    # (fail_on_recompile_limit_hit in step_cases), and a compiled row built no graph is one too
    assert compiled > 0 or not cfg.train.compile, f"{overrides}: train.compile=true but no graph was compiled"
    return lambda: trainer.train_step(batch)


def step_cases(workload: str, args, device, tmp: Path) -> dict:
    config_path, batch, extra = WORKLOADS[workload]
    # Every Trainer compiles the same function (nn.Module's call, each model compiled in place): dynamo
    # keeps one cache for it, whose default limit (8 entries) the rows of one run exceed; past it dynamo
    # would silently run the later "compiled" rows eager. Room for every row, and an error instead of a silent fallback.
    rows = len(args.ops) * len(args.modes) * len(args.precisions) * len(args.formats)
    torch._dynamo.config.recompile_limit = max(8, 4 * rows)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    common = ["model.dropout=0.0", f"data.batch_size={batch}", f"train.cpu={device.type == 'cpu'}", *extra]
    torch.manual_seed(0)
    cfg = load_config(config_path, common)
    x = torch.rand(batch, cfg.data.channels, *image_hw(cfg.data), device=device)
    cases = {BASELINE: plain_step(cfg, build_model(cfg).to(device), x)}
    for ops in args.ops:
        for compile_ in [mode == "compiled" for mode in args.modes]:
            for precision in args.precisions:
                for fmt in args.formats:
                    name = f"train_step {'compiled' if compile_ else 'eager'} {precision} {fmt} ops={ops}"
                    overrides = [*common, f"train.ops={ops}", f"train.compile={str(compile_).lower()}",
                                 f"train.mixed_precision={PRECISIONS[precision]}", f"train.memory_format={fmt}"]
                    cases[name] = trainer_step(config_path, overrides, x, tmp / f"{len(cases)}")
    return cases


def run_steps(args, device, tmp: Path) -> list[dict]:
    rows = []
    for workload in args.workloads:
        print(f"{workload}: building the step variants (compiling takes a while on first use)...", flush=True)
        cases = step_cases(workload, args, device, tmp / workload.replace(" ", "_"))
        meters = {name: PeakMemory(device) for name in cases}
        samples = interleaved({n: measured(fn, meters[n]) for n, fn in cases.items()}, device,
                              repeats=args.repeats, calls_per_sample=args.steps, warmup=2)
        base = summarize(samples[BASELINE])["median_s"]
        batch = WORKLOADS[workload][1]
        for name, times in samples.items():
            s = summarize(times)
            rows.append({"part": "step", "workload": workload, "variant": name, "batch": batch, **s,
                         "ms": s["median_s"] * 1e3, "images_per_s": batch / s["median_s"],
                         "x_baseline": base / s["median_s"], "peak_MB": meters[name].peak / 2**20})
    return rows


# ---------------------------------------------------------------- the latent-diffusion autoencoder

KL_CHANNELS = "[64, 128, 128]"  # AutoencoderKL 64/128/128: 3 levels, f = 4 (PLATFORM.md's measured peer)
KL_BATCH = 8
KL_PHASES = {"before disc_start": False, "after disc_start": True}


def kl_overrides(size: int, lpips_path: str, disc_active: bool) -> list[str]:
    return ["model.name=kl_autoencoder", f"model.kwargs={{block_out_channels: {KL_CHANNELS}, layers_per_block: 1}}",
            "data.name=imagefolder", "data.root=unused", "data.channels=3", f"data.image_size={size}",
            f"data.batch_size={KL_BATCH}", "loss.objective=ldm", "loss.beta=1e-6", f"loss.lpips_weights={lpips_path}",
            "disc.weight=0.5", f"disc.start={0 if disc_active else 10**9}", "optim.betas=[0.5, 0.9]"]


class DiffusersScriptStep:
    """One step the way the research script / LDM write it: encode, sample, decode, L1 + LPIPS NLL + KL,
    D(x_hat) and both gradient norms for the adaptive weight (every step: LDM weighs the term by 0
    before disc_start, it does not skip it), backward, the generator's Adam step; then D on the real
    images and the reconstructions, its loss (x 0 before disc_start), backward, D's Adam step. Eager,
    fp32, NCHW; LPIPS with gradients (the script's torch.no_grad would make the loss another one)."""

    def __init__(self, model, lpips, x, disc_active: bool) -> None:
        from fastvae.discriminator import NLayerDiscriminator

        self.vae = self.copy_model(model)
        self.lpips, self.x, self.factor = lpips, x.contiguous() * 2 - 1, 1.0 if disc_active else 0.0
        torch.manual_seed(0)
        self.disc = NLayerDiscriminator(x.shape[1])
        self.opt_g = torch.optim.Adam(self.vae.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.logvar = torch.zeros(())

    def copy_model(self, model):
        return copy.deepcopy(model.vae).train().to(memory_format=torch.contiguous_format)

    def autoencode(self, x):
        """(x_hat, the bottleneck's weighted loss)."""
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, 1e-6 * torch.sum(posterior.kl()) / len(x)

    def __call__(self) -> None:
        x = self.x
        x_hat, regularizer = self.autoencode(x)
        rec = (x - x_hat).abs() + self.lpips(x, x_hat)
        nll = torch.sum(rec / torch.exp(self.logvar) + self.logvar) / len(x)
        g_loss = -torch.mean(self.disc(x_hat))
        last = self.vae.decoder.conv_out.weight
        nll_grad = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        d_weight = torch.clamp(nll_grad.norm() / (g_grad.norm() + 1e-4), 0.0, 1e4).detach() * 0.5
        (nll + regularizer + d_weight * self.factor * g_loss).backward()
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)
        d_loss = self.factor * losses.hinge_d_loss(self.disc(x.detach()), self.disc(x_hat.detach()))
        d_loss.backward()
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)


# LlamaGen's lookup (16,384 codes in 8 l2-normalized dimensions; 64 px: 256 tokens per image) with an EMA codebook:
# vector-quantize-pytorch has no learned cosine codebook ("not compatible with learnable codebook yet")
VQ_QUANTIZER = {"codebook_size": 16384, "code_dim": 8, "l2": True, "ema_decay": 0.99}


def vq_overrides(size: int, lpips_path: str, disc_active: bool) -> list[str]:
    """The kl rows' workload with the KL bottleneck replaced by a VQ (the quantizer's loss x 1, as taming)."""
    kl = [o for o in kl_overrides(size, lpips_path, disc_active) if not o.startswith(("model.name", "loss.beta"))]
    return [*kl, "model.name=vq_autoencoder", "loss.beta=1.0", "quantizer.kind=vq",
            *(f"quantizer.{k}={str(v).lower()}" for k, v in VQ_QUANTIZER.items())]


class VQScriptStep(DiffusersScriptStep):
    """The same step for a tokenizer, its quantizer vector-quantize-pytorch's VectorQuantize (what tokenizer
    code imports; an EMA cosine codebook in 8 dimensions, straight-through): the taming-transformers /
    LlamaGen way, which computes the adaptive weight and D(x_hat) every step as LDM does. The encoder and
    decoder are fastvae's model's, copied."""

    def __init__(self, model, lpips, x, disc_active: bool) -> None:
        from vector_quantize_pytorch import VectorQuantize

        super().__init__(model, lpips, x, disc_active)
        torch.manual_seed(0)
        self.vq = VectorQuantize(dim=model.latent_shape[0], codebook_size=VQ_QUANTIZER["codebook_size"],
                                 codebook_dim=VQ_QUANTIZER["code_dim"], use_cosine_sim=VQ_QUANTIZER["l2"],
                                 decay=VQ_QUANTIZER["ema_decay"], accept_image_fmap=True, commitment_weight=0.25,
                                 rotation_trick=False).to(x.device)
        self.vae.quantizer = None  # fastvae's own: not in this step
        self.opt_g = torch.optim.Adam([*self.vae.parameters(), *self.vq.parameters()], lr=1e-4, betas=(0.5, 0.9))

    def copy_model(self, model):
        return copy.deepcopy(model).train().to(memory_format=torch.contiguous_format)

    def autoencode(self, x):  # x in [-1, 1]: the blocks themselves, not fastvae's encode/decode of [0, 1] images
        quantized, _, loss = self.vq(self.vae.quant_conv(self.vae.encoder(x)))
        return self.vae.decoder(self.vae.post_quant_conv(quantized)), loss


def kl_trainer_step(overrides: list[str], x, out_dir: Path):
    reset_accelerate_state()
    cfg = load_config(None, [*overrides, f"out_dir={out_dir}", "train.epochs=1000", "logger=none"])
    images = (x.cpu() * 255).to(torch.uint8)
    trainer = Trainer(cfg, datasets=(ImageTensorDataset(images, torch.zeros(len(x))),) * 2)
    device = trainer.accelerator.device
    batch = (x.to(device), None, torch.arange(len(x), device=device))
    return trainer, lambda: trainer.train_step(batch)


def step_flops(fn) -> float:
    """FLOPs of one call (torch.utils.flop_counter: matmuls and convolutions, forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


AUTOENCODERS = {  # part: (its overrides, the plain step, the plain step's name)
    "kl": (kl_overrides, DiffusersScriptStep, "plain PyTorch, the diffusers script's way, fp32"),
    "vq": (vq_overrides, VQScriptStep, "plain PyTorch + vector-quantize-pytorch, the taming way, fp32"),
}


def kl_cases(args, device, tmp: Path, disc_active: bool, lpips_path: str, part: str = "kl") -> dict:
    torch.manual_seed(0)
    x = torch.rand(KL_BATCH, 3, args.kl_size, args.kl_size, device=device)
    overrides, plain_step, plain_name = AUTOENCODERS[part]
    common = [*overrides(args.kl_size, lpips_path, disc_active), f"train.cpu={device.type == 'cpu'}"]
    first, step = kl_trainer_step([*common, "train.mixed_precision=no"], x, tmp / "peer_source")
    cases = {plain_name: plain_step(first.raw_model, first.objective.perceptual, x, disc_active)}
    cases["fastvae train_step fp32 channels_last"] = step
    for precision in [p for p in args.precisions if p != "fp32"]:
        _, cases[f"fastvae train_step {precision} channels_last"] = kl_trainer_step(
            [*common, f"train.mixed_precision={PRECISIONS[precision]}"], x, tmp / f"kl_{precision}")
    if "contiguous" in args.formats:
        _, cases["fastvae train_step fp32 contiguous"] = kl_trainer_step(
            [*common, "train.mixed_precision=no", "train.memory_format=contiguous"], x, tmp / "kl_contiguous")
    if "compiled" in args.kl_modes:  # the autoencoder's GroupNorm + SiLU fused (profile_step: ~27% of the step)
        for precision in args.precisions:
            trainer, step = kl_trainer_step([*common, f"train.mixed_precision={PRECISIONS[precision]}",
                                             "train.compile=true"], x, tmp / f"kl_compiled_{precision}")
            step()  # compiles here, not inside the timed repeats
            cases[f"fastvae train_step {precision} channels_last compiled"] = step
    return cases


def run_kl(args, device, tmp: Path, part: str = "kl") -> list[dict]:
    from fastvae.perceptual import BACKBONE_FILES, hub_checkpoints

    lpips_path = args.lpips_weights or str(hub_checkpoints() / BACKBONE_FILES["vgg"])
    if not Path(lpips_path).is_file():  # no real weights here: random ones of the same shape (same FLOPs)
        lpips_path = random_backbone("vgg", tmp / "lpips")
    rows = []
    torch._dynamo.config.recompile_limit = 64  # every compiled row's model shares nn.Module's call (step_cases)
    for phase, active in [(p, a) for p, a in KL_PHASES.items() if p.split()[0] in args.phases]:
        print(f"{part} autoencoder {args.kl_size} px, {phase}: building the steps...", flush=True)
        cases = kl_cases(args, device, tmp / f"{part}_{phase.replace(' ', '_')}", active, lpips_path, part)
        flops = {name: step_flops(fn) for name, fn in cases.items()}
        meters = {name: PeakMemory(device) for name in cases}
        samples = interleaved({n: measured(fn, meters[n]) for n, fn in cases.items()}, device,
                              repeats=args.repeats, calls_per_sample=1, warmup=1)
        peer = summarize(samples[next(iter(cases))])["median_s"]
        for name, times in samples.items():
            s = summarize(times)
            model = "AutoencoderKL" if part == "kl" else f"VQ {VQ_QUANTIZER['codebook_size']}x{VQ_QUANTIZER['code_dim']} l2"
            rows.append({"part": part, "workload": f"{model} {KL_CHANNELS} {args.kl_size}px, {phase}",
                         "variant": name, "batch": KL_BATCH, **s, "ms": s["median_s"] * 1e3,
                         "images_per_s": KL_BATCH / s["median_s"], "x_baseline": peer / s["median_s"],
                         "peak_MB": meters[name].peak / 2**20, "gflop": flops[name] / 1e9,
                         "gflop_per_s": flops[name] / 1e9 / s["median_s"]})
    return rows


# ---------------------------------------------------------------- whole epochs, data included


def plain_epoch(cfg, images_u8: torch.Tensor, device):
    """The lecture's loop: shuffled batches of the in-memory tensor, eager fp32, Adam; images/s."""
    model = build_model(cfg).to(device).train()
    optimizer = build_optimizer(cfg, model.parameters())
    images = images_u8.to(device)
    batch = cfg.data.batch_size

    def epoch() -> float:
        start = time.perf_counter()
        order = torch.randperm(len(images), device=device)
        for b in range(len(images) // batch):
            lecture_step(cfg, model, optimizer, images[order[b * batch:(b + 1) * batch]].float() / 255)
        return (len(images) // batch) * batch / (time.perf_counter() - start)

    return epoch


def fit_epoch(overrides: list[str], tmp: Path, device):
    """One epoch of `Trainer.fit()` in a fresh run folder: (images/s from metrics.jsonl, wall s)."""
    runs = iter(range(10**6))

    def epoch() -> tuple[float, float]:
        reset_accelerate_state()
        out = tmp / f"run{next(runs)}"
        start = time.perf_counter()
        Trainer(load_config(ROOT / "configs" / "mnist.yaml", [*overrides, "train.epochs=1", f"out_dir={out}",
                                                                f"train.cpu={device.type == 'cpu'}"])).fit()
        wall = time.perf_counter() - start
        return read_records(out)[-1]["images_per_sec"], wall

    return epoch


LOOP_VARIANTS = {
    "fit data.loader=torch contiguous fp32 (0.1 defaults)": ["train.mixed_precision=no", "data.loader=torch",
                                                              "train.memory_format=contiguous"],
    "fit defaults fp32 (in-memory loader, channels_last)": ["train.mixed_precision=no"],
}


def loop_variants(device) -> dict[str, list[str]]:
    """The fit() variants; and the shipped config as it is where train.mixed_precision=auto picks
    something other than fp32 on this machine (bf16 on a CPU with avx512_bf16 / a recent GPU)."""
    chosen, why = precision.choose("auto", device.type)
    if chosen == "no":
        return LOOP_VARIANTS
    return {**LOOP_VARIANTS, f"fit as shipped: {chosen} ({why})": []}


def run_loop(args, device, tmp: Path) -> list[dict]:
    print("mnist epochs: plain loop vs Trainer.fit() (data loading included)...", flush=True)
    cfg = load_config(ROOT / "configs" / "mnist.yaml", ["train.mixed_precision=no"])
    train_set, _ = build_datasets(cfg.data)
    plain = plain_epoch(cfg, train_set.images, device)
    os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars between the tables
    fits = {name: fit_epoch(extra, tmp / f"loop{i}", device)
            for i, (name, extra) in enumerate(loop_variants(device).items())}
    results = {name: [] for name in [BASELINE + " loop", *fits]}
    walls = {name: [] for name in fits}
    plain()  # warm-up
    for r in range(args.loop_repeats):
        names = list(results)
        for name in names[r % len(names):] + names[:r % len(names)]:  # interleaved, rotated
            if name in fits:
                rate, wall = fits[name]()
                results[name].append(rate)
                walls[name].append(wall)
            else:
                results[name].append(plain())
    base = statistics.median(results[BASELINE + " loop"])
    rows = []
    for name, rates in results.items():
        rate = statistics.median(rates)
        rows.append({"part": "loop", "workload": "mnist conv_vae, 4,500 images", "variant": name,
                     "batch": cfg.data.batch_size, "images_per_s": rate, "min_images_per_s": min(rates),
                     "max_images_per_s": max(rates), "x_baseline": rate / base,
                     "fit_wall_s": statistics.median(walls[name]) if name in walls else None})
    return rows


def main(argv=None) -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="*", default=["step", "loop"], choices=["step", "loop", "kl", "vq"])
    parser.add_argument("--kl-size", type=int, default=64, help="image size of the kl rows (256: kl-f8's, a GPU's)")
    parser.add_argument("--kl-modes", nargs="*", default=["eager"], choices=["eager", "compiled"],
                        help="kl rows: eager, and train.compile=true (minutes of compilation on a CPU)")
    parser.add_argument("--phases", nargs="*", default=["before", "after"], choices=["before", "after"],
                        help="kl / vq rows: before disc_start, after it")
    parser.add_argument("--lpips-weights", default="", help="LPIPS's VGG weights (default: the torch hub cache, "
                                                            "else random weights of the same shape)")
    parser.add_argument("--steps", type=int, default=3, help="training steps per timing sample")
    parser.add_argument("--loop-repeats", type=int, default=3, help="epochs per loop variant")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS)[:2], choices=list(WORKLOADS))
    parser.add_argument("--ops", nargs="*", choices=["eager", "compiled", "triton"],
                        help="train.ops modes (default: eager, compiled and triton on CUDA; eager on a CPU, where "
                             "the Triton kernels only run under the interpreter)")
    parser.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--formats", nargs="*", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--modes", nargs="*", default=["eager", "compiled"], choices=["eager", "compiled"],
                        help="the step as it is, and under train.compile=true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.ops = args.ops or (["eager", "compiled", "triton"] if device.type == "cuda" else ["eager"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="fastvae-bench-") as tmp:
        if "step" in args.parts:
            rows += run_steps(args, device, Path(tmp))
        if "loop" in args.parts:
            rows += run_loop(args, device, Path(tmp))
        for part in [p for p in ("kl", "vq") if p in args.parts]:
            rows += run_kl(args, device, Path(tmp), part)
    print()
    steps = [r for r in rows if r["part"] == "step"]
    if steps:
        print(f"step, device {device}: {args.repeats} interleaved repeats x {args.steps} steps, median")
        print_table(steps, [("workload", "workload", ""), ("variant", "variant", ""), ("batch", "batch", "d"),
                            ("ms", "step ms", ".1f"), ("images_per_s", "images/s", ".0f"),
                            ("x_baseline", "x plain", ".2f"), ("peak_MB", "peak MB", ".0f")])
    kls = [r for r in rows if r["part"] in ("kl", "vq")]
    if kls:
        print(f"\nautoencoder steps (kl, vq), device {device}: {args.repeats} interleaved repeats, median; x plain: the "
              f"plain step of the same phase")
        print_table(kls, [("workload", "workload", ""), ("variant", "variant", ""), ("ms", "step ms", ".0f"),
                          ("images_per_s", "images/s", ".1f"), ("x_baseline", "x plain", ".2f"),
                          ("gflop", "GFLOP", ".0f"), ("gflop_per_s", "GFLOP/s", ".0f"), ("peak_MB", "peak MB", ".0f")])
    loops = [r for r in rows if r["part"] == "loop"]
    if loops:
        print(f"\nloop, device {device}: {args.loop_repeats} interleaved epochs each, median images/s")
        for r in loops:
            r["wall"] = "" if r["fit_wall_s"] is None else f"{r['fit_wall_s']:.1f}"
        print_table(loops, [("variant", "variant", ""), ("images_per_s", "images/s", ".0f"),
                            ("min_images_per_s", "min", ".0f"), ("max_images_per_s", "max", ".0f"),
                            ("x_baseline", "x plain loop", ".2f"), ("wall", "fit() wall s", "")])
    write_json(args.json, {"benchmark": "train_throughput", "device": str(device), "repeats": args.repeats,
                           "steps_per_sample": args.steps, "loop_repeats": args.loop_repeats,
                           "baseline": BASELINE, "results": rows})


if __name__ == "__main__":
    main()
