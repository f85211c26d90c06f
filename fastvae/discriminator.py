"""The PatchGAN discriminator latent-diffusion autoencoders train against: pix2pix's
NLayerDiscriminator as taming-transformers and LDM use it (4x4 convolutions, LeakyReLU 0.2,
BatchNorm, one logit per patch) with their initialization (conv weights N(0, 0.02), norm weights
N(1, 0.02)). Written here because no library we use ships it (diffusers has the autoencoder, not the
critic); the layer layout matches taming's, so its checkpoints' tensors line up by name."""

from __future__ import annotations

from torch import nn


class NLayerDiscriminator(nn.Module):
    """[B, C, H, W] images in [-1, 1] -> [B, 1, h, w] patch logits. norm: batch (LDM's default; with
    several processes fastvae synchronizes it over the global batch) or none (no batch statistics)."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3, norm: str = "batch") -> None:
        super().__init__()
        use_bias = norm == "none"  # a norm after the conv makes its bias redundant (pix2pix)
        norm_layer = nn.BatchNorm2d if norm == "batch" else nn.Identity
        sequence = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        width = 1
        for n in range(1, layers + 1):
            previous, width = width, min(2 ** n, 8)
            stride = 2 if n < layers else 1
            sequence += [nn.Conv2d(channels * previous, channels * width, 4, stride, 1, bias=use_bias),
                         norm_layer(channels * width), nn.LeakyReLU(0.2, True)]
        sequence += [nn.Conv2d(channels * width, 1, 4, 1, 1)]
        self.main = nn.Sequential(*sequence)
        self.apply(_init)

    def forward(self, x):
        return self.main(x)


def _init(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)
