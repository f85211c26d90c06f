"""Numbers to compare VAEs by: test ELBO, importance-weighted log-likelihood, active units, PSNR.

    python -m fastvae.evaluate --checkpoint CKPT [--split test] [--iwae-samples 1000]
                               [--max-images N] [--json PATH] [data.key=value ...]

Likelihoods (nats per image; bits/dim = nats / (pixels * ln 2)):
- Bernoulli decoder (loss.recon=bce): log p(x|z) = -BCE(logits, x), summed over
  pixels, on the intensities as trained (exact for binary images; `--binarize`
  thresholds at 0.5 first, as in the binarized-MNIST literature).
- Gaussian decoder (loss.recon=mse): p(x|z) = N(x; sigmoid(logits), s2 I) with a
  fixed variance s2 (`--gaussian-var`, default 0.5). With s2 = 1/2 the training
  loss sum (sigmoid(logits) - x)^2 is exactly -log p(x|z) minus the constant
  (pixels / 2) * log(pi), so the ELBO here is the training objective, normalized.

IWAE (Burda et al. 2015): log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k|x),
z_k ~ q(z|x); K = 1 is a one-sample ELBO. Samples come one per k from a seeded
generator and are decoded in chunks with a running logsumexp in float64, so
memory is bounded and the chunk size does not change the result.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastvae import losses
from fastvae.commands import evaluate_parser
from fastvae.data import in_order_loader
from fastvae.errors import UserError, exit_on_user_error

LOG_2PI = math.log(2 * math.pi)
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al.: Cov_x(E_q[z_u]) > 0.01


@dataclass(frozen=True)
class Likelihood:
    kind: str  # bce | mse
    gaussian_var: float = 0.5
    normalized: bool = True  # False: minus the training reconstruction loss (no Gaussian constant)

    def log_prob(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per image [N], float64."""
        logits, x = logits.double(), x.double()
        if self.kind == "bce":
            return -losses.reconstruction_loss(logits, x, "bce")
        sq = losses.reconstruction_loss(logits, x, "mse")  # sum of squared errors: the training loss
        if not self.normalized:
            return -sq
        var = self.gaussian_var
        return -(sq / (2 * var) + 0.5 * x[0].numel() * math.log(2 * math.pi * var))


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, exp(logvar)) summed over the last dim."""
    return -0.5 * (LOG_2PI + logvar + (z - mu) ** 2 / logvar.exp()).sum(-1)


@torch.no_grad()
def iwae_bound(model, x: torch.Tensor, likelihood: Likelihood, k: int, chunk: int,
               generator: torch.Generator) -> torch.Tensor:
    """Importance-weighted bound on log p(x) per image [B], float64."""
    mu, logvar = (t.double() for t in model.encode(x))
    running = torch.full((len(x),), -math.inf, dtype=torch.float64, device=mu.device)
    for start in range(0, k, chunk):
        c = min(chunk, k - start)
        # one draw per importance sample, in order: the same numbers whatever the chunk size
        eps = torch.stack([torch.randn(mu.shape, generator=generator, dtype=torch.float64) for _ in range(c)])
        z = losses.reparameterize(mu, logvar, eps.to(mu.device))  # [c, B, D]
        logits = model.decode(z.reshape(c * len(x), -1).to(next(model.parameters()).dtype))
        log_px = likelihood.log_prob(logits, x.repeat(c, *([1] * (x.ndim - 1)))).view(c, len(x))
        log_w = log_px + log_normal(z, torch.zeros_like(z), torch.zeros_like(z)) - log_normal(z, mu, logvar)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
    return running - math.log(k)


@torch.no_grad()
def evaluate_model(model, dataset, likelihood: Likelihood, iwae_samples: int = 0, chunk: int = 100,
                   max_images: int | None = None, binarize: bool = False, seed: int = 0,
                   batch_size: int = 100, progress: bool = False) -> dict:
    """All metrics over (up to max_images of) a dataset; see the module docstring for definitions."""
    model.eval()
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    sums = {"recon": 0.0, "kl": 0.0, "iwae": 0.0, "sq_err": 0.0}
    mus, kl_dims, n, pixels = [], [], 0, None
    total = min(len(dataset), max_images or len(dataset))
    bar = tqdm(total=total, desc="evaluate", unit="img", disable=not progress)
    for x, _, _ in in_order_loader(dataset, batch_size):
        x = x[: total - n].to(device)
        if binarize:
            x = (x > 0.5).to(x.dtype)
        pixels = x[0].numel()
        mu, logvar = (t.double() for t in model.encode(x))
        z = losses.reparameterize(mu, logvar, torch.randn(mu.shape, generator=g, dtype=torch.float64).to(device))
        dtype = next(model.parameters()).dtype
        sums["recon"] += -likelihood.log_prob(model.decode(z.to(dtype)), x).sum().item()
        kl_per_dim = losses.kl_divergence_per_dim(mu, logvar)
        sums["kl"] += kl_per_dim.sum().item()
        kl_dims.append(kl_per_dim.sum(0))
        mus.append(mu.cpu())
        recon_mean = torch.sigmoid(model.decode(mu.to(dtype)).double())
        sums["sq_err"] += ((recon_mean - x.double()) ** 2).sum().item()
        if iwae_samples:
            sums["iwae"] += iwae_bound(model, x, likelihood, iwae_samples, chunk, g).sum().item()
        n += len(x)
        bar.update(len(x))
        if n >= total:
            break
    bar.close()
    mu_all = torch.cat(mus)
    activity = mu_all.var(dim=0, unbiased=True) if n > 1 else torch.zeros(mu_all.shape[1], dtype=torch.float64)
    mse = sums["sq_err"] / (n * pixels)
    elbo = -(sums["recon"] + sums["kl"]) / n
    to_bits = 1.0 / (pixels * math.log(2))
    out = {
        "images": n, "pixels_per_image": pixels, "likelihood": likelihood.kind,
        "gaussian_var": likelihood.gaussian_var if likelihood.kind == "mse" else None, "binarized": binarize,
        "elbo_nats": elbo, "elbo_bits_per_dim": elbo * to_bits,
        "recon_nll_nats": sums["recon"] / n, "kl_nats": sums["kl"] / n,
        "active_units": int((activity > ACTIVE_UNIT_THRESHOLD).sum()), "latent_dim": int(mu_all.shape[1]),
        "unit_activity": activity.tolist(), "kl_per_dim_nats": (torch.stack(kl_dims).sum(0) / n).tolist(),
        "recon_mse": mse, "psnr_db": 10 * math.log10(1.0 / mse) if mse > 0 else math.inf,
    }
    if iwae_samples:
        nll = -sums["iwae"] / n
        out.update({"iwae_samples": iwae_samples, "iwae_log_likelihood_nats": -nll, "iwae_nll_nats": nll,
                    "iwae_nll_bits_per_dim": nll * to_bits})
    return out


def print_report(report: dict) -> None:
    rows = [("images", f"{report['images']}"),
            ("ELBO (nats/image)", f"{report['elbo_nats']:.2f}"),
            ("  reconstruction NLL", f"{report['recon_nll_nats']:.2f}"),
            ("  KL", f"{report['kl_nats']:.2f}"),
            ("ELBO (bits/dim)", f"{report['elbo_bits_per_dim']:.4f}")]
    if "iwae_nll_nats" in report:
        rows += [(f"IWAE NLL, K={report['iwae_samples']} (nats)", f"{report['iwae_nll_nats']:.2f}"),
                 ("IWAE NLL (bits/dim)", f"{report['iwae_nll_bits_per_dim']:.4f}")]
    rows += [("active units", f"{report['active_units']} / {report['latent_dim']}"),
             ("reconstruction MSE", f"{report['recon_mse']:.5f}"),
             ("PSNR (dB)", f"{report['psnr_db']:.2f}")]
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


@exit_on_user_error
def main(argv=None) -> dict:
    from fastvae.checkpoint import load

    args = parse_args(argv)
    if not 0 <= args.iwae_samples <= 5000:
        raise UserError(f"--iwae-samples {args.iwae_samples}: expected 0 to 5000")
    if args.chunk < 1 or args.gaussian_var <= 0 or (args.max_images is not None and args.max_images < 1):
        raise UserError("--chunk, --gaussian-var and --max-images: expected positive values")
    vae = load(args.checkpoint, args.device, args.overrides)
    likelihood = Likelihood(vae.cfg.loss.recon, args.gaussian_var)
    report = evaluate_model(vae.model, vae.split(args.split), likelihood, args.iwae_samples, args.chunk,
                            args.max_images, args.binarize, args.seed, progress=True)
    report.update({"checkpoint": str(vae.path), "split": args.split, "step": vae.meta["step"]})
    print_report(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
        print(f"fastvae: wrote {args.json}")
    if args.wandb if args.wandb is not None else vae.cfg.logger == "wandb":
        log_to_wandb(report, vae)
    return report


if __name__ == "__main__":
    main()
