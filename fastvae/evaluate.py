"""Numbers to compare VAEs by: test ELBO, importance-weighted log-likelihood, active units, PSNR.

    python -m fastvae.evaluate --checkpoint CKPT [--split test] [--iwae-samples 1000]
                               [--max-images N] [--json PATH] [data.key=value ...]

Likelihoods (nats per image; bits/dim = nats / (pixels * ln 2)):
- Bernoulli decoder (loss.recon=bce): log p(x|z) = -BCE(logits, x), summed over
  pixels, on the intensities as trained (exact for binary images; `--binarize`
  thresholds at 0.5 first, as in the binarized-MNIST literature).
- Gaussian decoder (loss.recon=mse; and the latent-diffusion autoencoder, whose decoder draws
  its images itself, `model.images`): p(x|z) = N(x; sigmoid(logits), s2 I) with a
  fixed variance s2 (`--gaussian-var`, default 0.5). With s2 = 1/2 the training
  loss sum (sigmoid(logits) - x)^2 is exactly -log p(x|z) minus the constant
  (pixels / 2) * log(pi), so the ELBO here is the training objective, normalized.
  `--gaussian-var fit` (the default for loss.sigma=optimal runs, the calibrated
  decoder): s2 is the maximum-likelihood variance of the evaluated images, their
  mean squared error at the ELBO's samples (a first pass), floored as in training.

IWAE (Burda et al. 2015): log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),
z_k ~ q(z|x); K = 1 is a one-sample ELBO. Each sample's eps is keyed by (seed, k,
image index) and samples are decoded in chunks with a running logsumexp in
float64, so memory is bounded and the chunk size does not change the result.

Under `accelerate launch -m fastvae.evaluate` every process evaluates a contiguous
share of the images and the sums are all-reduced: the report is the one a single
process writes (to float rounding), and only the main process writes it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from torch.utils.data import Subset

from fastvae import losses, noise
from fastvae.commands import evaluate_parser
from fastvae.data import in_order_loader
from fastvae.distributed import gather_rows, sum_over_processes
from fastvae.errors import UserError, exit_on_user_error

LOG_2PI = math.log(2 * math.pi)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: Cov_x(E_q[z_u]) > 0.01
SAMPLE_STREAM = 2**31 - 1  # the noise stream of FID's prior samples (IWAE's draws use streams 0..K)


@dataclass(frozen=True)
class Likelihood:
    kind: str  # bce | mse
    gaussian_var: float | None = 0.5  # None: fitted to the evaluated images (evaluate_model)
    normalized: bool = True  # False: minus the training reconstruction loss (no Gaussian constant)
    fitted: bool = False  # gaussian_var was fitted to the evaluated images

    @classmethod
    def of_run(cls, loss, gaussian_var: float | None | str = "run", normalized: bool = True) -> "Likelihood":
        """The decoder's likelihood for a run's loss.* settings: its variance fitted for the calibrated
        decoder (loss.sigma=optimal), else 0.5, unless `gaussian_var` (a value, or None: fitted) says."""
        fitted = loss.recon == "mse" and loss.sigma == "optimal"
        if gaussian_var == "run":
            gaussian_var = None if fitted else 0.5
        from fastvae.objectives import objective_class

        return cls(objective_class(loss).likelihood_kind(loss), gaussian_var, normalized or fitted)

    def log_prob(self, output: torch.Tensor, x: torch.Tensor, images=torch.sigmoid) -> torch.Tensor:
        """log p(x|z) per image [N], float64, of the decoder's output (bce: logits; mse: `images`
        of it, the model's own mapping to [0, 1])."""
        output, x = output.double(), x.double()
        if self.kind == "bce":
            return -losses.reconstruction_loss(output, x, "bce")
        sq = (images(output) - x).pow(2).flatten(1).sum(1)  # sum of squared errors: the training loss
        if not self.normalized:
            return -sq
        var = self.gaussian_var
        return -(sq / (2 * var) + 0.5 * x[0].numel() * math.log(2 * math.pi * var))


def eval_noise(seed: int, sample_ids: torch.Tensor, dim: int, draw: int) -> torch.Tensor:
    """eps [B, dim] (float64) of draw `draw` (0: the ELBO's, 1..K: importance samples) for these
    samples: keyed by (seed, draw, sample id) as in training (fastvae.noise), so any chunking of the
    draws and any split of the images over processes give the same numbers."""
    offsets = noise.row_offsets(sample_ids, dim, draw)
    return noise.keyed_normal(seed, offsets, dim, torch.float64)


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, likelihood: Likelihood, k: int, chunk: int, seed: int = 0,
               sample_ids: torch.Tensor | None = None, condition: torch.Tensor | None = None) -> torch.Tensor:
    """Importance-weighted bound on log p(x) per image [B] (log p(x | condition) for a conditional
    model), float64."""
    mu, logvar = (t.double() for t in model.encode_with(x, condition))
    ids = (sample_ids if sample_ids is not None else torch.arange(len(x))).to(mu.device)
    running = torch.full((len(x),), -math.inf, dtype=torch.float64, device=mu.device)
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        eps = torch.stack([eval_noise(seed, ids, mu.shape[1], 1 + start + i) for i in range(c)])
        z = losses.reparameterize(mu, logvar, eps)  # [c, B, D]
        logits = model.decode_with(z.reshape(c * len(x), -1).to(next(model.parameters()).dtype),
                                   None if condition is None else condition.repeat(c, 1))
        log_px = likelihood.log_prob(logits, x.repeat(c, *([1] * (x.ndim - 1))), model.images).view(c, len(x))
        log_w = losses.importance_log_weights(log_px, z, mu, logvar)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
    return running - math.log(k)


@dataclass(frozen=True)
class ImageQuality:
    """Reconstruction metrics beside the likelihood, on z = mu's images against the originals in [0, 1]:
    SSIM (torchmetrics: Gaussian window 11, sigma 1.5, data_range 1.0, averaged over the whole image,
    torchmetrics >= 1.4.2's way; skimage and pytorch-msssim average the valid region only) and LPIPS
    (fastvae.perceptual: lpips's heads, the backbone from the hub cache or a path, on [-1, 1])."""

    ssim: bool = False
    lpips: torch.nn.Module | None = None

    def measure(self, images: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(SSIM, LPIPS) per image [B] in float64 (zeros where not asked)."""
        zeros = torch.zeros(len(x), dtype=torch.float64, device=x.device)
        ssim = lpips = zeros
        if self.ssim:
            try:
                from torchmetrics.functional.image import structural_similarity_index_measure
            except ImportError as err:
                raise UserError(f"--ssim needs torchmetrics ({err}); expected `pip install 'fastvae[metrics]'`") \
                    from None

            ssim = structural_similarity_index_measure(images.float(), x.float(), data_range=1.0,
                                                       reduction="none").double()
        if self.lpips is not None:
            from fastvae.perceptual import lpips_distance

            lpips = lpips_distance(self.lpips, images * 2 - 1, x * 2 - 1).double()
        return ssim, lpips


class EvalSums:
    """What the report is made of, as one float64 vector: summed over batches, then over processes."""

    SCALARS = ("recon", "kl", "iwae", "sq_err", "images", "ssim", "lpips")

    def __init__(self, latent_dim: int, device) -> None:
        self.d = latent_dim
        self.values = torch.zeros(len(self.SCALARS) + 3 * latent_dim, dtype=torch.float64, device=device)

    def add(self, recon, kl_per_dim, iwae, sq_err, mu, ssim, lpips) -> None:
        self.values += torch.cat([torch.stack([recon.sum(), kl_per_dim.sum(), iwae.sum(), sq_err.sum(),
                                               torch.tensor(float(len(mu)), dtype=torch.float64, device=mu.device),
                                               ssim.sum(), lpips.sum()]),
                                  kl_per_dim.sum(0), mu.sum(0), (mu * mu).sum(0)])

    def scalar(self, name: str) -> float:
        return self.values[self.SCALARS.index(name)].item()

    def per_dim(self, block: int) -> torch.Tensor:
        start = len(self.SCALARS) + block * self.d
        return self.values[start:start + self.d].cpu()


def shard_of(total: int, shard: tuple[int, int]) -> list[int]:
    """The positions one process evaluates: a contiguous share of the first `total` images."""
    rank, world = shard
    return torch.tensor_split(torch.arange(total), world)[rank].tolist()


def evaluate_model(model, dataset, likelihood: Likelihood, iwae_samples: int = 0, chunk: int = 100,
                   max_images: int | None = None, binarize: bool = False, seed: int = 0,
                   batch_size: int = 100, progress: bool = False, shard: tuple[int, int] = (0, 1),
                   all_reduce=None, conditioning=None, quality: ImageQuality = ImageQuality(),
                   features=None, all_gather=None) -> dict:
    """All metrics over (up to max_images of) a dataset; see the module docstring for definitions.
    With several processes each evaluates its `shard` (rank, world size) and `all_reduce` (a sum
    over processes) makes every process's report that of the whole split. conditioning: a
    conditional model's (fastvae.conditions, bound to this dataset). features: a
    fastvae.fid.FeatureSets for FID/KID, whose features `all_gather` joins over processes."""
    if likelihood.kind == "mse" and likelihood.gaussian_var is None:
        likelihood = fitted_likelihood(model, dataset, max_images, binarize, seed, batch_size, shard, all_reduce,
                                       conditioning)
    sums, pixels = evaluate_sums(model, dataset, likelihood, iwae_samples, chunk, max_images, binarize, seed,
                                 batch_size, progress, shard, conditioning, quality, features)
    if all_reduce is not None:
        sums.values = all_reduce(sums.values)
    report = report_of(sums, pixels, likelihood, binarize, iwae_samples, quality)
    if features is not None:
        total = min(len(dataset), max_images or len(dataset))
        if features.fid:
            add_sample_features(model, dataset, total, features, seed, batch_size, shard, conditioning, progress)
        report.update(features.report(all_gather, shard[0] == 0))
    return report


@torch.no_grad()
def add_sample_features(model, dataset, total: int, features, seed: int, batch_size: int, shard, conditioning,
                        progress: bool = False) -> None:
    """FID's prior samples (features.num_samples, default one per evaluated image): sample i decodes
    z ~ N(0, I) keyed by (seed, SAMPLE_STREAM, i), so any split over processes draws the same images;
    a conditional model's sample i has the condition of test image i mod total."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    samples = features.num_samples or total
    positions = shard_of(samples, shard)
    bar = tqdm(total=samples, desc="FID samples", unit="img",
               disable=not progress or shard[0] != 0)
    done = 0
    for _, labels, sample_ids in in_order_loader(Subset(dataset, [p % total for p in positions]), batch_size):
        ids = torch.tensor(positions[done:done + len(sample_ids)], device=device)
        c = None if conditioning is None else conditioning.of_batch(torch.as_tensor(labels).to(device),
                                                                      torch.as_tensor(sample_ids).to(device))
        z = eval_noise(seed, ids, model.latent_dim, SAMPLE_STREAM)
        features.add("samples", model.images(model.decode_with(z.to(dtype), c).double()))
        done += len(ids)
        bar.update(len(ids) * shard[1])
    bar.close()


def fitted_likelihood(model, dataset, max_images, binarize, seed, batch_size, shard, all_reduce,
                      conditioning=None) -> Likelihood:
    """The Gaussian likelihood whose variance fits these images best: their mean squared error per
    value at the ELBO's samples (the calibrated decoder's variance, over the split, not a batch)."""
    sums, pixels = evaluate_sums(model, dataset, Likelihood("mse", normalized=False), 0, 1, max_images, binarize, seed,
                                 batch_size, False, shard, conditioning)
    if all_reduce is not None:
        sums.values = all_reduce(sums.values)
    mean_sq_err = torch.tensor(sums.scalar("recon") / (sums.scalar("images") * pixels), dtype=torch.float64)
    return Likelihood("mse", losses.optimal_variance(mean_sq_err).item(), fitted=True)


@torch.no_grad()
def evaluate_sums(model, dataset, likelihood: Likelihood, iwae_samples: int, chunk: int, max_images: int | None,
                  binarize: bool, seed: int, batch_size: int, progress: bool,
                  shard: tuple[int, int], conditioning=None,
                  quality: ImageQuality = ImageQuality(), features=None) -> tuple[EvalSums, int]:
    """(the sums of this process's share of the images, pixels per image)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = min(len(dataset), max_images or len(dataset))
    sums, pixels = EvalSums(model.latent_dim, device), None
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress or shard[0] != 0)
    for x, labels, sample_ids in in_order_loader(Subset(dataset, shard_of(total, shard)), batch_size):
        x, sample_ids, pixels = x.to(device), torch.as_tensor(sample_ids).to(device), x[0].numel()
        if binarize:
            x = (x > 0.5).to(x.dtype)
        c = None if conditioning is None else conditioning.of_batch(torch.as_tensor(labels).to(device), sample_ids)
        mu, logvar = (t.double() for t in model.encode_with(x, c))
        z = losses.reparameterize(mu, logvar, eval_noise(seed, sample_ids, mu.shape[1], 0))
        recon = -likelihood.log_prob(model.decode_with(z.to(dtype), c), x, model.images)
        images = model.images(model.decode_with(mu.to(dtype), c).double())
        sq_err = (images - x.double()).pow(2).flatten(1).sum(1)
        iwae = (iwae_bound(model, x, likelihood, iwae_samples, chunk, seed, sample_ids, c) if iwae_samples
                else torch.zeros(len(x), dtype=torch.float64, device=device))
        sums.add(recon, losses.kl_divergence_per_dim(mu, logvar), iwae, sq_err, mu, *quality.measure(images, x))
        if features is not None:
            features.add("real", x)
            features.add("reconstructions", images)
        bar.update(len(x) * shard[1])
    bar.close()
    return sums, pixels or dataset[0][0].numel()  # (a process whose share was empty reads one image)


def report_of(sums: EvalSums, pixels: int, likelihood: Likelihood, binarize: bool, iwae_samples: int,
              quality: ImageQuality = ImageQuality()) -> dict:
    n = sums.scalar("images")
    mu_sum, mu_sq = sums.per_dim(1), sums.per_dim(2)
    activity = (mu_sq - mu_sum * mu_sum / n) / (n - 1) if n > 1 else torch.zeros_like(mu_sum)  # unbiased Var_x
    mse = sums.scalar("sq_err") / (n * pixels)
    elbo = -(sums.scalar("recon") + sums.scalar("kl")) / n
    to_bits = 1.0 / (pixels * math.log(2))
    out = {
        "images": int(n), "pixels_per_image": pixels, "likelihood": likelihood.kind,
        "gaussian_var": likelihood.gaussian_var if likelihood.kind == "mse" else None,
        "gaussian_var_fitted": likelihood.fitted, "binarized": binarize,
        "elbo_nats": elbo, "elbo_bits_per_dim": elbo * to_bits,
        "recon_nll_nats": sums.scalar("recon") / n, "kl_nats": sums.scalar("kl") / n,
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()), "latent_dim": sums.d,
        "unit_activity": activity.tolist(), "kl_per_dim_nats": (sums.per_dim(0) / n).tolist(),
        "recon_mse": mse, "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else math.inf,
    }
    if quality.ssim:
        out["ssim"] = sums.scalar("ssim") / n
    if quality.lpips is not None:
        out["lpips"] = sums.scalar("lpips") / n
    if iwae_samples:
        nll = -sums.scalar("iwae") / n
        out.update({"iwae_samples": iwae_samples, "iwae_log_likelihood_nats": -nll, "iwae_nll_nats": nll,
                    "iwae_nll_bits_per_dim": nll * to_bits})
    return out


def print_report(report: dict) -> None:
    rows = [("images", f"{report['images']}"),
            ("ELBO (nats/image)", f"{report['elbo_nats']:.2f}"),
            ("  reconstruction NLL", f"{report['recon_nll_nats']:.2f}"),
            ("  KL", f"{report['kl_nats']:.2f}"),
            ("ELBO (bits/dim)", f"{report['elbo_bits_per_dim']:.4f}")]
    if report["gaussian_var"] is not None:
        fitted = " (fitted)" if report["gaussian_var_fitted"] else ""
        rows.append((f"  Gaussian variance{fitted}", f"{report['gaussian_var']:.5g}"))
    if "iwae_nll_nats" in report:
        rows += [(f"IWAE NLL, K={report['iwae_samples']} (nats)", f"{report['iwae_nll_nats']:.2f}"),
                 ("IWAE NLL (bits/dim)", f"{report['iwae_nll_bits_per_dim']:.4f}")]
    rows += [("active units", f"{report['active_units']} / {report['latent_dim']}"),
             ("reconstruction MSE", f"{report['recon_mse']:.5f}"),
             ("PSNR (dB)", f"{report['psnr_db']:.2f}")]
    rows += [(name, f"{report[key]:.4f}") for key, name in (("ssim", "SSIM"), ("lpips", "LPIPS")) if key in report]
    for key, what in (("fid", "samples"), ("rfid", "reconstructions")):
        if key in report:
            counts = f"{report[key + '_images']} {what} vs {report['fid_real_images']} images"
            rows.append((f"{key[:-3]}FID ({counts})", f"{report[key]:.3f}"))
            if f"{key[:-3]}kid_mean" in report:
                rows.append((f"{key[:-3]}KID (subsets of {report[key[:-3] + 'kid_subset_size']})",
                             f"{report[key[:-3] + 'kid_mean']:.5f} +- {report[key[:-3] + 'kid_std']:.5f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def log_to_wandb(report: dict, vae) -> None:
    """The evaluation as its own W&B run (RUN-eval, job type eval) beside the training run: same
    project, entity, group and tags, files in the run's folder (or $WANDB_DIR)."""
    import wandb

    from fastvae.config import flatten
    from fastvae.tracking import check_wandb_ready, new_run_id, wandb_init_args

    check_wandb_ready()
    init = wandb_init_args(vae.cfg.wandb, vae.run_dir, new_run_id())
    init.pop("resume")
    init["name"] = f"{init['name']}-eval"
    run = wandb.init(**init, job_type="eval", config=flatten(vae.cfg))
    run.log({f"eval/{k}": v for k, v in report.items() if isinstance(v, (int, float)) and v is not None})
    run.finish()


def parse_args(argv):
    return evaluate_parser().parse_args(argv)


def launched_processes(device: str | None):
    """accelerate's PartialState when `accelerate launch` started several processes (each then
    evaluates a share), else None. On the CPU (or --device cpu) the processes talk over gloo."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


def fid_features(args, vae, split_size: int):
    """--fid / --rfid: the Inception network and what to compare; the real images' features cached in the
    run's folder, keyed by everything that changes them (data set, split, count, weights)."""
    if not (args.fid or args.rfid):
        if args.kid or args.num_samples:
            raise UserError("--kid and --num-samples go with --fid or --rfid; expected one of them too")
        return None
    from fastvae.fid import FeatureSets, load_inception, real_features_file

    if args.num_samples is not None and args.num_samples < 2:
        raise UserError(f"--num-samples {args.num_samples}: expected at least 2")
    inception, sha = load_inception(args.inception_weights or "", vae.device)
    total = min(split_size, args.max_images or split_size)
    cache = real_features_file(vae.run_dir, vae.cfg.data, args.split, total, args.binarize, sha)
    return FeatureSets(inception, sha, args.fid, args.rfid, args.kid, args.num_samples, args.kid_subsets,
                       args.kid_subset_size, cache)


def image_lpips(args, vae):
    """--lpips: the run's LPIPS settings (loss.lpips_net, loss.lpips_weights) unless --lpips-weights says."""
    if not args.lpips:
        return None
    from fastvae.perceptual import load_lpips

    return load_lpips(vae.cfg.loss.lpips_net, args.lpips_weights or vae.cfg.loss.lpips_weights).to(vae.device)


@exit_on_user_error
def main(argv=None) -> dict:
    from fastvae.loading import load
    from fastvae.config import loggers

    args = parse_args(argv)
    if not 0 <= args.iwae_samples <= 5000:
        raise UserError(f"--iwae-samples {args.iwae_samples}: expected 0 to 5000")
    if args.chunk < 1 or not (args.gaussian_var in (None, "fit") or args.gaussian_var > 0) or (args.max_images is not None and args.max_images < 1):
        raise UserError("--chunk, --gaussian-var and --max-images: expected positive values")
    state = launched_processes(args.device)
    device = args.device if state is None else "cpu" if state.device.type == "cpu" else str(state.device)
    vae = load(args.checkpoint, device, args.overrides, args.trust_model, args.ema)
    variance = {None: "run", "fit": None}.get(args.gaussian_var, args.gaussian_var)  # not given; fitted; a number
    likelihood = Likelihood.of_run(vae.cfg.loss, variance)
    shard, all_reduce = ((state.process_index, state.num_processes), sum_over_processes) if state else ((0, 1), None)
    quality = ImageQuality(args.ssim, image_lpips(args, vae))
    dataset = vae.split(args.split)
    report = evaluate_model(vae.model, dataset, likelihood, args.iwae_samples, args.chunk,
                            args.max_images, args.binarize, args.seed, progress=True, shard=shard,
                            all_reduce=all_reduce, conditioning=vae.conditioning_for(args.split), quality=quality,
                            features=fid_features(args, vae, len(dataset)), all_gather=gather_rows if state else None)
    report.update({"checkpoint": str(vae.path), "split": args.split, "step": vae.meta["step"],
                   "processes": shard[1]})
    if shard[0] != 0:
        return report
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"fastvae: wrote {args.json}")
    if args.wandb if args.wandb is not None else "wandb" in loggers(vae.cfg):
        log_to_wandb(report, vae)
    return report


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every process's report is written: leave cleanly
        from fastvae.distributed import leave_launched_process

        leave_launched_process(0)
