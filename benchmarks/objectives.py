"""The objectives of docs/training.md side by side: same model, data, seed and budget, each row trained
from the CLI's config and evaluated by fastvae.evaluate. The plain ELBO row is the baseline.

Per row: the test ELBO (nats/image, every test image), the IWAE-K bound on -log p(x) (the first
--iwae-images test images: K decodes each), active units, the KL, the training time per epoch
(the training loop's own images/s from metrics.jsonl: runs sharing the machine make it noisy), and
the time of one training step against the ELBO's, measured in one process on one batch of real
images with the rows interleaved and repeated (harness.interleaved): the column to compare speed by. Bernoulli likelihood on the grey levels as trained, except the calibrated Gaussian
decoder's row (its variance fitted to the test images: another likelihood, not comparable) and
the conditional model's (a bound on log p(x | label), not log p(x)).

    python benchmarks/objectives.py [--data mnist] [--epochs 10] [--latent 16] [--iwae-samples 1000]
        [--iwae-images 100] [--rows elbo tcvae ...] [--threads N] [--json PATH] [--merge EARLIER.json]
        [--step-repeats 7] [--step-calls 10] [--steps-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import interleaved, print_table, write_json

from fastvae.checkpoint import list_checkpoints
from fastvae.loading import load
from fastvae.config import load_config
from fastvae.data import build_datasets
from fastvae.evaluation import Likelihood, evaluate_model
from fastvae.run_setup import reset_accelerate_state
from fastvae.tracking import read_records
from fastvae.train import train
from fastvae.trainer import Trainer

# row: (what it is, overrides); {steps} is the run's total optimizer steps
ROWS = {
    "elbo": ("ELBO (baseline)", []),
    "cyclical": ("cyclical KL, 4 cycles", ["loss.kl_cycle_steps={cycle}", "loss.kl_cycle_ramp=0.5"]),
    "free_bits": ("free bits 0.25 nats/dim", ["loss.free_bits=0.25"]),
    "capacity": ("capacity 0->25 nats, gamma 100", ["loss.capacity=25", "loss.capacity_steps={steps}",
                                                    "loss.capacity_gamma=100"]),
    "iwae": ("IWAE, K = 5", ["loss.objective=iwae", "loss.samples=5"]),
    "iwae_dreg": ("IWAE, K = 5, DReG", ["loss.objective=iwae", "loss.samples=5", "loss.dreg=true"]),
    "tcvae": ("beta-TCVAE, tc_weight 6", ["loss.objective=tcvae", "loss.tc_weight=6"]),
    "sigma": ("sigma-VAE (Gaussian, fitted s2)", ["loss.recon=mse", "loss.sigma=optimal"]),
    "cvae": ("conditional on the label: log p(x|y)", ["model.condition=labels"]),
}
COLUMNS = [("objective", "objective", ""), ("elbo_nats", "test ELBO", ".2f"),
           ("elbo_nats_iwae_images", "ELBO, IWAE images", ".2f"), ("iwae_nll_nats", "IWAE NLL", ".2f"),
           ("kl_nats", "KL", ".2f"), ("active_units", "active", "d"), ("s_per_epoch", "s/epoch", ".1f")]
STEP_COLUMNS = [("objective", "objective", ""), ("step_ms", "ms/step", ".1f"), ("vs_elbo", "x ELBO", ".2f")]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--limit", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--iwae-samples", type=int, default=1000)
    parser.add_argument("--iwae-images", type=int, default=100)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json")
    parser.add_argument("--merge", help="an earlier run's JSON (same settings): its rows come first")
    parser.add_argument("--step-repeats", type=int, default=7, help="step timing: samples per row (0: none)")
    parser.add_argument("--step-calls", type=int, default=10, help="step timing: steps per sample")
    parser.add_argument("--steps-only", action="store_true",
                        help="only the step timing, no training runs (with --merge: beside an earlier run's rows)")
    return parser.parse_args(argv)


def training_images(args) -> int:
    """How many images each row trains on per epoch (the data set read once for all rows)."""
    return len(build_datasets(load_config(args.data, [f"data.limit={args.limit}"]).data)[0])


def run_row(name: str, args, out: Path, images: int) -> dict:
    label, overrides = ROWS[name]
    base = [f"out_dir={out / name}", f"model.latent_dim={args.latent}", f"train.epochs={args.epochs}",
            "train.mixed_precision=no", "train.log_every=100", f"data.limit={args.limit}"]
    steps = args.epochs * (images // load_config(args.data, base).data.batch_size)  # data.drop_last
    overrides = [o.format(steps=steps, cycle=max(1, steps // 4)) for o in overrides]
    cfg = load_config(args.data, [*base, *overrides])
    started = time.perf_counter()
    train(cfg)
    wall = time.perf_counter() - started
    epochs = [r for r in read_records(out / name) if "images_per_sec" in r]
    vae = load(list_checkpoints(out / name)[-1], "cpu")
    likelihood = Likelihood.of_run(cfg.loss)
    test = vae.split("test")
    conditioning = vae.conditioning_for("test")
    report = evaluate_model(vae.model, test, likelihood, progress=True, conditioning=conditioning)
    if report["gaussian_var_fitted"]:  # the variance fitted to every test image, not to the IWAE's few
        likelihood = Likelihood("mse", report["gaussian_var"], fitted=True)
    iwae = evaluate_model(vae.model, test, likelihood, args.iwae_samples, chunk=100, max_images=args.iwae_images,
                          progress=True, conditioning=conditioning)
    return {"row": name, "objective": label, "overrides": overrides, "likelihood": report["likelihood"],
            "gaussian_var": report["gaussian_var"], "elbo_nats": report["elbo_nats"],
            "iwae_nll_nats": iwae["iwae_nll_nats"], "elbo_nats_iwae_images": iwae["elbo_nats"],
            "kl_nats": report["kl_nats"], "active_units": report["active_units"], "test_images": report["images"],
            "s_per_epoch": statistics.median(images / r["images_per_sec"] for r in epochs), "wall_s": wall}


def step_timing(args, out: Path) -> list[dict]:
    """ms per Trainer.train_step of every row on one batch of the data's first images, the rows
    interleaved and repeated in this one process: ratios to the ELBO that timing noise between
    separate runs does not blur."""
    cases = {}
    for name in args.rows:
        label, overrides = ROWS[name]
        reset_accelerate_state()
        cfg = load_config(args.data, [f"out_dir={out / f'step_{name}'}", f"model.latent_dim={args.latent}",
                                      "train.mixed_precision=no", "data.limit=512", "logger=none",
                                      *(o.format(steps=1000, cycle=250) for o in overrides)])
        trainer = Trainer(cfg)
        batch = next(iter(trainer.train_loader))  # (images, labels, sample ids) on the device
        cases[label] = lambda trainer=trainer, batch=batch: trainer.train_step(batch)
    samples = interleaved(cases, torch.device("cpu"), args.step_repeats, args.step_calls)
    medians = {label: statistics.median(times) for label, times in samples.items()}
    base = medians.get(ROWS["elbo"][0])
    return [{"objective": label, "step_ms": 1000 * m, "vs_elbo": m / base if base else float("nan"),
             "samples_ms": [1000 * t for t in samples[label]]} for label, m in medians.items()]


def merged_rows(args) -> list[dict]:
    """The rows of an earlier run of the same settings (--merge), to add rows to its table."""
    if not args.merge:
        return []
    earlier = json.loads(Path(args.merge).read_text())
    settings = ("data", "epochs", "latent_dim", "iwae_samples", "iwae_images")
    mine = {"data": args.data, "epochs": args.epochs, "latent_dim": args.latent, "iwae_samples": args.iwae_samples,
            "iwae_images": args.iwae_images}
    if any(earlier[k] != mine[k] for k in settings):
        raise SystemExit(f"--merge {args.merge}: its settings {[earlier[k] for k in settings]} differ from these")
    return earlier["rows"]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="objectives-"))
    rows = merged_rows(args)
    images = 0 if args.steps_only else training_images(args)
    for name in [] if args.steps_only else args.rows:
        rows.append(run_row(name, args, out, images))
        print_table(rows, COLUMNS)
    if rows:
        print(f"{args.data}, conv_vae latent {args.latent}, {args.epochs} epochs, seed 0; ELBO nats/image over "
              f"{rows[0]['test_images']} test images; IWAE NLL: K = {args.iwae_samples} on the first "
              f"{args.iwae_images}")
    steps = step_timing(args, out) if args.step_repeats else []
    if steps:
        print_table(steps, STEP_COLUMNS)
        print(f"one training step on {load_config(args.data).data.batch_size} images, fp32, "
              f"{torch.get_num_threads()} thread(s), rows interleaved, median of {args.step_repeats} x "
              f"{args.step_calls} steps")
    write_json(args.json, {"data": args.data, "epochs": args.epochs, "latent_dim": args.latent,
                           "iwae_samples": args.iwae_samples, "iwae_images": args.iwae_images, "rows": rows,
                           "step_timing": steps})


if __name__ == "__main__":
    main()
