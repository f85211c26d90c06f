"""The one-sample objectives: the ELBO (beta, warm-up and cyclical schedules come in as beta), the KL
floors of the global batch (free bits, capacity annealing) and beta-TCVAE's decomposition."""

from __future__ import annotations

from fastvae import losses
from fastvae.distributed import global_batch, global_batch_mean
from fastvae.objectives.base import Objective, StepLoss


class Elbo(Objective):
    """recon_weight x mean(recon) + beta x mean(KL): the lecture's loss (and the calibrated decoder's,
    with optimal_sigma)."""

    def __call__(self, model, x, latent, output, beta, capacity=None, critic=None) -> StepLoss:
        recon, terms = self.reconstruction(output, x)
        return StepLoss(losses.vae_loss(recon, latent.regularizer, self.recon_weight, beta), recon,
                        latent.regularizer, terms, output)


class BatchKL(Objective):
    """The KL term from the global batch's mean KL per dimension: free bits (beta x sum_j max(floor, KL_j))
    or a capacity (gamma x |sum_j KL_j - C|, C given per step as `capacity`)."""

    def __init__(self, *args, free_bits: float = 0.0, capacity_gamma: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.free_bits, self.capacity_gamma = free_bits, capacity_gamma

    def __call__(self, model, x, latent, output, beta, capacity=None, critic=None) -> StepLoss:
        recon, terms = self.reconstruction(output, x)
        mu, logvar = latent.posterior
        kl_mean = global_batch_mean(losses.kl_divergence_per_dim(mu.float(), logvar.float()))
        gamma = self.capacity_gamma if self.capacity_gamma is not None else 1.0  # (`or 1.0` would make 0 one)
        kl_loss = losses.kl_term(kl_mean, beta, self.free_bits, capacity, gamma)
        return StepLoss(self.recon_weight * recon.mean() + kl_loss, recon, latent.regularizer,
                        {**terms, "kl_term": kl_loss.detach()}, output)


class TCVAE(Objective):
    """beta-TCVAE: q(z) estimated from the posteriors of the global batch (gathered with their
    gradients), so N processes x B/N train what one process x B trains. Its terms: mutual
    information, total correlation and dimension-wise KL, batch means. dataset_size: N of the
    minibatch-weighted sampling estimator (the training images)."""

    def __init__(self, *args, tc_weight: float = 6.0, dataset_size: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tc_weight, self.dataset_size = tc_weight, dataset_size

    def __call__(self, model, x, latent, output, beta, capacity=None, critic=None) -> StepLoss:
        recon, terms = self.reconstruction(output, x)
        mu, logvar = latent.posterior
        z, mu, logvar = latent.z.float(), mu.float(), logvar.float()
        mi, tc, dimension_kl = losses.tc_decomposition(z, mu, logvar, self.dataset_size, global_batch(mu),
                                                       global_batch(logvar))
        kl_loss = losses.tcvae_kl_term(mi, tc, dimension_kl, beta, self.tc_weight).mean()
        tc_terms = {"mi": mi.mean().detach(), "tc": tc.mean().detach(), "dimension_kl": dimension_kl.mean().detach()}
        return StepLoss(self.recon_weight * recon.mean() + kl_loss, recon, latent.regularizer,
                        {**terms, **tc_terms}, output)

