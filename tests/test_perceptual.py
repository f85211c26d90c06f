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


def test_a_weights_folder_stands_for_the_file_it_holds_and_a_run_keeps_absolute_paths(tmp_path, tmp_path_factory,
                                                                                        monkeypatch):
    """loss.lpips_weights=FOLDER reads FOLDER/vgg16-397923af.pth (a folder without it is one line saying a
    file is expected); a relative path is kept absolute in the run's config, so evaluating from another
    folder finds it."""
    from fastvae.checkpoint import list_checkpoints, read_meta
    from fastvae.perceptual import load_lpips
    from fastvae.train import train
    from helpers import tiny_config
    from kl_runs import kl_overrides

    folder = tmp_path / "weights"
    folder.mkdir()
    shutil.copy(lpips_weights(tmp_path_factory), folder)
    assert load_lpips("vgg", str(folder)) is not None
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="'.*empty' is a folder without vgg16-397923af.pth; expected the file itself"):
        load_lpips("vgg", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    train(tiny_config("run", *kl_overrides(tmp_path_factory, "train.max_steps=1", "disc.weight=0", "disc.start=0"),
                      "loss.lpips_weights=weights"))
    saved = read_meta(list_checkpoints(tmp_path / "run")[-1])["config"]["loss"]["lpips_weights"]
    assert saved == str(folder)
