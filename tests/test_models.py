import pytest
import torch

from fastvae.config import load_config
from fastvae.models import ConvVAE, DFCVAE, build_model
from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("latent_dim", [2, 16])
def test_conv_vae_shapes(latent_dim):
    model = ConvVAE(latent_dim=latent_dim)
    x = torch.rand(5, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, latent_dim)
    assert model.decode(mu).shape == (5, 1, 28, 28)
    logits, mu2, logvar2, kl = model(x)
    assert logits.shape == (5, 1, 28, 28) and kl.shape == (5,)
    assert (kl >= 0).all()


@pytest.mark.parametrize("image_size", [64, 128])
def test_dfc_vae_shapes(image_size):
    model = DFCVAE(latent_dim=200, image_size=image_size, dropout=0.1)
    x = torch.rand(2, 3, image_size, image_size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (2, 200)
    logits, _, _, kl = model(x)
    assert logits.shape == (2, 3, image_size, image_size) and kl.shape == (2,)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"BatchNorm2d", "Dropout2d", "LeakyReLU", "Upsample"} <= kinds
    # decoder returns logits: unbounded, not squashed into [0, 1]
    with torch.no_grad():
        out = model.decode(torch.randn(4, 200) * 10)
    assert out.min() < 0 or out.max() > 1


def test_dfc_vae_rejects_other_sizes():
    with pytest.raises(ValueError, match="expected 64 or 128"):
        DFCVAE(image_size=32)


def test_build_model_from_configs():
    mnist = build_model(load_config(CONFIGS / "mnist.yaml"))
    assert isinstance(mnist, ConvVAE) and mnist.latent_dim == 2
    celeba = build_model(load_config(CONFIGS / "celeba.yaml"))
    assert isinstance(celeba, DFCVAE) and celeba.latent_dim == 200


def test_reparam_op_is_swappable():
    model = ConvVAE(latent_dim=2)
    calls = []

    def op(mu, logvar):
        calls.append(mu.shape)
        return mu, torch.zeros(mu.shape[0])

    model.reparam_kl = op
    _, mu, _, kl = model(torch.rand(3, 1, 28, 28))
    assert calls == [(3, 2)] and torch.equal(kl, torch.zeros(3))
