"""The critic: the PatchGAN discriminator a latent-diffusion autoencoder trains against, its optimizer,
and its two parts of a training step. A component the Trainer drives only for loss.disc_weight > 0:
the plain ELBO step has no GAN code on its path.

- generator_term (inside the model's forward, from loss.disc_start on): -mean D(x_hat) through the
  frozen discriminator, weighed by LDM's adaptive weight ||grad NLL|| / (||grad G|| + 1e-4) at the
  decoder's last layer. Those gradients are averaged over all processes before their norms are taken:
  LDM takes them per rank, so on 8 GPUs it does not train what one GPU trains; here N x B/N does.
  LPIPS and the discriminator run their backward once per step, not twice (adversarial_gradient; a
  compiled model keeps LDM's way, adversarial_term).
- step (after the generator's optimizer step): the discriminator's loss on the same batch (the real
  images and the reconstructions the generator's step made, detached) and its optimizer step. LDM
  recomputes the reconstructions with the updated generator; reusing them saves a whole autoencoder
  forward and is the same loss on the images the step produced.
- Its BatchNorm is synchronized over the global batch with several processes (fastvae's
  GlooSyncBatchNorm / SyncBatchNorm): batch statistics of N shares equal one process's.
- Before loss.disc_start it is neither run nor trained (LDM runs it and both gradient norms every
  step with a zero weight, and updates its batch statistics): frozen, not just unweighted.
Its state (weights, optimizer) is prepared by accelerate and saved in every checkpoint.
"""

from __future__ import annotations

import torch

from fastvae import losses
from fastvae.config import image_hw
from fastvae.discriminator import NLayerDiscriminator
from fastvae.errors import UserError
from fastvae.ops import several_processes


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """t averaged over all processes (no gradient): the global batch's gradient from each rank's."""
    if not several_processes():
        return t
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def global_adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, weight: float) -> torch.Tensor:
    """LDM's adaptive weight from the last layer's gradients of the NLL and of G, each averaged over all
    processes first: the global batch's norms, whatever the split."""
    both = mean_over_processes(torch.stack([nll_grad.float(), g_grad.float()]))
    return losses.adaptive_weight(both[0], both[1], weight)


def adversarial_term(disc, x_hat: torch.Tensor, nll_loss: torch.Tensor, last_layer: torch.Tensor, weight: float,
                     factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_weight x factor x G, G, d_weight), LDM's way: both last-layer gradients from the losses (each a
    backward through LPIPS or the discriminator, kept for the total loss's backward). What a compiled
    model (train.compile) takes: there x_hat and the loss can be one compiled graph, with no gradient at
    x_hat to start from (adversarial_gradient); the gradients are averaged over all processes first."""
    g_loss = losses.generator_adversarial_loss(disc(x_hat.contiguous()).float())
    nll_grad, = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    g_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    d_weight = global_adaptive_weight(nll_grad, g_grad, weight)
    return d_weight * factor * g_loss, g_loss.detach(), d_weight


def adversarial_gradient(disc, x_hat: torch.Tensor, nll_grad: torch.Tensor, last_layer: torch.Tensor, weight: float,
                         factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_weight x factor x dG/dx_hat, G, d_weight): G = -mean disc(x_hat), d_weight LDM's adaptive weight
    ||grad NLL|| / (||grad G|| + 1e-4) at the last layer, from gradients averaged over all processes.

    LDM asks autograd for both last-layer gradients from the losses (backward through LPIPS and through
    the discriminator), then backpropagates the total loss through both again. Here each runs its
    backward once: the NLL's gradient at x_hat comes in (`nll_grad`), G's is taken here, and the
    last-layer gradients are those two pushed back through the last layer alone (the chain rule: the
    same numbers). The caller backpropagates x_hat with the sum (fastvae/autoencoder_loss.py)."""
    g_loss = losses.generator_adversarial_loss(disc(x_hat.contiguous()).float())
    g_grad, = torch.autograd.grad(g_loss, x_hat)  # the discriminator's backward, once (its graph is freed)
    nll_last, = torch.autograd.grad(x_hat, last_layer, nll_grad, retain_graph=True)
    g_last, = torch.autograd.grad(x_hat, last_layer, g_grad, retain_graph=True)
    d_weight = global_adaptive_weight(nll_last, g_last, weight)
    return d_weight * factor * g_grad, g_loss.detach(), d_weight


def check_image_size(module: torch.nn.Module, channels: int, height: int, width: int) -> None:
    """One forward of two images of this size, in one line if the PatchGAN's strides cannot take it."""
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(2, channels, height, width))
    except RuntimeError as err:
        raise UserError(f"config key 'disc.layers': a {module.main[0].out_channels}-channel PatchGAN cannot take "
                        f"{height}x{width} images ({str(err).splitlines()[0][:100]}); expected fewer disc.layers or "
                        f"larger images") from None
    finally:
        module.train()


class Critic:
    def __init__(self, cfg, accelerator, build_optimizer) -> None:
        from fastvae.models.sync_batchnorm import convert_sync_batchnorm

        loss, disc = cfg.loss, cfg.disc
        self.start, self.weight, self.factor = loss.disc_start, loss.disc_weight, loss.disc_factor
        self.d_loss = losses.D_LOSSES[loss.disc_loss]
        self.accelerator = accelerator
        module = NLayerDiscriminator(cfg.data.channels, disc.channels, disc.layers, disc.norm)
        check_image_size(module, cfg.data.channels, *image_hw(cfg.data))
        if accelerator.num_processes > 1 and disc.norm == "batch":
            module = convert_sync_batchnorm(module, accelerator.device)
        module.to(accelerator.device)
        optimizer = build_optimizer(module)
        self.disc, self.optimizer = accelerator.prepare(module, optimizer)  # (DDP wants trainable parameters)
        self.raw = accelerator.unwrap_model(self.disc).requires_grad_(False)  # trainable only in its own step
        self.active = False
        self.real = self.fake = None

    def begin_step(self, step: int) -> None:
        """Whether this step has the adversarial terms (step >= loss.disc_start)."""
        self.active = step >= self.start

    def generator_term(self, x: torch.Tensor, x_hat: torch.Tensor, nll_grad: torch.Tensor, last_layer):
        """(the weighed adversarial term's gradient at x_hat, its value d_weight x disc_factor x G, logged
        terms); keeps x and x_hat for this step's discriminator update."""
        self.real, self.fake = x.detach(), x_hat.detach()
        grad, g_loss, d_weight = adversarial_gradient(self.raw, x_hat, nll_grad, last_layer, self.weight, self.factor)
        return grad, d_weight * self.factor * g_loss, {"g_loss": g_loss, "d_weight": d_weight}

    def generator_loss_term(self, x: torch.Tensor, x_hat: torch.Tensor, nll_loss: torch.Tensor, last_layer):
        """(d_weight x disc_factor x G as a loss term, logged terms): LDM's way, for compiled models."""
        self.real, self.fake = x.detach(), x_hat.detach()
        term, g_loss, d_weight = adversarial_term(self.raw, x_hat, nll_loss, last_layer, self.weight, self.factor)
        return term, {"g_loss": g_loss, "d_weight": d_weight}

    def step(self) -> dict:
        """The discriminator's update on the batch the generator just trained on; its logged terms."""
        self.raw.requires_grad_(True)
        try:
            logits_real = self.disc(self.real.contiguous()).float()
            logits_fake = self.disc(self.fake.contiguous()).float()
            d_loss = self.factor * self.d_loss(logits_real, logits_fake)
            self.accelerator.backward(d_loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.raw.requires_grad_(False)
        self.real = self.fake = None
        return {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                "logits_fake": logits_fake.mean().detach()}
