"""The objectives a run trains with, one class each, built from loss.* by `build_objective`: the one
place that reads loss.objective (beside config's validation). Each is called by TrainForward as
(model, x, latent, output, beta, capacity, critic) -> StepLoss (fastvae/train_forward.py).

    elbo             Elbo       recon_weight x recon + beta x KL (BCE or MSE; sigma-VAE with loss.sigma)
    elbo + floors    BatchKL    free bits or capacity annealing on the global batch's KL per dimension
    iwae             IWAE       the importance-weighted bound with loss.samples samples (+ DReG)
    tcvae            TCVAE      beta-TCVAE's decomposition over the global batch
    ldm              LDMLoss    LDM's LPIPSWithDiscriminator (the critic's side: fastvae/critic.py)
"""

from __future__ import annotations

from fastvae.errors import UserError
from fastvae.objectives.base import Objective, StepLoss
from fastvae.objectives.elbo import TCVAE, BatchKL, Elbo
from fastvae.objectives.iwae import IWAE
from fastvae.objectives.ldm import LDMLoss

__all__ = ["Objective", "StepLoss", "Elbo", "BatchKL", "IWAE", "TCVAE", "LDMLoss", "objective_class",
           "build_objective"]


def objective_class(loss) -> type[Objective]:
    """The class loss.* trains with (iwae with one sample is the ELBO: the same loss)."""
    if loss.objective == "ldm":
        return LDMLoss
    if loss.objective == "tcvae":
        return TCVAE
    if loss.objective == "iwae" and loss.samples > 1:
        return IWAE
    if loss.free_bits > 0 or loss.capacity:
        return BatchKL
    return Elbo


def build_objective(cfg, recon_loss, dataset_size: int, processes: int = 1, device=None) -> Objective:
    """The objective of cfg.loss. recon_loss: the reconstruction op of train.ops; dataset_size: the
    training images (beta-TCVAE's N)."""
    loss, cls = cfg.loss, objective_class(cfg.loss)
    if cls is LDMLoss:
        return _ldm(cfg, device)
    common = {"recon_loss": recon_loss, "kind": loss.recon, "recon_weight": loss.recon_weight,
              "optimal_sigma": loss.sigma == "optimal", "logvar_init": loss.logvar_init,
              "learn_logvar": loss.learn_logvar}
    if cls is TCVAE:
        if processes > 1 and not cfg.data.drop_last:
            raise UserError("config key 'data.drop_last': loss.objective=tcvae gathers equal shares of the global "
                            "batch from every process; expected data.drop_last=true")
        return TCVAE(**common, tc_weight=loss.tc_weight, dataset_size=dataset_size)
    if cls is IWAE:
        return IWAE(**common, samples=loss.samples, dreg=loss.dreg)
    if cls is BatchKL:
        return BatchKL(**common, free_bits=loss.free_bits, capacity_gamma=loss.capacity_gamma if loss.capacity else None)
    return Elbo(**common)


def _ldm(cfg, device) -> LDMLoss:
    """LDM's loss: LPIPS loaded from its weights file (never downloaded)."""
    from fastvae.config import image_hw
    from fastvae.perceptual import check_image_size, load_lpips

    loss = cfg.loss
    perceptual = None
    if loss.perceptual_weight > 0:
        perceptual = load_lpips(loss.lpips_net, loss.lpips_weights)
        check_image_size(perceptual, loss.lpips_net, cfg.data.channels, *image_hw(cfg.data))
        if device is not None:
            perceptual.to(device)
    return LDMLoss(loss.pixel, perceptual, loss.perceptual_weight, loss.logvar_init, loss.learn_logvar)
