"""A tiny latent-diffusion autoencoder run for tests: diffusers' AutoencoderKL with 2 levels of 8 and
16 channels on 28 x 28 MNIST, LDM's loss with LPIPS (VGG, random weights written in torchvision's
format: plumbing and gradients, not perceptual quality) and the discriminator from step 2."""

import torch
from torch import nn

from shared import built_once
from tools.random_weights import write_random_backbone

KL_MODEL = ["model.name=kl_autoencoder",
            "model.kwargs={block_out_channels: [8, 16], norm_num_groups: 4, latent_channels: 2}"]


def lpips_weights(tmp_path_factory) -> str:
    """The random VGG backbone file, written once per session."""
    folder = built_once(tmp_path_factory, "lpips_vgg", lambda f: write_random_backbone("vgg", f))
    return str(next(folder.glob("vgg16-*.pth")))


def kl_overrides(tmp_path_factory, *more: str) -> list[str]:
    """A tiny KL-autoencoder run's overrides of configs/mnist.yaml (TINY from helpers on top)."""
    return [*KL_MODEL, "loss.objective=ldm", "loss.beta=1e-6", f"loss.lpips_weights={lpips_weights(tmp_path_factory)}",
            "disc.weight=0.5", "disc.start=2", "data.batch_size=16", "train.samples=4", *more]


class ToyAutoencoder(nn.Module):
    """What the LDM objective asks of a model: pixels, output_logvar, last_layer."""

    def __init__(self, W):
        super().__init__()
        self.W, self.nll_logvar = W, nn.Parameter(torch.tensor(0.3))

    def pixels(self, output):
        return output

    def output_logvar(self):
        return self.nll_logvar

    def last_layer(self):
        return self.W


def kl_latent(kl):
    """The bottleneck's output as the LDM objective reads it: the KL per image."""
    from fastvae.bottleneck import Latent

    return Latent(None, kl, {}, None)
