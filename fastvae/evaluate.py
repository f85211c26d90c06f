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
import os
from pathlib import Path

import torch

from fastvae.commands import evaluate_parser
from fastvae.distributed import check_launched_processes, gather_rows, sum_over_processes
from fastvae.errors import UserError, exit_on_user_error
from fastvae.evaluation import ImageQuality, Likelihood, evaluate_model, print_report
from fastvae.outputs import checked_output, is_evaluation_report

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
    check_launched_processes(int(os.environ.get("WORLD_SIZE", "1")))
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState

    return PartialState(cpu=device == "cpu" or not torch.cuda.is_available())


MAX_SAMPLES = 200_000  # FID's prior samples: 2,048 float64 features each (16 KB), 3.2 GB at this many
MAX_KID_SUBSETS = 10_000


def check_counts(args) -> None:
    """The FID / KID counts, before any work: each flag named with the range it takes."""
    if args.num_samples is not None and not 2 <= args.num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples {args.num_samples}: expected 2 to {MAX_SAMPLES:,}")
    if not 1 <= args.kid_subsets <= MAX_KID_SUBSETS:
        raise UserError(f"--kid-subsets {args.kid_subsets}: expected 1 to {MAX_KID_SUBSETS:,} (torch-fidelity: 100)")
    if not 2 <= args.kid_subset_size <= MAX_SAMPLES:
        raise UserError(f"--kid-subset-size {args.kid_subset_size}: expected 2 to {MAX_SAMPLES:,} (torch-fidelity: "
                        f"1000)")


def fid_features(args, vae, dataset, shard=(0, 1), all_gather=None):
    """--fid / --rfid: the Inception network and what to compare; the real images' features cached in the
    run's folder, keyed by everything that changes them (the images' pixels, data set, split, count,
    weights)."""
    if not (args.fid or args.rfid):
        if args.kid or args.num_samples:
            raise UserError("--kid and --num-samples go with --fid or --rfid; expected one of them too")
        return None
    from fastvae.fid import FeatureSets, load_inception, pixels_digest, real_features_file

    inception, sha = load_inception(args.inception_weights or "", vae.device)
    total = min(len(dataset), args.max_images or len(dataset))
    pixels = pixels_digest(dataset, total, args.binarize, shard, all_gather)
    cache = real_features_file(vae.run_dir, vae.cfg.data, args.split, total, args.binarize, sha, pixels)
    return FeatureSets(inception, sha, args.fid, args.rfid, args.kid, args.num_samples, args.kid_subsets,
                       args.kid_subset_size, cache, total)


def image_lpips(args, vae):
    """--lpips: the run's LPIPS settings (loss.lpips_net, loss.lpips_weights) unless --lpips-weights says."""
    if not args.lpips:
        return None
    from fastvae.perceptual import load_lpips

    return load_lpips(vae.cfg.loss.lpips_net, args.lpips_weights or vae.cfg.loss.lpips_weights,
                      "--lpips-weights").to(vae.device)


@exit_on_user_error
def main(argv=None) -> dict:
    from fastvae.loading import load
    from fastvae.config import loggers

    args = parse_args(argv)
    if not 0 <= args.iwae_samples <= 5000:
        raise UserError(f"--iwae-samples {args.iwae_samples}: expected 0 to 5000")
    if args.chunk < 1 or not (args.gaussian_var in (None, "fit") or args.gaussian_var > 0) or (args.max_images is not None and args.max_images < 1):
        raise UserError("--chunk, --gaussian-var and --max-images: expected positive values")
    check_counts(args)
    if args.json:  # before any work: never into a checkpoint, never over another file
        checked_output(args.json, "--json", "file", is_evaluation_report)
    state = launched_processes(args.device)
    device = args.device if state is None else "cpu" if state.device.type == "cpu" else str(state.device)
    vae = load(args.checkpoint, device, args.overrides, args.trust_model, args.ema)
    if args.iwae_samples and vae.model.bottleneck() is not None:
        raise UserError(f"--iwae-samples {args.iwae_samples}: {vae.cfg.model.name} is a tokenizer (a discrete latent), "
                        f"which has no importance-weighted bound; expected 0")
    variance = {None: "run", "fit": None}.get(args.gaussian_var, args.gaussian_var)  # not given; fitted; a number
    likelihood = Likelihood.of_run(vae.cfg.loss, variance)
    shard, all_reduce = ((state.process_index, state.num_processes), sum_over_processes) if state else ((0, 1), None)
    quality = ImageQuality(args.ssim, image_lpips(args, vae))
    dataset = vae.split(args.split)
    report = evaluate_model(vae.model, dataset, likelihood, args.iwae_samples, args.chunk,
                            args.max_images, args.binarize, args.seed, progress=True, shard=shard,
                            all_reduce=all_reduce, conditioning=vae.conditioning_for(args.split), quality=quality,
                            features=fid_features(args, vae, dataset, shard, gather_rows if state else None),
                            all_gather=gather_rows if state else None)
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
