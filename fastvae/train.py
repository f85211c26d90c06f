"""Train a VAE.

    python -m fastvae.train --config configs/mnist.yaml [key=value ...]
    accelerate launch -m fastvae.train --config configs/mnist.yaml [key=value ...]
    accelerate launch --config_file launch/accelerate/cpu_2proc.yaml \
        -m fastvae.train --config configs/mnist.yaml          # 2 CPU processes, gloo DDP

accelerate does devices, DDP, mixed precision, gradient accumulation and state
saving; this file is the training step, top to bottom.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastvae import checkpoint, pictures
from fastvae.config import Config, load_config
from fastvae.data import build_datasets
from fastvae.data.base import collate_skipping_corrupt
from fastvae.data.ffcv import FFCVTrainLoader
from fastvae.errors import UserError, exit_on_user_error
from fastvae.evaluate import Likelihood, evaluate_model, print_report
from fastvae.stopping import DEFAULT_STOP_SIGNALS, NonFiniteGuard, StopSignal
from fastvae.losses import kl_weight, vae_loss
from fastvae.models import build_model
from fastvae.ops import Ops, build_ops
from fastvae.tracking import METRICS_FILE, RunLog, check_wandb_ready


def compute_loss(model, x: torch.Tensor, ops: Ops, loss_cfg, beta: float):
    """One forward pass and the ELBO terms: (loss, recon[B], kl[B])."""
    logits, _, _, kl = model(x)
    recon = ops.recon_loss(logits, x, loss_cfg.recon)
    return vae_loss(recon, kl, loss_cfg.recon_weight, beta), recon, kl


def build_optimizer(cfg: Config, params) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def build_scheduler(cfg: Config, optimizer, total_steps: int):
    """Linear warm-up, then constant / cosine / linear decay to 0 over total_steps."""
    warmup, kind = cfg.optim.warmup_steps, cfg.optim.scheduler

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if kind == "linear":
            return 1.0 - progress
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_accelerator(cfg: Config) -> Accelerator:
    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,  # None: `accelerate launch --mixed_precision` decides
        gradient_accumulation_steps=cfg.train.grad_accum_steps,
        # No GPU here: the CPU, and gloo when several processes were launched (accelerate
        # would otherwise leave each launched process training alone).
        cpu=cfg.train.cpu or not torch.cuda.is_available(),
        # Data order = f(seed, epoch), not of the global RNG: what makes exact resume possible.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        dynamo_backend="inductor" if cfg.train.compile else None,
        log_with="wandb" if cfg.logger == "wandb" else None,
    )


def prepare_out_dir(cfg: Config, accelerator: Accelerator) -> Path:
    out = Path(cfg.out_dir)
    if accelerator.is_main_process:
        try:
            out.mkdir(parents=True, exist_ok=True)
            probe = out / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as err:
            raise UserError(f"out_dir '{out}' is not writable ({err.strerror}); expected a writable folder")
    accelerator.wait_for_everyone()
    return out


def epoch_test_metrics(model, test_set, cfg: Config, max_images: int = 2000) -> dict:
    """The test loss in training units (same weights, no Gaussian constant), from fastvae.evaluate.
    Its eps come from a private generator: the global RNG, which resume restores, is untouched."""
    report = evaluate_model(model, test_set, Likelihood(cfg.loss.recon, normalized=False), max_images=max_images,
                            seed=cfg.seed + 1)
    model.train()
    recon, kl = report["recon_nll_nats"], report["kl_nats"]
    return {"test_recon": recon, "test_kl": kl, "test_loss": cfg.loss.recon_weight * recon + cfg.loss.beta * kl,
            "test_active_units": report["active_units"]}


@torch.no_grad()
def write_pictures(model, test_set, cfg: Config, device, folder: Path | None = None,
                   max_images: int = 5000) -> dict[str, Path]:
    """Prior samples, reconstructions and the latent scatter, into `folder` (default out_dir)."""
    model.eval()
    out = Path(folder or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mu_all, label_all = pictures.encode_dataset(model, test_set, device, max_images=max_images)
    originals = torch.stack([test_set[i][0] for i in pictures.spread_indices(len(test_set), 40)])
    title = f"Latent means of {len(mu_all)} test images ({cfg.data.name}), colored by label"
    written = {
        "samples": pictures.save_sample_grid(model, out / "samples.png", n=cfg.train.samples, seed=cfg.seed,
                                             device=device),
        "reconstructions": pictures.save_reconstruction_grid(model, originals.to(device), out / "reconstructions.png"),
        "latent_scatter": pictures.save_latent_scatter(mu_all, label_all, out / "latent_scatter.png", title),
    }
    model.train()
    return written


def trim_metrics(out_dir: Path, step: int) -> None:
    """On resume, drop epoch records written after the checkpoint we resume from."""
    path = out_dir / METRICS_FILE
    if path.is_file():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a crash
        path.write_text("".join(line + "\n" for line in kept))


def build_train_loader(cfg: Config, accelerator: Accelerator, train_set):
    """A torch DataLoader (handed to accelerate.prepare by the caller) or an FFCV loader
    (already sharded per rank and on the device)."""
    global_batch = cfg.data.batch_size * accelerator.num_processes
    if cfg.data.drop_last and len(train_set) < global_batch:
        raise UserError(f"data.batch_size={cfg.data.batch_size} x {accelerator.num_processes} process(es) "
                        f"is larger than the {len(train_set)} training images; expected at most "
                        f"{len(train_set) // accelerator.num_processes} per process (or data.drop_last=false)")
    if cfg.data.loader == "ffcv":
        return FFCVTrainLoader(cfg.data.beton, cfg.data.batch_size, cfg.data.channels, accelerator.device,
                               cfg.seed, cfg.data.order, cfg.data.flip, cfg.data.drop_last,
                               distributed=accelerator.num_processes > 1, num_workers=max(1, cfg.data.num_workers))
    return DataLoader(
        train_set, batch_size=cfg.data.batch_size, shuffle=True, drop_last=cfg.data.drop_last,
        num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0,
        # a private generator: creating an iterator must not draw from the global RNG
        generator=torch.Generator().manual_seed(cfg.seed),
        collate_fn=collate_skipping_corrupt,
    )


def restore(accelerator: Accelerator, cfg: Config, out_dir: Path) -> tuple[int, int, int, Path | None, dict]:
    """(step, epoch, batch_in_epoch, checkpoint, its metadata) to start from: zeros for a fresh run;
    for train.resume the checkpoint's state (model, optimizer, scheduler, RNG) is loaded."""
    resume_path = checkpoint.resolve_resume(cfg.train.resume, out_dir, announce=accelerator.print)
    if resume_path is None:
        if cfg.train.resume:
            accelerator.print(f"fastvae: no checkpoint in {checkpoint.checkpoint_dir(out_dir)}; starting fresh")
        return 0, 0, 0, None, {}
    meta = checkpoint.read_meta(resume_path)
    checkpoint.check_compatible(meta, cfg, resume_path)
    try:
        accelerator.load_state(str(resume_path))
    except Exception as err:  # torch/safetensors/pickle each raise their own types
        raise UserError(f"checkpoint '{resume_path}' could not be loaded ({type(err).__name__}: {err}); "
                        f"expected an intact checkpoint of this model") from None
    if accelerator.is_main_process:
        trim_metrics(out_dir, meta["step"])
    accelerator.print(f"fastvae: resumed from {resume_path} (step {meta['step']}, epoch {meta['epoch']})")
    return meta["step"], meta["epoch"], meta["batch_in_epoch"], resume_path, meta


def train(cfg: Config, stop_signals=DEFAULT_STOP_SIGNALS) -> dict:
    """Train (or resume) the run `cfg` describes; any of `stop_signals` checkpoints and stops it early."""
    if cfg.logger == "wandb":
        check_wandb_ready()
    accelerator = make_accelerator(cfg)
    set_seed(cfg.seed)
    out_dir = prepare_out_dir(cfg, accelerator)
    is_main = accelerator.is_main_process
    existing = checkpoint.list_checkpoints(out_dir)
    if existing and not cfg.train.resume:
        raise UserError(f"out_dir '{out_dir}' already holds checkpoints (newest: {existing[-1].name}); expected "
                        f"an empty out_dir, train.resume=auto to continue that run, or another out_dir")

    # ---- data
    train_set, test_set = build_datasets(cfg.data)
    use_ffcv = cfg.data.loader == "ffcv"
    train_loader = build_train_loader(cfg, accelerator, train_set)

    # ---- model, ops, optimizer
    model = build_model(cfg)
    ops = build_ops(cfg.train.ops, accelerator.device)
    model.reparam_kl = ops.reparam_kl
    optimizer = build_optimizer(cfg, model.parameters())
    if use_ffcv:
        model, optimizer = accelerator.prepare(model, optimizer)
    else:
        model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    steps_per_epoch = max(1, len(train_loader) // cfg.train.grad_accum_steps)
    planned_steps = cfg.train.epochs * steps_per_epoch
    total_steps = min(planned_steps, cfg.train.max_steps) if cfg.train.max_steps else planned_steps
    # The schedule spans the planned epochs whatever max_steps says: stopping early and
    # resuming must see the same learning rates as one uninterrupted run.
    # Not prepared: accelerate would step it once per process; we step it once per optimizer step.
    scheduler = build_scheduler(cfg, optimizer, planned_steps)
    accelerator.register_for_checkpointing(scheduler)
    raw_model = accelerator.unwrap_model(model)

    # ---- resume
    step, epoch, batch_in_epoch, resume_path, resume_meta = restore(accelerator, cfg, out_dir)

    log = RunLog(accelerator, cfg, resume_meta.get("wandb_run_id"))
    sample_ids = [] if cfg.train.record_sample_ids else None
    guard = NonFiniteGuard(cfg.train.nonfinite, accelerator)
    stop = StopSignal(accelerator, stop_signals)

    def save(at_epoch: int, at_batch: int) -> Path:
        guard.raise_if_bad()  # never checkpoint weights that saw a non-finite loss
        if at_batch >= len(train_loader):  # the end of an epoch is the start of the next
            at_epoch, at_batch = at_epoch + 1, 0
        progress = {"step": step, "epoch": at_epoch, "batch_in_epoch": at_batch, "wandb_run_id": log.run_id}
        return checkpoint.save_checkpoint(accelerator, out_dir, cfg, progress, cfg.train.keep_checkpoints)

    if is_main:
        print(f"fastvae: {cfg.model.name} on {cfg.data.name} ({len(train_set)} train images), "
              f"{accelerator.num_processes} process(es) on {accelerator.device}, ops={ops.name}, "
              f"mixed_precision={accelerator.mixed_precision}, compile={cfg.train.compile}, "
              f"{total_steps} steps -> {out_dir}", flush=True)
    bar = tqdm(total=total_steps, initial=step, disable=not accelerator.is_local_main_process,
               desc="train", unit="step", dynamic_ncols=True)
    last_saved_step = step if resume_path is not None else -1
    images_since_log, log_clock = 0, time.perf_counter()  # for images/s between log points
    try:  # the bar ends its line and the signal handlers are restored, whatever happens
        while epoch < cfg.train.epochs and step < total_steps:
            train_loader.set_epoch(epoch)
            loader = train_loader
            if batch_in_epoch:  # resuming inside an epoch
                loader = (train_loader.skip_first(batch_in_epoch) if use_ffcv
                          else accelerator.skip_first_batches(train_loader, batch_in_epoch))
            sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # loss, recon, kl, images
            epoch_start = time.perf_counter()
            images_since_log, log_clock = 0, epoch_start
            model.train()
            batch_idx = batch_in_epoch - 1
            for batch_idx, (x, _, index) in enumerate(loader, start=batch_in_epoch):
                # ---- the training step
                beta = kl_weight(cfg.loss.beta, step, cfg.loss.kl_warmup_steps)
                with accelerator.accumulate(model):
                    loss, recon, kl = compute_loss(model, x, ops, cfg.loss, beta)
                    if guard.batch_is_bad(step, recon, kl):  # policy "skip": this batch updates nothing
                        optimizer.zero_grad(set_to_none=True)  # (nor does the rest of its accumulation window)
                        continue
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.grad_clip:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                # ---- bookkeeping (no host sync except every log_every steps)
                n = x.shape[0]
                sums += torch.stack([loss.detach() * n, recon.detach().sum(), kl.detach().sum(),
                                     torch.tensor(n, device=x.device)]).double()
                images_since_log += n * accelerator.num_processes
                if sample_ids is not None:
                    sample_ids.extend(index.tolist())
                if not accelerator.sync_gradients:
                    continue
                step += 1
                scheduler.step()
                bar.update(1)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    guard.raise_if_bad()
                    now = time.perf_counter()
                    values = {"loss": loss.item(), "recon": recon.mean().item(), "kl": kl.mean().item(),
                              "beta": beta, "lr": scheduler.get_last_lr()[0], "skipped_batches": guard.skipped,
                              "images_per_sec": images_since_log / max(now - log_clock, 1e-9)}
                    images_since_log, log_clock = 0, now
                    bar.set_postfix(loss=f"{values['loss']:.2f}", kl=f"{values['kl']:.2f}")
                    log.log_step(values, step)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    last_saved_step = step
                    save(epoch, batch_idx + 1)
                if step >= total_steps or stop.requested():
                    break
            # ---- end of the epoch (or of the run, inside an epoch when max_steps says so)
            elapsed = time.perf_counter() - epoch_start
            totals = accelerator.reduce(sums, reduction="sum").tolist()
            batches_done = batch_idx + 1
            if totals[3] > 0:
                complete = batches_done >= len(train_loader)
                record = {"epoch": epoch + 1 if complete else round(epoch + batches_done / len(train_loader), 4),
                          "step": step, "loss": totals[0] / totals[3], "recon": totals[1] / totals[3],
                          "kl": totals[2] / totals[3], "images_per_sec": totals[3] / elapsed,
                          "lr": scheduler.get_last_lr()[0], "skipped_batches": guard.skipped}
                if is_main:
                    record.update(epoch_test_metrics(raw_model, test_set, cfg))
                log.log_epoch(record)
                if log.log_images and is_main:  # this epoch's pictures, kept on disk and shown in W&B
                    log.log_pictures(write_pictures(raw_model, test_set, cfg, accelerator.device,
                                                    out_dir / "pictures" / f"step_{step:08d}", 2000), step)
            accelerator.wait_for_everyone()
            if last_saved_step != step:
                last_saved_step = step
                save(epoch, batches_done)
            epoch, batch_in_epoch = (epoch + 1, 0) if batches_done >= len(train_loader) else (epoch, batches_done)
            if stop.signum:
                break
    finally:
        bar.close()
        stop.restore()
    if sample_ids is not None:
        ids_path = out_dir / f"sample_ids_rank{accelerator.process_index}.json"
        ids_path.write_text(json.dumps(sample_ids))
    result = {"step": step, "epoch": epoch, "out_dir": str(out_dir), "skipped_batches": guard.skipped,
              "param_checksum": param_checksum(raw_model), "stopped_by": stop.name,
              "signals": stop.received}
    if accelerator.num_processes > 1:
        result["ranks_agree"] = ranks_agree(accelerator, raw_model)
    if is_main:
        newest = checkpoint.list_checkpoints(out_dir)[-1]
        if stop.signum:
            print(f"fastvae: stopped by {stop.name} at step {step}; checkpoint {newest}; "
                  f"continue with train.resume=auto", flush=True)
        else:
            written = write_pictures(raw_model, test_set, cfg, accelerator.device)
            print(f"fastvae: wrote {', '.join(str(p) for p in written.values())}", flush=True)
            if cfg.wandb.log_checkpoint:
                log.log_checkpoint(newest, cfg.wandb.name or out_dir.name)
            print(f"fastvae: metrics in {out_dir / METRICS_FILE}, checkpoint {newest}", flush=True)
            if cfg.train.final_eval:
                report = evaluate_model(raw_model, test_set, Likelihood(cfg.loss.recon), cfg.train.final_eval_iwae,
                                        max_images=cfg.train.final_eval_images or None, seed=cfg.seed)
                log.log_eval({**report, "checkpoint": str(newest), "step": step}, step)
                print_report(report)
        if guard.skipped:
            print(f"fastvae: skipped {guard.skipped} batch(es) with a non-finite loss", flush=True)
        (out_dir / "summary.json").write_text(json.dumps(result, indent=2))
    log.close()
    accelerator.wait_for_everyone()
    return result


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))


def ranks_agree(accelerator: Accelerator, model) -> bool:
    """Every rank holds exactly the same parameters (what DDP promises)."""
    flat = torch.cat([p.detach().flatten().float() for p in model.parameters()])
    gathered = accelerator.gather(flat.unsqueeze(0))
    agree = bool((gathered == gathered[0]).all().item())
    if not agree:
        raise RuntimeError("parameters differ across ranks after training")
    return agree


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m fastvae.train", description="Train a VAE.")
    parser.add_argument("--config", help="YAML config (e.g. configs/mnist.yaml); defaults if omitted")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, e.g. train.epochs=5 data.batch_size=64")
    return parser.parse_args(argv)


@exit_on_user_error
def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    result = train(cfg)
    code = 128 + signal.Signals[result["stopped_by"]].value if result["stopped_by"] else 0
    if code or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Gloo can abort at interpreter exit after correct work (PLATFORM.md): tear the
        # process group down ourselves and leave without running finalizers.
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return result


if __name__ == "__main__":
    main()
