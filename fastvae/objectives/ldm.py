"""The latent-diffusion autoencoder's training loss (loss.objective=ldm), the generator's side: LDM's
LPIPSWithDiscriminator assembled from the terms in fastvae/losses.py, on images in [-1, 1], in float32
whatever the autocast dtype (the networks run in bf16 where train.mixed_precision says so; LPIPS and the
reductions do not).

    rec   = |x - x_hat| (or squared) + perceptual_weight * LPIPS(x, x_hat) on every pixel
    nll   = sum(rec / exp(logvar) + logvar) / B          logvar: the model's output_logvar()
    loss  = nll + beta * sum(KL) / B [+ d_weight * disc.factor * (-mean D(x_hat))  from disc.start]

Gradients flow through LPIPS into the decoder (diffusers' research script computed it under no_grad:
tests/test_kl_autoencoder.py checks that they reach it). The adversarial term and its adaptive weight
are the critic's (fastvae/critic.py), called here when train_step hands this step the critic; with it,
LPIPS and the discriminator run their backward once per step (LDM: twice, for the adaptive weight and
again in the total loss's backward), in a compiled step too (each autograd.grad call is a graph break
there, and the last layer a graph of its own: fastvae.critic.last_layer_in_a_graph_of_its_own).
"""

from __future__ import annotations

import torch

from fastvae import losses
from fastvae.errors import UserError
from fastvae.objectives.base import Objective, StepLoss
from fastvae.perceptual import lpips_distance


class LDMLoss(Objective):
    """perceptual: LPIPS (fastvae.perceptual.load_lpips) or None; backward_once=False: LDM's way (each
    backward twice), the reference the default is tested against."""

    trains_logvar = True
    measures_test_loss = True  # nll + beta x KL on test images (LPIPS and the log-variance included)

    def __init__(self, pixel: str = "l1", perceptual=None, perceptual_weight: float = 1.0, logvar_init: float = 0.0,
                 learn_logvar: bool = False, backward_once: bool = True) -> None:
        super().__init__(kind="mse", logvar_init=logvar_init, learn_logvar=learn_logvar)
        self.pixel, self.perceptual, self.perceptual_weight = pixel, perceptual, perceptual_weight
        self.backward_once = backward_once

    def prepare(self, model) -> None:
        """The model's output log-variance at loss.logvar_init, trained with loss.learn_logvar."""
        if model.output_logvar() is None:
            raise UserError(f"config key 'loss.objective': model {type(model).__name__} has no output log-variance "
                            f"(output_logvar() is None); expected a model with one for ldm (kl_autoencoder)")
        super().prepare(model)

    def __call__(self, model, x, latent, output, beta, capacity=None, critic=None) -> StepLoss:
        x_pm = (x * 2 - 1).float()
        x_hat = model.pixels(output).float()
        if critic is not None and self.backward_once:
            # compiled: x_hat must enter the NLL's graph from outside it, for autograd.grad(nll, x_hat) to
            # find it (a cast to float32 made inside the graph would be the graph's output, not its input)
            torch._dynamo.graph_break()
        logvar = model.output_logvar()
        use_lpips = self.perceptual is not None and self.perceptual_weight > 0
        distance = lpips_distance(self.perceptual, x_pm, x_hat) if use_lpips else None
        rec = losses.autoencoder_reconstruction(x_pm, x_hat, self.pixel, distance, self.perceptual_weight)
        nll = losses.autoencoder_nll(rec, logvar.float())
        nll_loss = nll.mean()  # LDM: sum / batch size
        terms = {"nll": nll_loss.detach(), "logvar": logvar.detach().float(),
                 "pixel": (x_pm - x_hat).abs().mean().detach() if self.pixel == "l1"
                 else (x_pm - x_hat).pow(2).mean().detach()}
        if distance is not None:
            terms["lpips"] = distance.mean().detach()
        def regularizer_term():
            return beta * latent.regularizer.float().mean()

        if critic is not None and not self.backward_once:
            adversarial, critic_terms = critic.adversarial_loss(x_hat, nll_loss, model.last_layer())
            terms.update(critic_terms)
            loss = nll_loss + regularizer_term() + adversarial
        elif critic is not None:
            loss = self._with_critic(critic, model, x_hat, nll_loss, regularizer_term, terms)
        else:
            loss = nll_loss + regularizer_term()
        return StepLoss(loss, rec.flatten(1).sum(1), latent.regularizer, terms, output)

    def _with_critic(self, critic, model, x_hat, nll_loss, regularizer_term, terms):
        """LDM's loss nll + beta x regularizer + d_weight x factor x G, as a tensor whose backward runs LPIPS's
        and the discriminator's backward once each: the gradients at x_hat (and at a learned logvar) are
        taken here for the adaptive weight anyway, so the backward of the returned tensor starts from them
        (value: the loss; gradient: the loss's, by the chain rule). The regularizer's term is made after
        that gradient (`regularizer_term()`): in a compiled step each autograd.grad call is a graph break,
        and a term made before it would share the NLL's compiled graph, whose backward the call frees."""
        logvar = model.output_logvar()
        learned = logvar.requires_grad
        nll_grads = torch.autograd.grad(nll_loss, [x_hat, logvar] if learned else [x_hat])  # LPIPS's backward
        rest = regularizer_term()
        adv_grad, adversarial, critic_terms = critic.adversarial_gradient(x_hat, nll_grads[0], model.last_layer())
        terms.update(critic_terms)
        surrogate = (x_hat * (nll_grads[0] + adv_grad)).sum() + rest
        if learned:
            surrogate = surrogate + (logvar * nll_grads[1]).sum()
        return surrogate + (nll_loss.detach() + rest.detach() + adversarial - surrogate.detach())

    @classmethod
    def likelihood_kind(cls, loss) -> str:
        return "mse"  # its decoder gives pixels, not logits
