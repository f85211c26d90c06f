"""The critic: the PatchGAN discriminator a latent-diffusion autoencoder trains against, its optimizer,
and its two parts of a training step. A component built from its parts (no config needed) that the
Trainer has only for disc.weight > 0: the plain ELBO step has no GAN code on its path.

- The generator's side, called by the LDM objective (fastvae/objectives/ldm.py) where its loss is
  made, on the steps train_step hands it the critic (step >= disc.start): -mean D(x_hat) through the
  frozen discriminator, weighed by LDM's adaptive weight ||grad NLL|| / (||grad G|| + 1e-4) at the
  decoder's last layer. Those gradients are averaged over all processes before their norms are taken:
  LDM takes them per rank, so on 8 GPUs it does not train what one GPU trains; here N x B/N does.
  `adversarial_gradient` runs LPIPS's and the discriminator's backward once per step, eager or
  compiled; `adversarial_loss` is LDM's way (twice), the tested reference of the same numbers.
- `step(real, fake)`, called by train_step after the generator's optimizer step: the discriminator's
  loss on the same batch (the real images and the reconstructions the generator's step made,
  detached) and its optimizer step. LDM recomputes the reconstructions with the updated generator;
  reusing them saves a whole autoencoder forward and is the same loss on the images the step produced.
- LeCam regularization (disc.lecam_weight; MAGVIT-v2, MaskBit) of the discriminator's loss, on the
  global batch's mean logits, its moving averages a buffer of the discriminator (checkpointed).
- Its BatchNorm is synchronized over the global batch with several processes (fastvae's
  GlooSyncBatchNorm / SyncBatchNorm): batch statistics of N shares equal one process's.
- Before disc.start it is neither run nor trained (LDM runs it and both gradient norms every step
  with a zero weight, and updates its batch statistics): frozen, not just unweighted.
Its state (weights, optimizer) is prepared by accelerate and saved in every checkpoint.
"""

from __future__ import annotations

import torch

from fastvae import losses
from fastvae.discriminator import NLayerDiscriminator
from fastvae.distributed import global_batch_mean, mean_over_processes
from fastvae.errors import UserError


def global_adaptive_weight(nll_grad: torch.Tensor, g_grad: torch.Tensor, weight: float) -> torch.Tensor:
    """LDM's adaptive weight from the last layer's gradients of the NLL and of G, each averaged over all
    processes first: the global batch's norms, whatever the split."""
    both = mean_over_processes(torch.stack([nll_grad.float(), g_grad.float()]))
    return losses.adaptive_weight(both[0], both[1], weight)


def adversarial_term(disc, x_hat: torch.Tensor, nll_loss: torch.Tensor, last_layer: torch.Tensor, weight: float,
                     factor: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d_weight x factor x G, G, d_weight), LDM's way: both last-layer gradients from the losses (each a
    backward through LPIPS or the discriminator, kept for the total loss's backward): the reference
    adversarial_gradient is tested against; the gradients are averaged over all processes first."""
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
    same numbers). The caller backpropagates x_hat with the sum (fastvae/objectives/ldm.py)."""
    g_loss = losses.generator_adversarial_loss(disc(x_hat.contiguous()).float())
    g_grad, = torch.autograd.grad(g_loss, x_hat)  # the discriminator's backward, once (its graph is freed)
    nll_last, = torch.autograd.grad(x_hat, last_layer, nll_grad, retain_graph=True)
    g_last, = torch.autograd.grad(x_hat, last_layer, g_grad, retain_graph=True)
    d_weight = global_adaptive_weight(nll_last, g_last, weight)
    return d_weight * factor * g_grad, g_loss.detach(), d_weight


def graph_break(module, args) -> None:
    torch._dynamo.graph_break()  # (nothing outside torch.compile)


def last_layer_in_a_graph_of_its_own(model: torch.nn.Module) -> None:
    """In a compiled step, the model's last layer (whose gradients the adaptive weight takes twice)
    is a compiled graph of its own: torch.compile breaks the graph before it (a forward pre-hook), so
    asking autograd for its weight's gradient runs that layer's backward alone, not the whole
    decoder's compiled backward (measured on the KL autoencoder, fp32, a CPU: the compiled adversarial
    step 1.3x slower without it, benchmarks/train_throughput.py --parts kl --kl-modes compiled)."""
    last = model.last_layer()
    owner = next((m for m in model.modules() if any(p is last for p in m.parameters(recurse=False))), None)
    if owner is not None:
        owner.register_forward_pre_hook(graph_break)


def allow_repeated_backward() -> None:
    """The last layer's compiled graph runs its backward three times in an adversarial step (the two
    gradients of the adaptive weight, then the loss's), which torch's donated buffers (freed after one
    backward) forbid: they are switched off."""
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


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


def build_discriminator(channels: int, height: int, width: int, disc, processes: int, device) -> torch.nn.Module:
    """The PatchGAN disc.* describes, checked against the image size, its BatchNorm synchronized over
    the global batch with several processes, on the device."""
    from fastvae.models.sync_batchnorm import convert_sync_batchnorm

    module = NLayerDiscriminator(channels, disc.channels, disc.layers, disc.norm)
    check_image_size(module, channels, height, width)
    if disc.lecam_weight:  # LeCam's moving averages of the mean (real, fake) logits: its state, checkpointed
        module.register_buffer("lecam_ema", torch.zeros(2))
    if processes > 1 and disc.norm == "batch":
        module = convert_sync_batchnorm(module, device)
    return module.to(device)


class Critic:
    """The discriminator (as prepared: DDP-wrapped with several processes), its optimizer, and the
    weights of its term: `weight` (disc.weight, times LDM's adaptive weight), `factor`, `start` (the
    first step with the adversarial terms), `loss` (hinge or vanilla). `backward`: how the
    discriminator's loss is backpropagated (the accelerator's, for loss scaling); default autograd's."""

    def __init__(self, discriminator: torch.nn.Module, optimizer, weight: float, factor: float = 1.0, start: int = 0,
                 loss: str = "hinge", backward=None, lecam_weight: float = 0.0, lecam_decay: float = 0.999) -> None:
        self.disc, self.optimizer = discriminator, optimizer
        self.weight, self.factor, self.start = weight, factor, start
        self.lecam_weight, self.lecam_decay = lecam_weight, lecam_decay
        self.d_loss = losses.D_LOSSES[loss]
        self.backward = backward or torch.Tensor.backward
        self.raw = getattr(discriminator, "module", discriminator).requires_grad_(False)  # trained only in step()

    def active_at(self, step: int) -> bool:
        """Whether step `step` has the adversarial terms (step >= disc.start)."""
        return step >= self.start

    def adversarial_gradient(self, x_hat: torch.Tensor, nll_grad: torch.Tensor, last_layer):
        """The generator's side with LPIPS's and the discriminator's backward once each: (the weighed
        adversarial term's gradient at x_hat, its value d_weight x factor x G, logged terms)."""
        grad, g_loss, d_weight = adversarial_gradient(self.raw, x_hat, nll_grad, last_layer, self.weight, self.factor)
        return grad, d_weight * self.factor * g_loss, {"g_loss": g_loss, "d_weight": d_weight}

    def adversarial_loss(self, x_hat: torch.Tensor, nll_loss: torch.Tensor, last_layer):
        """The generator's side LDM's way, as a loss term (d_weight x factor x G, logged terms): both
        last-layer gradients taken from the losses, so LPIPS and the discriminator run their backward
        twice (LDMLoss(backward_once=False): the reference the one-backward way is tested against)."""
        term, g_loss, d_weight = adversarial_term(self.raw, x_hat, nll_loss, last_layer, self.weight, self.factor)
        return term, {"g_loss": g_loss, "d_weight": d_weight}

    def step(self, real: torch.Tensor, fake: torch.Tensor) -> dict:
        """The discriminator's update on real images and the generator's reconstructions of them (both
        in [-1, 1], no gradient to the generator); its logged terms."""
        dtype = next(self.raw.parameters()).dtype  # float32 (bf16 reconstructions are not the critic's dtype)
        real, fake = real.detach().to(dtype).contiguous(), fake.detach().to(dtype).contiguous()
        self.raw.requires_grad_(True)
        try:
            logits_real = self.disc(real).to(dtype)  # (float32 from an autocast region)
            logits_fake = self.disc(fake).to(dtype)
            d_loss = self.factor * self.d_loss(logits_real, logits_fake)
            if self.lecam_weight:
                lecam = self._lecam(logits_real, logits_fake)
                d_loss = d_loss + self.lecam_weight * lecam
            self.backward(d_loss)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        finally:
            self.raw.requires_grad_(False)
        terms = {"d_loss": d_loss.detach(), "logits_real": logits_real.mean().detach(),
                 "logits_fake": logits_fake.mean().detach()}
        if self.lecam_weight:
            terms["lecam"] = lecam.detach()
        return terms

    def _lecam(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """LeCam's regularizer as MaskBit writes it, on the global batch's mean logits (differentiable,
        so DDP's average of the ranks' gradients is one process's): relu(real - ema_fake)^2 +
        relu(ema_real - fake)^2, then the moving averages take this step's means."""
        means = torch.stack([global_batch_mean(logits.flatten(1).mean(1)) for logits in (logits_real, logits_fake)])
        ema = self.raw.lecam_ema
        lecam = torch.relu(means[0] - ema[1]).pow(2) + torch.relu(ema[0] - means[1]).pow(2)
        with torch.no_grad():
            ema.mul_(self.lecam_decay).add_(means.detach().to(ema.dtype), alpha=1 - self.lecam_decay)
        return lecam
