"""Evaluation as a library: the decoder's likelihood, the test ELBO and importance-weighted bound,
active units, PSNR and the image-quality metrics' plumbing, over one process's share of a split with
sums all-reduced (`evaluate_model`). The command line (`python -m fastvae.evaluate`, fastvae/evaluate.py)
and training's per-epoch and final metrics (fastvae/reports.py, fastvae/trainer.py) call these; the
docstring of fastvae/evaluate.py says what each number is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import Subset
from tqdm.auto import tqdm

from fastvae import losses, noise
from fastvae.data import in_order_loader
from fastvae.errors import UserError
from fastvae.bottleneck import Latent
from fastvae.quantizers import code_statistics
from fastvae.sampling import random_latents

MAX_COUNTED_CODES = 1 << 20  # a tokenizer's code counts over an evaluation, when the codebook is at most this big

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

    SCALARS = ("recon", "kl", "iwae", "sq_err", "images", "ssim", "lpips", "objective")

    def __init__(self, latent_dim: int, device, codes: int = 0) -> None:
        self.d, self.codes = latent_dim, codes  # codes: a tokenizer's codebook size (its usage counted)
        self.values = torch.zeros(len(self.SCALARS) + 3 * latent_dim + codes, dtype=torch.float64, device=device)

    def add_codes(self, indices: torch.Tensor) -> None:
        self.values[-self.codes:] += torch.bincount(indices.flatten(), minlength=self.codes).double()

    def code_counts(self) -> torch.Tensor:
        return self.values[-self.codes:].cpu()

    def add(self, recon, kl_per_dim, iwae, sq_err, mu, ssim, lpips, objective) -> None:
        """objective: the batch's sum of the objective's own loss (evaluate_model's objective_loss; else 0)."""
        block = torch.cat([torch.stack([recon.sum(), kl_per_dim.sum(), iwae.sum(), sq_err.sum(),
                                        torch.tensor(float(len(mu)), dtype=torch.float64, device=mu.device),
                                        ssim.sum(), lpips.sum(), objective]), kl_per_dim.sum(0), mu.sum(0),
                           (mu * mu).sum(0)])
        self.values[:len(block)] += block

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
                   features=None, all_gather=None, objective_loss=None) -> dict:
    """All metrics over (up to max_images of) a dataset; see the module docstring for definitions.
    With several processes each evaluates its `shard` (rank, world size) and `all_reduce` (a sum
    over processes) makes every process's report that of the whole split. conditioning: a
    conditional model's (fastvae.conditions, bound to this dataset). features: a
    fastvae.fid.FeatureSets for FID/KID, whose features `all_gather` joins over processes.
    objective_loss: (model, x, latent, decoder output) -> a batch's mean loss, taken on the same
    samples as the ELBO's (reported as `objective_loss`, per image)."""
    if likelihood.kind == "mse" and likelihood.gaussian_var is None:
        likelihood = fitted_likelihood(model, dataset, max_images, binarize, seed, batch_size, shard, all_reduce,
                                       conditioning)
    sums, pixels = evaluate_sums(model, dataset, likelihood, iwae_samples, chunk, max_images, binarize, seed,
                                 batch_size, progress, shard, conditioning, quality, features, objective_loss)
    if all_reduce is not None:
        sums.values = all_reduce(sums.values)
    report = report_of(sums, pixels, likelihood, binarize, iwae_samples, quality)
    if objective_loss is not None:
        report["objective_loss"] = sums.scalar("objective") / sums.scalar("images")
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
        z = eval_noise(seed, ids, model.latent_dim, SAMPLE_STREAM) if model.bottleneck() is None else \
            torch.cat([random_latents(model, 1, torch.Generator().manual_seed(seed * 1_000_003 + int(i)))
                       for i in ids]).to(device)  # sample i's codes keyed by i: any split draws the same
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
                  quality: ImageQuality = ImageQuality(), features=None,
                  objective_loss=None) -> tuple[EvalSums, int]:
    """(the sums of this process's share of the images, pixels per image)."""
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    total = min(len(dataset), max_images or len(dataset))
    quantizer = model.bottleneck()
    codes = quantizer.codebook_size if quantizer is not None and quantizer.codebook_size <= MAX_COUNTED_CODES else 0
    sums, pixels = EvalSums(model.latent_dim, device, codes), None
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress or shard[0] != 0)
    for x, labels, sample_ids in in_order_loader(Subset(dataset, shard_of(total, shard)), batch_size):
        x, sample_ids, pixels = x.to(device), torch.as_tensor(sample_ids).to(device), x[0].numel()
        if binarize:
            x = (x > 0.5).to(x.dtype)
        c = None if conditioning is None else conditioning.of_batch(torch.as_tensor(labels).to(device), sample_ids)
        if quantizer is not None:  # a tokenizer: its quantized latent, no KL; its codes counted
            latent = quantizer(model.encode_with(x, c))
            mu = z = latent.z.flatten(1).double()
            kl_per_dim = torch.zeros_like(mu)
            if codes:
                sums.add_codes(latent.posterior)
        else:
            mu, logvar = (t.double() for t in model.encode_with(x, c))
            z = losses.reparameterize(mu, logvar, eval_noise(seed, sample_ids, mu.shape[1], 0))
            kl_per_dim = losses.kl_divergence_per_dim(mu, logvar)
            latent = Latent(z.to(dtype), kl_per_dim.sum(1).to(dtype), {}, (mu.to(dtype), logvar.to(dtype)))
        output = model.decode_with(z.to(dtype), c)
        recon = -likelihood.log_prob(output, x, model.images)
        mean_output = output if quantizer is not None else model.decode_with(mu.to(dtype), c)  # (a tokenizer's z is mu)
        images = model.images(mean_output.double())
        sq_err = (images - x.double()).pow(2).flatten(1).sum(1)
        iwae = (iwae_bound(model, x, likelihood, iwae_samples, chunk, seed, sample_ids, c) if iwae_samples
                else torch.zeros(len(x), dtype=torch.float64, device=device))
        own = objective_loss(model, x, latent, output).double() * len(x) if objective_loss is not None else \
            torch.zeros((), dtype=torch.float64, device=device)
        sums.add(recon, kl_per_dim, iwae, sq_err, mu, *quality.measure(images, x), own)
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
    if sums.codes:  # a tokenizer: its codebook's usage over these images
        stats = code_statistics(sums.code_counts())
        out.update({"codebook_size": sums.codes, "codebook_usage": float(stats["usage"]),
                    "codebook_perplexity": float(stats["perplexity"])})
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
    if "codebook_usage" in report:
        rows += [(f"codebook usage (of {report['codebook_size']:,} codes)", f"{report['codebook_usage']:.1%}"),
                 ("codebook perplexity", f"{report['codebook_perplexity']:.1f}")]
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
