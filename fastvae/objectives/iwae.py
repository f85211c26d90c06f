"""The importance-weighted bound (Burda et al. 2016), optionally with doubly-reparameterized gradients
(DReG, Tucker et al. 2018): K samples per image, decoded together (the bottleneck draws them k-major)."""

from __future__ import annotations

from fastvae import losses
from fastvae.objectives.base import Objective, StepLoss


class IWAE(Objective):
    """The loss is minus the bound (beta-weighted): not recon + kl, which are reported beside it as the
    samples' mean reconstruction term and the closed-form KL."""

    def __init__(self, *args, samples: int = 2, dreg: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.samples, self.dreg = samples, dreg

    def __call__(self, model, x, latent, output, beta, capacity=None, critic=None) -> StepLoss:
        k, b = self.samples, x.shape[0]
        mu, logvar = latent.posterior
        recon = self.recon_loss(output, x.repeat(k, *([1] * (x.dim() - 1))), self.kind).view(k, b)
        log_w_terms = (-self.recon_weight * recon, latent.z.float().view(k, b, -1), mu.float(), logvar.float())
        loss = losses.iwae_loss(*log_w_terms, beta, dreg_z=latent.z if self.dreg else None).mean()
        return StepLoss(loss, recon.mean(0), latent.regularizer.view(k, b)[0], {"iwae_bound": -loss.detach()}, output)

    @classmethod
    def samples_per_image(cls, loss) -> int:
        return loss.samples
