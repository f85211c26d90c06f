"""What every objective shares: the StepLoss it returns, and the reconstruction term of the decoder's
output (the eager reference or the fused op of train.ops; with the calibrated Gaussian decoder, its
negative log-likelihood under the variance that fits the global batch best)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from fastvae import losses
from fastvae.distributed import global_batch_mean
from fastvae.errors import UserError
from fastvae.ops import recon_loss_fp32


class StepLoss(NamedTuple):
    """One batch's forward, from images to loss: what train_step backpropagates and logs."""

    loss: torch.Tensor  # the scalar to backpropagate
    recon: torch.Tensor  # per image [B]: the reconstruction term
    regularizer: torch.Tensor  # per image [B]: the bottleneck's (the KL)
    terms: dict  # the objective's own logged terms, batch means
    output: torch.Tensor  # the decoder's output (what the critic judges, through model.pixels)


class Objective:
    """Called as (model, x, latent, output, beta, capacity, critic) -> StepLoss, with `latent` the
    bottleneck's (fastvae.bottleneck.Latent) and `output` the decoder's of latent.z. Subclasses set
    `samples` (latent samples per image) and say, as class methods of the run's loss.* config, what
    evaluation and the size estimate need of them."""

    samples = 1
    measures_test_loss = False  # True: its held-out loss is its own, on test images (reports.held_out_metrics)

    def __init__(self, recon_loss: Callable = recon_loss_fp32, kind: str = "bce", recon_weight: float = 1.0,
                 optimal_sigma: bool = False, logvar_init: float = 0.0, learn_logvar: bool = False) -> None:
        self.recon_loss, self.kind, self.recon_weight = recon_loss, kind, recon_weight
        self.optimal_sigma = optimal_sigma  # kind mse: -log N(x; x_hat, var I), var the global batch's MSE
        self.logvar_init, self.learn_logvar = logvar_init, learn_logvar  # a model's output log-variance (LDM's)

    def reconstruction(self, output: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per image: the reconstruction loss; with the calibrated Gaussian decoder its negative
        log-likelihood under the variance that fits the global batch best (a term: sigma2)."""
        recon = self.recon_loss(output, x, self.kind)
        if not self.optimal_sigma:
            return recon, {}
        pixels = x[0].numel()
        variance = losses.optimal_variance(global_batch_mean(recon) / pixels)
        return losses.gaussian_nll(recon, pixels, variance), {"sigma2": variance.detach()}

    trains_logvar = False  # whether loss.learn_logvar trains the model's output log-variance

    def prepare(self, model) -> None:
        """What this objective asks of the model before it is wrapped for training: the model's output
        log-variance (LDM's, fastvae.VAE.output_logvar) at loss.logvar_init, trained only by an
        objective that uses it and only with loss.learn_logvar."""
        logvar = model.output_logvar()
        if logvar is None:
            if self.learn_logvar:
                raise UserError(f"config key 'loss.learn_logvar': model {type(model).__name__} has no output "
                                f"log-variance to learn; expected a model with one (kl_autoencoder) or "
                                f"loss.learn_logvar=false")
            return
        logvar.data.fill_(self.logvar_init)
        logvar.requires_grad_(self.trains_logvar and self.learn_logvar)

    # ---------------------------------------------------------------- what evaluation needs, from loss.*

    @classmethod
    def likelihood_kind(cls, loss) -> str:
        """The decoder's likelihood evaluation scores with: bce (logits) or mse (images)."""
        return loss.recon

    @classmethod
    def samples_per_image(cls, loss) -> int:
        """Latent samples decoded per image in a training step (the size estimate's multiplier)."""
        return 1

    @classmethod
    def held_out_loss(cls, loss, recon: float, kl: float) -> float:
        """The test loss in training units from the test set's reconstruction term and KL per image."""
        return loss.recon_weight * recon + loss.beta * kl
