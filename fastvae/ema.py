"""An exponential moving average of a model's trainable weights (train.ema_decay), as LDM's LitEma
keeps it: at update n (counted from 1) decay = min(ema_decay, (1 + n) / (10 + n)), then
shadow <- shadow - (1 - decay) (shadow - weight). Part of the run's state: checkpointed (its
weights as checkpoint.EMA_FILE, n in fastvae.json) and resumed exactly; generate, evaluate and export
use it unless asked not to.

Written here rather than taken from a library: torch's AveragedModel has no warm-up and keeps a
second copy of the whole module, and diffusers' EMAModel counts the warm-up one update later than
LitEma and costs its import (~1 s) in runs that have no other use for diffusers.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.decay, self.updates = decay, 0
        self.names = [name for name, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.shadow = [params[name].detach().clone() for name in self.names]

    def _params(self, model: torch.nn.Module) -> list[torch.Tensor]:
        params = dict(model.named_parameters())
        return [params[name].detach() for name in self.names]

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, self._params(model), 1.0 - decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().cpu().contiguous() for name, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], updates: int) -> None:
        if set(state) != set(self.names):
            raise KeyError(f"EMA weights for {len(state)} tensors, the model trains {len(self.names)}")
        self.shadow = [state[name].to(s.device, s.dtype) for name, s in zip(self.names, self.shadow)]
        self.updates = updates
