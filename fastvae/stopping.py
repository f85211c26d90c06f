"""Reasons a training run stops early, checked at step boundaries by fastvae.train.

- StopSignal: SIGTERM / SIGINT (and SIGUSR2 in SLURM jobs, the time-limit
  warning) ask for a checkpoint at the next step boundary and a clean exit
  (128 + signal number, the shell convention).
- NonFiniteGuard: a NaN/inf reconstruction or KL term either stops the run
  (default, before anything non-finite is checkpointed) or skips the batch.

With several processes every decision is all-reduced, so all ranks stop or
skip at the same step (a rank that stopped alone would hang the others).
"""

from __future__ import annotations

import signal

import torch

from fastvae.errors import NonFiniteLoss


DEFAULT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    def __init__(self, accelerator, signals=DEFAULT_STOP_SIGNALS) -> None:
        self.accelerator = accelerator
        self.signum: int | None = None  # the first one: why we stopped
        self.received: list[str] = []  # all of them (a preempted SLURM job gets SIGTERM, then SIGUSR2)
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): signals stay as they are
                pass

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.received.append(signal.Signals(signum).name)
        if self.signum is None:
            self.signum = signum

    def requested(self, sync: bool = True) -> bool:
        """Whether to stop now. One process: its own flag. Several: they must stop at the same step,
        which takes an all-reduce (a host sync): only when `sync` (log points, epoch ends)."""
        local = float(self.signum or 0)
        if self.accelerator.num_processes == 1:
            return bool(local)
        if not sync:
            return False
        flag = torch.tensor([local], device=self.accelerator.device)
        value = self.accelerator.reduce(flag, reduction="max").item()
        if value and self.signum is None:
            self.signum = int(value)
        return bool(value)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class NonFiniteGuard:
    """Watches recon and KL every step.

    Policy "stop" never reads the device in the step, on any device (the same code runs on CPU and
    CUDA, so CPU tests check what a GPU runs): the first bad step and its term are recorded on the
    device and read at log points and before every checkpoint, so nothing non-finite is ever saved
    and the run stops within log_every steps of the first bad one, naming that step. Policy "skip"
    must decide before the optimizer step: it reads one flag per step.
    """

    def __init__(self, policy: str, accelerator, out_dir=None) -> None:
        self.policy = policy
        self.accelerator = accelerator
        self.out_dir = out_dir  # where its checkpoints are, for the message (None: not said)
        self.first_bad = torch.full((2,), -1.0, device=accelerator.device)  # [step, term: 0 recon / 1 kl]
        self.skipped = 0

    def _bad_flags(self, recon: torch.Tensor, kl: torch.Tensor) -> torch.Tensor:
        return torch.stack([~torch.isfinite(recon.detach()).all(), ~torch.isfinite(kl.detach()).all()]).float()

    def batch_is_bad(self, step: int, recon: torch.Tensor, kl: torch.Tensor) -> bool:
        """Policy skip: True when this batch must be skipped (on any rank). Policy stop: record / raise."""
        flags = self._bad_flags(recon, kl)
        if self.policy == "skip":
            if self.accelerator.num_processes > 1:
                flags = self.accelerator.reduce(flags, reduction="max")
            bad = bool(flags.any().item())
            self.skipped += int(bad)
            return bad
        term = torch.argmax(flags).float()
        fresh = (self.first_bad[0] < 0) & (flags.max() > 0)
        # the step as a fill on the device: torch.tensor(step, device=...) would be a blocking copy per step
        self.first_bad = torch.where(fresh, torch.stack([flags.new_full((), float(step)), term]), self.first_bad)
        return False

    def raise_if_bad(self) -> None:
        if self.policy != "stop":
            return
        first = self.first_bad
        if self.accelerator.num_processes > 1:
            # the earliest bad step on any rank: max of (-step) over ranks that saw one
            flagged = torch.where(first[0] >= 0, first, torch.tensor([-1.0, 0.0], device=first.device))
            gathered = self.accelerator.gather(flagged.unsqueeze(0))
            seen = gathered[gathered[:, 0] >= 0]
            first = seen[seen[:, 0].argmin()] if len(seen) else flagged
        step, term = first.tolist()
        if step >= 0:
            name = ("recon", "kl")[int(term)]
            raise NonFiniteLoss(f"non-finite {name} at step {int(step) + 1}; expected finite losses "
                                f"(lower optim.lr, check the data, or train.nonfinite=skip); {self._kept()}")

    def _kept(self) -> str:
        from fastvae.checkpoint import last_good

        if self.out_dir is None:
            return "nothing non-finite was checkpointed"
        good = last_good(self.out_dir)
        return f"the last good checkpoint is kept: {good}" if good != "none" else "no checkpoint was written before it"
