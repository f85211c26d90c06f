"""The built-in models: shapes, the original sizes unchanged, and any other size."""

import hashlib

import pytest
import torch

from fastvae.config import load_config
from fastvae.data.base import ImageTensorDataset
from fastvae.errors import UserError
from fastvae.models import ConvVAE, DFCVAE, build_model
from fastvae.trainer import Trainer
from helpers import CONFIGS, tiny_config


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


def architecture(model) -> tuple[str, float]:
    """The names and shapes of a model's tensors (hashed) and the sum of its initial parameters."""
    names = repr([(k, tuple(v.shape)) for k, v in model.state_dict().items()])
    return hashlib.md5(names.encode()).hexdigest(), float(sum(p.detach().double().sum() for p in model.parameters()))


# Measured on 875e167 (before any size was allowed): the lecture's 28x28 model and the DFC-VAE at 64 and
# 128 px keep their tensors and their seeded initialization, so their checkpoints load and train as before.
BEFORE_ANY_SIZE = {
    "conv_vae 28": (lambda: ConvVAE(2, 1), ("eccd083e2d4b6861c807aad250397b45", 26.24170938601179)),
    "dfc_vae 64": (lambda: DFCVAE(200, 3, 64, 0.1), ("72fc55378b3d14ffb2480fc741ee4c1e", 712.9780287633021)),
    "dfc_vae 128": (lambda: DFCVAE(200, 3, 128), ("552c40c3a05839b159ecde7874f2688b", 1250.3321946773171)),
}


@pytest.mark.parametrize("name", BEFORE_ANY_SIZE)
def test_the_original_sizes_keep_their_architecture(name):
    make, (names, init_sum) = BEFORE_ANY_SIZE[name]
    torch.manual_seed(0)
    got_names, got_sum = architecture(make())
    assert got_names == names and got_sum == pytest.approx(init_sum, rel=1e-12)


SIZES = [(1, 28, 28), (3, 32, 32), (3, 48, 80), (1, 50, 33), (4, 20, 36), (3, 256, 256)]


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["conv_vae", "dfc_vae"])
def test_built_in_models_train_a_step_at_any_size(name, shape, tmp_path):
    channels, height, width = shape
    batch = 2 if height * width > 10_000 else 8
    images = torch.randint(0, 256, (2 * batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    data = ImageTensorDataset(images, torch.zeros(2 * batch, dtype=torch.long))
    cfg = tiny_config(tmp_path / "run", "data.name=imagefolder", f"data.channels={channels}", f"model.name={name}",
                      f"data.image_size=[{height},{width}]", f"data.batch_size={batch}", "model.latent_dim=4")
    trainer = Trainer(cfg, datasets=(data, data))
    logits, mu, _, _ = trainer.raw_model(images[:batch].float() / 255)
    assert logits.shape == (batch, *shape) and mu.shape == (batch, 4)
    before = [p.detach().clone() for p in trainer.raw_model.parameters()]
    metrics = trainer.train_step(next(iter(trainer.train_loader)))
    assert torch.isfinite(metrics["loss"]) and metrics["stepped"]
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.raw_model.parameters()))


def test_a_size_a_model_cannot_take_is_one_line():
    with pytest.raises(UserError, match="DFCVAE needs images of at least 2x2 pixels"):
        build_model(load_config(CONFIGS / "mnist.yaml", ["data.name=imagefolder", "data.image_size=1",
                                                         "model.name=dfc_vae"]))


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

    model.use_reparam_kl(op)
    _, mu, _, kl = model(torch.rand(3, 1, 28, 28))
    assert calls == [(3, 2)] and torch.equal(kl, torch.zeros(3))
