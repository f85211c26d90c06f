"""What a run reports besides its training loss: per-epoch test metrics and its pictures."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastvae import pictures, sampling
from fastvae.conditions import conditioning_of
from fastvae.config import Config
from fastvae.errors import UserError
from fastvae.evaluation import Likelihood, evaluate_model
from fastvae.objectives import objective_class


EPOCH_IMAGES = 2000  # test images behind each epoch's metrics and pictures
FINAL_IMAGES = 5000  # test images in the final latent scatter: the most any report reads


def held_out_metrics(model, test_set, cfg: Config, max_images: int = EPOCH_IMAGES, shard=(0, 1),
                     all_reduce=None, objective=None) -> dict:
    """The test loss in training units (same weights, no Gaussian constant; the calibrated decoder's
    normalized likelihood, its variance fitted to these images), from fastvae.evaluation, each process
    evaluating its shard. An objective that measures its own (LDM's: its nll with LPIPS and the
    log-variance, + beta x KL, without the adversarial term) gives test_loss, taken in the same pass
    on the same samples. Its eps are keyed (fastvae.noise): the global RNG, which resume restores, is
    untouched."""
    own = own_test_loss(objective, cfg, next(model.parameters()).device)
    report = evaluate_model(model, test_set, Likelihood.of_run(cfg.loss, normalized=False), max_images=max_images,
                            seed=cfg.seed + 1, shard=shard, all_reduce=all_reduce,
                            conditioning=test_conditioning(cfg, test_set), objective_loss=own)
    recon, kl = report["recon_nll_nats"], report["kl_nats"]
    test_loss = report["objective_loss"] if own else objective_class(cfg.loss).held_out_loss(cfg.loss, recon, kl)
    model.train()
    codes = {f"test_{k}": report[k] for k in ("codebook_usage", "codebook_perplexity") if k in report}
    return {"test_recon": recon, "test_kl": kl, "test_loss": test_loss,
            "test_active_units": report["active_units"], **codes}


def own_test_loss(objective, cfg: Config, device):
    """evaluate_model's objective_loss for an objective that measures its own test loss (no critic: the
    adversarial term is not a loss on test images); else None."""
    if objective is None or not objective.measures_test_loss:
        return None
    beta = torch.tensor(cfg.loss.beta, device=device)
    return lambda model, x, latent, output: objective(model, x, latent, output, beta).loss


@torch.no_grad()
def write_pictures(model, test_set, cfg: Config, device, folder: Path,
                   max_images: int = FINAL_IMAGES) -> dict[str, Path]:
    """Prior samples, reconstructions and the latent scatter, as PNGs in `folder`."""
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    conditioning = test_conditioning(cfg, test_set)
    mu_all, label_all = sampling.encode_dataset(model, test_set, device, max_images, conditioning)
    items = [test_set[i] for i in pictures.spread_indices(len(test_set), 40)]
    originals = torch.stack([item[0] for item in items])
    conditions = None if conditioning is None else conditioning.of_items(items)
    title = f"Latent means of {len(mu_all)} test images ({cfg.data.name}), colored by label"
    written = {
        "samples": save_samples(model, test_set, cfg, device, folder / "samples.png", conditioning),
        "reconstructions": pictures.save_reconstruction_grid(
            originals, sampling.reconstruct_images(model, originals.to(device), conditions),
            folder / "reconstructions.png"),
        "latent_scatter": pictures.save_latent_scatter(mu_all, label_all, folder / "latent_scatter.png", title),
    }
    model.train()
    return written


def test_conditioning(cfg: Config, test_set):
    """A conditional model's conditioning bound to the test images; else None."""
    conditioning = conditioning_of(cfg.model)
    return None if conditioning is None else conditioning.for_dataset(test_set)


def save_samples(model, test_set, cfg: Config, device, path: Path, conditioning) -> Path:
    """Prior samples; a conditional model's one row per class, or given the attributes of test images."""
    n, seed = cfg.train.samples, cfg.seed
    if conditioning is None:
        return pictures.save_sample_grid(sampling.prior_samples(model, n, seed, device), path, model.latent_dim, seed)
    return sampling.save_conditional_samples(model, conditioning, test_set, n, seed, device, path,
                                             f"latent dim {model.latent_dim}, seed {seed}")


@dataclass(frozen=True)
class QualityNetworks:
    """The frozen networks behind eval.metrics, loaded once at set-up (a missing weights file is one line
    before training starts, not after the first epoch)."""

    inception: torch.nn.Module | None = None
    inception_sha: str = ""
    lpips: torch.nn.Module | None = None

    @classmethod
    def of(cls, cfg: Config, device) -> "QualityNetworks | None":
        if not cfg.eval.fid_every:
            return None
        metrics = set(cfg.eval.metrics)
        inception, sha, lpips = None, "", None
        if metrics & {"fid", "rfid"}:
            from fastvae.fid import load_inception

            inception, sha = load_inception(cfg.eval.inception_weights, device, "eval.inception_weights")
        elif "kid" in metrics:
            raise UserError("config key 'eval.metrics': kid is computed beside fid or rfid; expected one of them too")
        if "lpips" in metrics:
            from fastvae.perceptual import load_lpips

            lpips = load_lpips(cfg.loss.lpips_net, cfg.loss.lpips_weights).to(device)
        if "ssim" in metrics:
            try:
                import torchmetrics  # noqa: F401
            except ImportError:
                raise UserError("eval.metrics has ssim but torchmetrics is not installed; expected "
                                "`pip install 'fastvae[metrics]'`") from None
        return cls(inception, sha, lpips)


def quality_due(cfg: Config, epochs_done: int) -> bool:
    return bool(cfg.eval.fid_every) and epochs_done % cfg.eval.fid_every == 0


def image_quality(model, test_set, cfg: Config, networks: QualityNetworks, out_dir: Path, shard=(0, 1),
                  all_reduce=None, all_gather=None) -> dict:
    """eval.metrics of eval.images test images (and as many prior samples), every process its share:
    PSNR always; FID / rFID / KID against the test images' features, cached in out_dir after the first."""
    from fastvae.evaluation import ImageQuality
    from fastvae.fid import FeatureSets, pixels_digest, real_features_file

    metrics, total = set(cfg.eval.metrics), min(cfg.eval.images, len(test_set))
    features = None
    if networks.inception is not None:
        pixels = pixels_digest(test_set, total, False, shard, all_gather)
        cache = real_features_file(out_dir, cfg.data, "test", total, False, networks.inception_sha, pixels)
        features = FeatureSets(networks.inception, networks.inception_sha, "fid" in metrics, "rfid" in metrics,
                               "kid" in metrics, cache_file=cache, real_images=total)
    report = evaluate_model(model, test_set, Likelihood.of_run(cfg.loss), max_images=total, seed=cfg.seed + 2,
                            shard=shard, all_reduce=all_reduce, conditioning=test_conditioning(cfg, test_set),
                            quality=ImageQuality("ssim" in metrics, networks.lpips), features=features,
                            all_gather=all_gather)
    model.train()
    keys = ("psnr_db", "ssim", "lpips", "fid", "fid_images", "rfid", "rfid_images", "kid_mean", "kid_std",
            "rkid_mean", "rkid_std", "fid_real_images")
    return {f"test_{k}": report[k] for k in keys if k in report}
