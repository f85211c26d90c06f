"""The training step's forward, images to loss, as one module: what DDP wraps and torch.compile
compiles, so that under both it is one graph (DDP's own Python stays outside it).

    encoded = model.encode(x)          the user's model
    latent  = bottleneck(encoded)      z and the regularizer per sample (fastvae/bottleneck.py)
    output  = model.decode(latent.z)   the user's model
    return objective(...)              the StepLoss (fastvae/objectives/)

Its state, in checkpoints and for the optimizer, is the model's: the objective's frozen networks
(LPIPS) are not part of it, and model.safetensors keeps the model's own tensor names.
"""

from __future__ import annotations

import torch
from torch import nn

from fastvae.objectives import StepLoss


class TrainForward(nn.Module):
    def __init__(self, model: nn.Module, bottleneck: nn.Module, objective) -> None:
        super().__init__()
        self.model, self.bottleneck = model, bottleneck
        self.objective = objective  # a plain attribute: not a submodule, so not in the state

    def forward(self, x: torch.Tensor, noise_key=None, beta: torch.Tensor | None = None,
                capacity: torch.Tensor | None = None, condition: torch.Tensor | None = None, critic=None) -> StepLoss:
        """noise_key: (seed, row counters) of fastvae.noise, to draw each sample's own eps; None: eps from
        torch's generator. beta (a tensor: a float would be baked into a compiled graph; and capacity's
        C). condition [B, condition_dim]: what a conditional model's encoder and decoder are given.
        critic: on the steps with an adversarial term (fastvae.critic), else None."""
        samples = self.objective.samples
        encoded = self.model.encode_with(x, condition)
        latent = self.bottleneck(encoded, noise_key, samples)
        repeated = condition if condition is None or samples == 1 else condition.repeat(samples, 1)
        dtype = encoded[0].dtype if isinstance(encoded, (tuple, list)) else encoded.dtype
        output = self.model.decode_with(latent.z.to(dtype), repeated)
        step = self.objective(self.model, x, latent, output, beta, capacity, critic)
        return step._replace(terms={**latent.terms, **step.terms}) if latent.terms else step  # (usage, perplexity)

    # the state is the model's, under its own names (checkpoints of fastvae.VAE models load as they are)
    def state_dict(self, *args, **kwargs):
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)
