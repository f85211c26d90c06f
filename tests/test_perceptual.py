"""LPIPS (fastvae/perceptual.py): its backbone from the torch hub cache or a path, never downloaded,
and its gradients reaching the decoder."""

import shutil

import pytest
import torch
from torch import nn

from fastvae.errors import UserError
from kl_runs import ToyAutoencoder, kl_latent, lpips_weights

pytest.importorskip("diffusers")


def test_gradients_flow_through_lpips_into_the_decoder(tmp_path_factory):
    """diffusers' research script computed LPIPS under torch.no_grad(): no perceptual gradient reached the
    VAE. Here the perceptual term changes the decoder's gradient (under no_grad it would not)."""
    from fastvae.objectives import LDMLoss
    from fastvae.perceptual import load_lpips

    lpips = load_lpips("vgg", lpips_weights(tmp_path_factory))
    g = torch.Generator().manual_seed(4)
    x, h = torch.rand(2, 3, 32, 32, generator=g), torch.randn(2, 32, 32, 3, generator=g)
    grads = []
    for perceptual in (None, lpips):
        W = nn.Parameter(torch.randn(3, 3, generator=torch.Generator().manual_seed(5)))
        model = ToyAutoencoder(W)
        loss = LDMLoss("l1", perceptual, 1.0)(model, x, kl_latent(torch.zeros(2)), torch.tanh(h @ W).permute(0, 3, 1, 2),
                                              torch.tensor(0.0)).loss
        grads.append(torch.autograd.grad(loss, W)[0])
    assert (grads[1] - grads[0]).abs().max() > 1e-3 * grads[0].abs().max()


def test_lpips_weights_come_from_the_torch_hub_cache(tmp_path, tmp_path_factory, monkeypatch):
    from fastvae.perceptual import BACKBONE_FILES, backbone_path, hub_checkpoints

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(UserError, match=f"expected {BACKBONE_FILES['vgg']} in {hub_checkpoints()} .* fastvae never "
                                        f"downloads: copy https://download.pytorch.org/models/vgg16-397923af.pth"):
        backbone_path("vgg")
    hub_checkpoints().mkdir(parents=True)
    shutil.copy(lpips_weights(tmp_path_factory), hub_checkpoints())
    assert backbone_path("vgg") == hub_checkpoints() / BACKBONE_FILES["vgg"]
