"""The latent-diffusion autoencoder's training loss (loss.objective=ldm), the generator's side: LDM's
LPIPSWithDiscriminator assembled from the terms in fastvae/losses.py, on images in [-1, 1], in float32
whatever the autocast dtype (the networks run in bf16 where train.mixed_precision says so; LPIPS and the
reductions do not).

    rec   = |x - x_hat| (or squared) + perceptual_weight * LPIPS(x, x_hat) on every pixel
    nll   = sum(rec / exp(logvar) + logvar) / B          logvar: model.nll_logvar
    loss  = nll + beta * sum(KL) / B [+ d_weight * disc_factor * (-mean D(x_hat))  from loss.disc_start]

Gradients flow through LPIPS into the decoder (diffusers' research script computed it under no_grad:
tests/test_kl_autoencoder.py checks that they reach it). The adversarial term and its adaptive weight
are the critic's (fastvae/critic.py); with it, LPIPS and the discriminator run their backward once per
step (LDM: twice, for the adaptive weight and again in the total loss's backward), except under
train.compile, where LDM's way is kept (the loss and x_hat may be one compiled graph).
"""

from __future__ import annotations

import torch

from fastvae import losses
from fastvae.perceptual import lpips_distance


class AutoencoderLoss:
    """Called by the model's forward as (model, x, output, kl[B], beta) -> (loss, recon[B], terms)."""

    def __init__(self, pixel: str = "l1", perceptual=None, perceptual_weight: float = 1.0, critic=None,
                 compiled: bool = False) -> None:
        self.pixel, self.perceptual, self.perceptual_weight, self.critic = pixel, perceptual, perceptual_weight, critic
        self.compiled = compiled  # train.compile: x_hat may be inside one compiled graph with the loss

    def __call__(self, model, x: torch.Tensor, output: torch.Tensor, kl: torch.Tensor, beta: torch.Tensor):
        x_pm = (x * 2 - 1).float()
        x_hat = model.pixels(output).float()
        use_lpips = self.perceptual is not None and self.perceptual_weight > 0
        distance = lpips_distance(self.perceptual, x_pm, x_hat) if use_lpips else None
        rec = losses.autoencoder_reconstruction(x_pm, x_hat, self.pixel, distance, self.perceptual_weight)
        nll = losses.autoencoder_nll(rec, model.nll_logvar.float())
        nll_loss = nll.mean()  # LDM: sum / batch size
        kl_term = beta * kl.float().mean()
        loss = nll_loss + kl_term
        terms = {"nll": nll_loss.detach(), "logvar": model.nll_logvar.detach().float(),
                 "pixel": (x_pm - x_hat).abs().mean().detach() if self.pixel == "l1"
                 else (x_pm - x_hat).pow(2).mean().detach()}
        if distance is not None:
            terms["lpips"] = distance.mean().detach()
        if self.critic is not None and self.critic.active:
            if self.compiled:
                adversarial, critic_terms = self.critic.generator_loss_term(x_pm, x_hat, nll_loss, model.last_layer())
                terms.update(critic_terms)
                loss = loss + adversarial
            else:
                loss = self._with_critic(model, x_pm, x_hat, nll_loss, kl_term, terms)
        return loss, rec.flatten(1).sum(1), terms

    def _with_critic(self, model, x_pm, x_hat, nll_loss, rest, terms):
        """LDM's loss nll + rest + d_weight x factor x G, as a tensor whose backward runs LPIPS's and the
        discriminator's backward once each: the gradients at x_hat (and at a learned logvar) are taken
        here for the adaptive weight anyway, so the backward of the returned tensor starts from them
        (value: the loss; gradient: the loss's, by the chain rule)."""
        logvar = model.nll_logvar
        learned = logvar.requires_grad
        nll_grads = torch.autograd.grad(nll_loss, [x_hat, logvar] if learned else [x_hat])  # LPIPS's backward
        adv_grad, adversarial, critic_terms = self.critic.generator_term(x_pm, x_hat, nll_grads[0],
                                                                         model.last_layer())
        terms.update(critic_terms)
        surrogate = (x_hat * (nll_grads[0] + adv_grad)).sum() + rest
        if learned:
            surrogate = surrogate + (logvar * nll_grads[1]).sum()
        return surrogate + (nll_loss.detach() + rest.detach() + adversarial - surrogate.detach())
