"""The Trainer: one training step (`train_step`) and the loop around it (`fit`).

accelerate does devices, DDP, mixed precision, gradient accumulation and state
saving. `Trainer.train_step` is the one step training runs; `fit()` is the loop,
top to bottom, with epoch ends, checkpoints and the end of the run in their own
methods. Benchmarks and tests call these, never a copy.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import torch
import yaml
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from fastvae import checkpoint, noise, reports
from fastvae.conditions import conditioning_of, names_from_data
from fastvae.config import Config, image_hw, to_dict
from fastvae.bottleneck import build_bottleneck
from fastvae.critic import Critic, allow_repeated_backward, build_discriminator, last_layer_in_a_graph_of_its_own
from fastvae.data import build_datasets
from fastvae.data.loaders import build_train_loader, dropped_images_notice
from fastvae.data.memory import decoded_once
from fastvae.distributed import gather_rows, ranks_agree, watch_group
from fastvae.ema import EMA
from fastvae.errors import LostRank, OutputError, UserError
from fastvae.losses import capacity_at, kl_weight
from fastvae.models import build_model, load_pretrained, resolve_pretrained
from fastvae.models.sync_batchnorm import convert_sync_batchnorm
from fastvae.objectives import build_objective
from fastvae.optim import build_disc_optimizer, build_optimizer, build_scheduler
from fastvae.ops import select_ops
from fastvae.run_setup import absolute_paths, make_accelerator, prepare_out_dir, removed_if_refused
from fastvae.sizes import check_fits, processes_sharing
from fastvae.stopping import DEFAULT_STOP_SIGNALS, NonFiniteGuard, StopSignal
from fastvae.tracking import RunLog, check_trackers_ready
from fastvae.train_forward import TrainForward


RESOLVED_CONFIG = "config.yaml"
UNWRITABLE = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM)
COLLECTIVE_FAILED = re.compile(r"(?i)timed? ?out|connection (closed|reset)|broken pipe")  # gloo's and NCCL's words
WATCH_S = 20  # how long the survivor asks the others before it names who did not answer
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class Totals(NamedTuple):
    """Sums over the batches a LossSums saw, over all ranks."""

    loss_x_images: float
    recon: float
    kl: float
    images: float
    terms: dict  # name: (term x images, images) over the batches that had it

    def means(self) -> dict:
        """loss, recon, kl and the objective's terms per image."""
        n = self.images
        return {"loss": self.loss_x_images / n, "recon": self.recon / n, "kl": self.kl / n,
                **{name: value / images for name, (value, images) in self.terms.items() if images}}


class LossSums:
    """loss x n, recon, kl and the objective's own terms (each x n) of some batches (an epoch's, or a
    log point's one) summed on the device, and image counts on the host: nothing crosses between them
    per step; read once, summed over all ranks. A term may start mid-way (the critic's, at
    disc.start): each is averaged over the batches that had it (every rank has the same terms)."""

    def __init__(self, device) -> None:
        self.sums, self.images = torch.zeros(3, device=device, dtype=torch.float64), 0
        self.terms: dict[str, torch.Tensor] = {}
        self.term_images: dict[str, int] = {}
        self.seconds_before = 0.0  # the epoch's seconds before a resume

    def add(self, metrics: dict) -> None:
        n = metrics["images"]
        self.sums += torch.stack([metrics["loss"] * n, metrics["recon"].sum(), metrics["kl"].sum()]).double()
        self.images += n
        for name, value in metrics.get("terms", {}).items():
            self.terms[name] = self.terms.get(name, 0) + value.double() * n
            self.term_images[name] = self.term_images.get(name, 0) + n

    def _local(self) -> tuple[list[str], torch.Tensor]:
        """This rank's sums as one float64 vector: loss, recon, kl, each term, then the image counts."""
        names = sorted(self.terms)
        device = self.sums.device
        counts = torch.tensor([float(self.images), *(float(self.term_images[k]) for k in names)], device=device,
                              dtype=torch.float64)
        return names, torch.cat([self.sums, torch.stack([self.terms[k] for k in names]) if names else counts[:0],
                                 counts])

    def state(self, accelerator, seconds: float) -> dict:
        """Every rank's sums, in rank order (all ranks call this), and the epoch's seconds so far: what a
        checkpoint taken mid-epoch keeps, so that the resumed epoch's row is the uninterrupted one's."""
        names, local = self._local()
        ranks = accelerator.gather(local.unsqueeze(0)).tolist()
        return {"terms": names, "ranks": ranks, "seconds": seconds}

    def restore(self, state: dict, rank: int, world: int) -> None:
        """The sums a checkpoint kept: each rank its own when the process count is the same; else all
        of them on rank 0 (the same totals, summed in another order)."""
        names, ranks = state["terms"], state["ranks"]
        mine = ranks[rank] if len(ranks) == world else \
            [sum(column) for column in zip(*ranks)] if rank == 0 else [0.0] * len(ranks[0])
        values = torch.tensor(mine, dtype=torch.float64, device=self.sums.device)
        k = len(names)
        self.sums, self.images = values[:3].clone(), int(values[3 + k].item())
        self.terms = {name: values[3 + i].clone() for i, name in enumerate(names)}
        self.term_images = {name: int(values[4 + k + i].item()) for i, name in enumerate(names)}
        self.seconds_before = float(state.get("seconds", 0.0))

    def totals(self, accelerator) -> Totals:
        """Summed over all ranks: one all-reduce, one host read."""
        names, local = self._local()
        values = accelerator.reduce(local, reduction="sum").tolist()
        sums, term_sums, images, term_images = values[:3], values[3:3 + len(names)], values[3 + len(names)], \
            values[4 + len(names):]
        return Totals(*sums, images, {k: (v, m) for k, v, m in zip(names, term_sums, term_images)})


class Trainer:
    def __init__(self, cfg: Config, stop_signals=None, datasets: tuple | None = None) -> None:
        """Set up the run `cfg` describes (resuming it when train.resume says so). `datasets`:
        (train, test) to train on instead of the ones cfg.data names; any of `stop_signals`
        checkpoints and stops fit() at the next step boundary."""
        check_trackers_ready(cfg)
        absolute_paths(cfg)  # weights files found from wherever the run's checkpoints are used
        self.cfg, self.stop_signals = cfg, stop_signals or DEFAULT_STOP_SIGNALS
        self.accelerator, self.precision_source = make_accelerator(cfg)
        resolve_pretrained(cfg)  # a diffusers folder's architecture into model.kwargs, before anything is sized
        # before any data set or model is built: a run too big for this machine is one line
        check_fits(cfg, self.accelerator.device, training=True, copies=processes_sharing(self.accelerator.device))
        self.quality_networks = reports.QualityNetworks.of(cfg, self.accelerator.device)  # eval.fid_every's
        self.watch_group = watch_group(self.accelerator.num_processes)
        set_seed(cfg.seed)
        created = not Path(cfg.out_dir).exists()
        self.out_dir, self.run_lock = prepare_out_dir(cfg, self.accelerator)
        with removed_if_refused(self.out_dir, created and self.accelerator.is_main_process, self.run_lock):
            self._set_up_data(datasets)
            self._set_up_model()
            self._set_up_state()
        if self.accelerator.is_main_process:  # the resolved config, to read, share, or rerun with
            # --config; only once set-up succeeded: a refused run changes nothing in out_dir
            (self.out_dir / RESOLVED_CONFIG).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def _set_up_data(self, datasets) -> None:
        cfg, acc = self.cfg, self.accelerator
        self.train_set, test_set = datasets or build_datasets(cfg.data)
        # read every epoch for metrics and pictures: decoded in the first one only (CelebA, image folders)
        self.test_set = decoded_once(test_set, reports.FINAL_IMAGES)
        self.train_loader = build_train_loader(cfg, self.train_set, acc.num_processes, acc.device, acc.process_index)
        notice = dropped_images_notice(cfg, len(self.train_set), acc.num_processes)
        if notice:
            acc.print(notice)
        self.conditioning = self._conditioning()

    def _conditioning(self):
        """A conditional model's condition vectors of the training images (on the device), its
        names resolved from the data into the config (so checkpoints record them)."""
        cfg = self.cfg
        if cfg.model.condition == "none":
            return None
        names = names_from_data(cfg.model.condition, self.train_set, cfg.data.name)
        if cfg.model.condition_names and cfg.model.condition_names != names:
            raise UserError(f"config key 'model.condition_names': {cfg.model.condition_names[:4]}... differ from the "
                            f"data's {names[:4]}...; expected them equal (or empty: filled in from the data)")
        cfg.model.condition_names = names
        return conditioning_of(cfg.model).for_dataset(self.train_set).to(self.accelerator.device)

    def _set_up_model(self) -> None:
        """The model and the run's components (bottleneck, objective, critic) put together in one
        TrainForward, its optimizer and LR schedule, prepared by accelerate; the compiled forward."""
        cfg, acc = self.cfg, self.accelerator
        self.ops = select_ops(cfg.train.ops, acc.device)
        self.memory_format = MEMORY_FORMATS[cfg.train.memory_format]
        model = build_model(cfg).to(memory_format=self.memory_format)
        self._adapt(model)
        if cfg.train.sync_batchnorm and acc.num_processes > 1:
            model = convert_sync_batchnorm(model, acc.device)
        model.to(acc.device)  # before the optimizer: fused Adam needs its parameters on the GPU
        discriminator = self._discriminator(model)  # (drawn after the model and before LPIPS, as always)
        self.objective = build_objective(cfg, self.ops.recon_loss, len(self.train_set), acc.num_processes,
                                         acc.device)
        self.objective.prepare(model)  # before DDP: which parameters train is fixed when it wraps them
        bottleneck = model.bottleneck() or build_bottleneck(self.ops)  # a tokenizer's quantizer, or the Gaussian
        if hasattr(bottleneck, "use_lookup"):  # a VQ: the fused nearest-code op under train.ops=triton
            bottleneck.use_lookup(self.ops.vector_quantize)
        forward = TrainForward(model, bottleneck, self.objective)
        if cfg.train.compile:  # in place; DDP then wraps the compiled module: one graph from images to
            # loss, DDP's own Python outside it (compiling through DDP broke the graph in its _pre_forward logger)
            forward.compile(mode=None if cfg.train.compile_mode == "default" else cfg.train.compile_mode)
            if discriminator is not None:
                last_layer_in_a_graph_of_its_own(model)
                allow_repeated_backward()
        optimizer = build_optimizer(cfg, model.parameters(), acc.device)
        self.model, self.optimizer = acc.prepare(forward, optimizer)  # prepared first: model.safetensors
        self.raw_model = acc.unwrap_model(self.model).model
        self.critic = None
        if discriminator is not None:
            disc, disc_optimizer = acc.prepare(discriminator, build_disc_optimizer(cfg, discriminator, acc.device))
            self.critic = Critic(disc, disc_optimizer, cfg.disc.weight, cfg.disc.factor, cfg.disc.start, cfg.disc.loss,
                                 backward=acc.backward, lecam_weight=cfg.disc.lecam_weight,
                                 lecam_decay=cfg.disc.lecam_decay)
        self.ema = EMA(self.raw_model, cfg.train.ema_decay) if cfg.train.ema_decay else None
        planned_steps = cfg.train.epochs * self._steps_per_epoch()
        # The schedule spans the planned epochs whatever max_steps says: stopping early and resuming
        # must see the same learning rates as one uninterrupted run. Not prepared: accelerate would
        # step it once per process; it is stepped once per optimizer step.
        # its state goes into the checkpoint's fastvae.json (accelerate would pickle it: checkpoint.restore)
        self.scheduler = build_scheduler(cfg, self.optimizer, planned_steps)

    def _discriminator(self, model):
        """disc.weight > 0: the PatchGAN the critic trains (fastvae/critic.py), for a model that names the
        decoder's last layer where the adaptive weight is measured; else None."""
        cfg = self.cfg
        if not cfg.disc.weight:
            return None
        if model.last_layer() is None:
            raise UserError(f"config key 'disc.weight': model {cfg.model.name} names no decoder last layer for the "
                            f"adaptive weight; expected a model whose last_layer() returns it (kl_autoencoder) or "
                            f"disc.weight=0")
        return build_discriminator(cfg.data.channels, *image_hw(cfg.data), cfg.disc, self.accelerator.num_processes,
                                   self.accelerator.device)

    def _adapt(self, model) -> None:
        """What the config asks of the model itself: diffusers weights to start from, the encoder
        frozen, gradient checkpointing."""
        cfg = self.cfg
        if cfg.model.pretrained:  # a resumed run then loads its checkpoint over them
            load_pretrained(model, cfg.model.pretrained)
        if cfg.model.train_decoder_only:
            model.trainable_for_decoder_only()
        if cfg.train.gradient_checkpointing:
            try:
                model.enable_gradient_checkpointing()
            except NotImplementedError:
                raise UserError(f"config key 'train.gradient_checkpointing': model {cfg.model.name} offers none; "
                                f"expected a model with enable_gradient_checkpointing() (kl_autoencoder)") from None

    def _steps_per_epoch(self) -> int:
        return max(1, len(self.train_loader) // self.cfg.train.grad_accum_steps)

    def _last_step(self) -> int:
        """The step this run ends at: its position plus the steps of what is left of train.epochs at
        this run's batches (a resumed run may have another global batch than its checkpoint: the
        steps before are counted in the checkpoint's batches, those after in this run's), or
        train.max_steps if that comes first."""
        state, cfg = self.state, self.cfg
        left = 0
        if state.epoch < cfg.train.epochs:
            in_this_epoch = (len(self.train_loader) - state.batch_in_epoch) // cfg.train.grad_accum_steps
            left = in_this_epoch + (cfg.train.epochs - state.epoch - 1) * self._steps_per_epoch()
        last = state.step + left
        return min(last, cfg.train.max_steps) if cfg.train.max_steps else last

    def _set_up_state(self) -> None:
        """Where the run starts (a checkpoint's state when resuming), its log and its guard."""
        cfg, acc = self.cfg, self.accelerator
        self.state, self.resumed_from = checkpoint.restore(acc, cfg, self.out_dir, self.scheduler)
        if self.ema is not None and self.resumed_from is not None:
            self._restore_ema()
        rebatched = self.state.rebatch(cfg.data.batch_size * acc.num_processes)
        if rebatched:
            acc.print(f"fastvae: resuming {rebatched}")
        if self.state.batch_in_epoch > len(self.train_loader):
            raise UserError(f"checkpoint '{self.resumed_from}' is {self.state.batch_in_epoch} batches into an epoch "
                            f"of {len(self.train_loader)}; expected a checkpoint of this data set")
        self.total_steps = self._last_step()
        self.log = RunLog(acc, cfg, self.state.wandb_run_id, self.state.mlflow_run_id)
        if self.resumed_from is not None:
            self.log.trim_after(self.state.step)
        self.state.wandb_run_id, self.state.mlflow_run_id = self.log.run_id, self.log.mlflow_run_id
        self.guard = NonFiniteGuard(cfg.train.nonfinite, acc, self.out_dir)
        self.noise_seed = torch.tensor(cfg.seed, dtype=torch.int64, device=acc.device)
        self.last_saved_step = self.state.step if self.resumed_from is not None else -1
        self.sums = None  # the running epoch's LossSums (_epoch_sums), kept by a checkpoint taken mid-epoch

    # ---------------------------------------------------------------- the step

    def train_step(self, batch) -> dict | None:
        """One batch: forward, loss, backward and, at the end of an accumulation window, gradient
        clipping and the optimizer step. Returns the batch's metrics as device tensors (no host
        sync), or None when train.nonfinite=skip dropped the batch."""
        cfg, acc = self.cfg, self.accelerator
        x = batch[0].contiguous(memory_format=self.memory_format)
        beta = kl_weight(cfg.loss.beta, self.state.step, cfg.loss.kl_warmup_steps, cfg.loss.kl_cycle_steps,
                         cfg.loss.kl_cycle_ramp)
        capacity = capacity_at(self.state.step, cfg.loss.capacity, cfg.loss.capacity_steps)
        critic = self.critic if self.critic is not None and self.critic.active_at(self.state.step) else None
        with acc.accumulate(self.model):
            # beta as a device tensor: a Python float would be baked into a compiled graph, which
            # KL warm-up would then recompile every step
            out = self.model(x, self._noise_key(batch), torch.full((), beta, device=x.device),
                             torch.full((), capacity, device=x.device) if cfg.loss.capacity else None,
                             self._condition(batch), critic)
            if self.guard.batch_is_bad(self.state.step, out.recon, out.regularizer):  # this batch updates nothing
                self.optimizer.zero_grad(set_to_none=True)  # (nor does the rest of its accumulation window)
                return None
            acc.backward(out.loss)
            if acc.sync_gradients and cfg.optim.grad_clip:
                acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        terms = out.terms
        if acc.sync_gradients:
            self.state.step += 1
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update(self.raw_model)
            if critic is not None:  # the discriminator's step, on this batch and the generator's reconstructions
                terms = {**terms, **critic.step(x * 2 - 1, self.raw_model.pixels(out.output))}
        return {"loss": out.loss.detach(), "recon": out.recon.detach(), "kl": out.regularizer.detach(), "terms": terms,
                "beta": beta, "images": x.shape[0], "stepped": acc.sync_gradients}

    def _condition(self, batch):
        """A conditional model's condition vectors of the batch's images; None for other models."""
        if self.conditioning is None:
            return None
        return self.conditioning.of_batch(batch[1].to(batch[0].device, non_blocking=True), batch[2])

    def _noise_key(self, batch):
        """Each sample's eps keyed by (seed, step, its index in the data set): the same numbers on
        any number of processes (fastvae.noise). The step as a device tensor, for the reason beta
        is one. A batch without sample ids: eps from torch's generator."""
        if len(batch) < 3 or batch[2] is None:
            return None
        step = torch.full((), self.state.step, dtype=torch.int64, device=batch[0].device)
        ids = batch[2].to(batch[0].device, non_blocking=True)  # the loaders deliver them there already
        return self.noise_seed, noise.row_offsets(ids, self.raw_model.latent_dim, step)

    # ---------------------------------------------------------------- the loop

    def fit(self) -> dict:
        """Train until train.epochs / train.max_steps, a stop signal, or a non-finite loss."""
        self._announce()
        # one bar per run, not per node: the tasks of a multi-node sbatch job write to one log file
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not self.accelerator.is_main_process,
                   desc="train", unit="step", dynamic_ncols=True)
        self.stop = StopSignal(self.accelerator, self.stop_signals)
        try:  # the lock on out_dir is released however the run ends
            try:  # the bar ends its line and the signal handlers are restored, whatever happens
                self._train_epochs(bar)
            finally:
                bar.close()
                self.stop.restore()
            return self._finish()
        except OSError as err:
            if err.errno not in UNWRITABLE:
                raise
            raise self._unwritable(err) from None
        except RuntimeError as err:  # gloo/NCCL: a collective that waited train.collective_timeout_s
            if self.watch_group is None or not COLLECTIVE_FAILED.search(str(err)):
                raise
            raise self._lost_rank() from None
        finally:
            self.close()

    def _lost_rank(self) -> LostRank:
        """Which rank stopped answering, asked on a group of its own (torch's monitored barrier), in one line."""
        import torch.distributed as dist

        try:
            ask = min(WATCH_S, self.cfg.train.collective_timeout_s)  # no longer than a collective may wait
            dist.monitored_barrier(group=self.watch_group, timeout=timedelta(seconds=ask), wait_all_ranks=True)
            lost = "no rank failed a second check"
        except RuntimeError as err:
            found = re.search(r"Ranks? ([\d, ]+) failed", str(err))
            lost = f"rank {found.group(1).strip()} stopped answering" if found else "a rank stopped answering"
        return LostRank(f"{lost}: a collective waited {self.cfg.train.collective_timeout_s} s "
                        f"(train.collective_timeout_s); the last good checkpoint is {checkpoint.last_good(self.out_dir)}; "
                        f"expected every rank to answer (resume with train.resume=auto)")

    def _unwritable(self, err: OSError) -> OutputError:
        """A full or read-only out_dir mid-run (metrics, pictures): one line, and what is still good."""
        return OutputError(f"could not write {err.filename or 'to out_dir'} ({err.strerror}); the last good checkpoint "
                           f"is {checkpoint.last_good(self.out_dir)}; expected room and write access in {self.out_dir}")

    def close(self) -> None:
        """Release out_dir for another run (fit does this when it ends; a Trainer used without fit, e.g.
        in a notebook, holds out_dir until this is called or the process ends)."""
        self.log.close()
        if self.run_lock is not None:
            self.run_lock.release()

    def _train_epochs(self, bar) -> None:
        """The loop: epochs of train_step, log points, step checkpoints, epoch ends; until the planned
        steps, a stop signal or an error."""
        cfg, state = self.cfg, self.state
        while state.epoch < cfg.train.epochs and state.step < self.total_steps:
            sums = self._epoch_sums()
            self.epoch_started = time.perf_counter()
            self.images_since_log, self.log_clock = 0, self.epoch_started
            self.model.train()
            for batch in self._remaining_batches():
                metrics = self.train_step(batch)
                state.batch_in_epoch += 1
                if metrics is None:
                    continue
                sums.add(metrics)
                self.images_since_log += metrics["images"] * self.accelerator.num_processes
                if not metrics["stepped"]:
                    continue
                bar.update(1)
                log_point = state.step % cfg.train.log_every == 0 or state.step == self.total_steps
                if log_point:
                    self._log_step(metrics, bar)
                if cfg.train.checkpoint_every and state.step % cfg.train.checkpoint_every == 0:
                    self.save()
                if state.step >= self.total_steps or self.stop.requested(sync=log_point):
                    break
            bar.set_description("test metrics and pictures")  # (the bar sits at its step meanwhile)
            self._end_epoch(sums, time.perf_counter() - self.epoch_started)
            bar.set_description("train")
            if self.stop.requested():
                break

    def _epoch_sums(self) -> LossSums:
        """The epoch's running sums: empty, or those a checkpoint taken mid-epoch kept."""
        acc, state = self.accelerator, self.state
        self.sums = LossSums(acc.device)
        if state.epoch_sums is not None and state.batch_in_epoch > 0:
            self.sums.restore(state.epoch_sums, acc.process_index, acc.num_processes)
        state.epoch_sums = None
        return self.sums

    def _remaining_batches(self):
        """This epoch's batches in its seeded order, without those a resumed run already trained."""
        self.train_loader.set_epoch(self.state.epoch)
        skip = self.state.batch_in_epoch
        return self.train_loader.skip_first(skip) if skip else self.train_loader

    def _announce(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if acc.is_main_process:
            print(f"fastvae: {cfg.model.name} on {cfg.data.name} ({len(self.train_set)} train images), "
                  f"{acc.num_processes} process(es) on {acc.device}, ops={self.ops.name}, "
                  f"mixed_precision={acc.mixed_precision} ({self.precision_source}), "
                  f"compile={cfg.train.compile and cfg.train.compile_mode}, memory_format={cfg.train.memory_format}, "
                  f"loader={type(self.train_loader).__name__}, {self._steps_said()} -> {self.out_dir}", flush=True)

    def _steps_said(self) -> str:
        """The steps this run will take, and for a resumed run from where to where."""
        steps = max(0, self.total_steps - self.state.step)
        return f"{steps} steps" + (f" (step {self.state.step} to {self.total_steps})" if self.state.step else "")

    def _log_step(self, metrics: dict, bar) -> None:
        """Every log_every steps: the one host sync of the loop (guard, progress bar, tracker). The
        batch's loss over all ranks' shares (the loss of the global batch), not rank 0's alone."""
        self.guard.raise_if_bad()
        now = time.perf_counter()
        batch = LossSums(self.accelerator.device)
        batch.add(metrics)
        values = {**batch.totals(self.accelerator).means(), "beta": metrics["beta"],
                  "lr": self.scheduler.get_last_lr()[0], "skipped_batches": self.guard.skipped,
                  "images_per_sec": self.images_since_log / max(now - self.log_clock, 1e-9)}
        self.images_since_log, self.log_clock = 0, now
        bar.set_postfix(loss=f"{values['loss']:.2f}", kl=f"{values['kl']:.2f}")
        self.log.log_step(values, self.state.step)

    def _end_epoch(self, sums: LossSums, elapsed: float) -> None:
        """A complete epoch: its metrics (over all of it, also when a resume split it), pictures, a
        checkpoint. A stop mid-epoch writes no row: its checkpoint keeps the epoch's sums instead."""
        state, acc = self.state, self.accelerator
        batches = len(self.train_loader)
        complete = state.batch_in_epoch >= batches
        totals = sums.totals(acc) if complete else None
        if complete and totals.images > 0:
            elapsed += sums.seconds_before
            record = {"epoch": state.epoch + 1, "step": state.step, **totals.means(),
                      "images_per_sec": totals.images / elapsed,
                      "lr": self.scheduler.get_last_lr()[0], "skipped_batches": self.guard.skipped}
            record.update(reports.held_out_metrics(self.raw_model, self.test_set, self.cfg, objective=self.objective,
                                                   **self._eval_shard()))
            if reports.quality_due(self.cfg, state.epoch + 1):
                record.update(reports.image_quality(self.raw_model, self.test_set, self.cfg, self.quality_networks,
                                                    self.out_dir, **self._eval_shard(), all_gather=gather_rows))
            self.log.log_epoch(record)
            if self.log.log_images and acc.is_main_process:  # kept on disk and shown in W&B
                folder = self.out_dir / "pictures" / f"step_{state.step:08d}"
                self.log.log_pictures(reports.write_pictures(self.raw_model, self.test_set, self.cfg, acc.device,
                                                             folder, reports.EPOCH_IMAGES), state.step)
        acc.wait_for_everyone()
        if self.last_saved_step != state.step:
            self.save()
        if complete:
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0

    def _eval_shard(self) -> dict:
        """Evaluation split across the processes (each its share, sums all-reduced): no rank idles."""
        acc = self.accelerator
        return {"shard": (acc.process_index, acc.num_processes),
                "all_reduce": lambda t: acc.reduce(t, reduction="sum")}

    def save(self) -> Path:
        """A checkpoint of the current state (all ranks call this). Never of weights that saw a
        non-finite loss."""
        self.guard.raise_if_bad()
        saved = dataclasses.replace(self.state)
        if saved.batch_in_epoch >= len(self.train_loader):  # the end of an epoch is the start of the next
            saved.epoch, saved.batch_in_epoch = saved.epoch + 1, 0
        elif saved.batch_in_epoch > 0 and self.sums is not None:  # mid-epoch: its sums so far
            saved.epoch_sums = self.sums.state(self.accelerator, self.sums.seconds_before +
                                               time.perf_counter() - self.epoch_started)
        self.last_saved_step = saved.step
        extra = None
        if self.ema is not None:
            saved.ema_updates = self.ema.updates
            extra = {checkpoint.EMA_FILE: self.ema.state_dict()}
        return checkpoint.save_checkpoint(self.accelerator, self.out_dir, self.cfg, saved,
                                          self.cfg.train.keep_checkpoints, self.scheduler, extra)

    def _restore_ema(self) -> None:
        """The moving average as the checkpoint has it; one without (EMA switched on now) starts it
        from the checkpoint's weights."""
        from safetensors.torch import load_file

        path = self.resumed_from / checkpoint.EMA_FILE
        if not path.is_file():
            self.accelerator.print(f"fastvae: {self.resumed_from} has no moving average: it starts from its weights")
            return
        try:
            self.ema.load_state_dict(load_file(str(path)), self.state.ema_updates or 0)
        except KeyError as err:
            raise UserError(f"checkpoint '{self.resumed_from}': {err.args[0]}; expected the moving average of the "
                            f"same trainable weights (model.train_decoder_only as when it was saved)") from None

    # ---------------------------------------------------------------- the end of the run

    def _finish(self) -> dict:
        result = {"step": self.state.step, "epoch": self.state.epoch, "out_dir": str(self.out_dir),
                  "skipped_batches": self.guard.skipped, "param_checksum": param_checksum(self.raw_model),
                  "stopped_by": self.stop.name, "signals": self.stop.received}
        if self.accelerator.num_processes > 1:
            result["ranks_agree"] = ranks_agree(self.raw_model)
        if self.cfg.train.compile:  # what dynamo built in this process: 1 graph and 0 breaks is the goal
            result.update(compile_counts())
        # stop.requested() agrees across ranks (a signal may reach one rank only): all or none evaluate
        final_eval = self.cfg.train.final_eval and not self.stop.requested()
        if final_eval:
            self.accelerator.print("fastvae: the final evaluation on the test split...", flush=True)
        report = self._final_eval() if final_eval else None
        if self.accelerator.is_main_process:
            self._final_outputs(result, report)
        self.log.close()
        self.accelerator.wait_for_everyone()
        return result

    def _final_outputs(self, result: dict, eval_report: dict | None) -> None:
        """Main process: the final pictures, artifact and evaluation, or how to continue a stopped run."""
        cfg, step = self.cfg, self.state.step
        newest = checkpoint.list_checkpoints(self.out_dir)[-1]
        if self.stop.signum:
            print(f"fastvae: stopped by {self.stop.name} at step {step}; checkpoint {newest}; "
                  f"continue with train.resume=auto", flush=True)
        else:
            print(f"fastvae: drawing the final pictures (latent means of up to {reports.FINAL_IMAGES:,} test images)...",
                  flush=True)
            written = reports.write_pictures(self.raw_model, self.test_set, cfg, self.accelerator.device, self.out_dir)
            print(f"fastvae: wrote {', '.join(str(p) for p in written.values())}", flush=True)
            if cfg.wandb.log_checkpoint:
                self.log.log_checkpoint(newest, cfg.wandb.name or self.out_dir.name)
            print(f"fastvae: metrics in {self.log.path}, checkpoint {newest}", flush=True)
            if eval_report is not None:
                from fastvae.evaluation import print_report

                self.log.log_eval({**eval_report, "checkpoint": str(newest), "step": step}, step)
                print_report(eval_report)
        if self.guard.skipped:
            print(f"fastvae: skipped {self.guard.skipped} batch(es) with a non-finite loss", flush=True)
        (self.out_dir / "summary.json").write_text(json.dumps(result, indent=2))

    def _final_eval(self) -> dict:
        """fastvae.evaluate on the test split, every process evaluating its share."""
        from fastvae.evaluation import Likelihood, evaluate_model

        cfg = self.cfg
        return evaluate_model(self.raw_model, self.test_set, Likelihood.of_run(cfg.loss), cfg.train.final_eval_iwae,
                              max_images=cfg.train.final_eval_images or None, seed=cfg.seed,
                              conditioning=reports.test_conditioning(cfg, self.test_set), **self._eval_shard())


def compile_counts() -> dict:
    """What torch.compile built in this process so far: graphs, and graph breaks counted by dynamo."""
    from torch._dynamo.utils import counters

    return {"compiled_graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values())}


def param_checksum(model) -> float:
    return float(sum(p.detach().double().sum().item() for p in model.parameters()))
