"""The training step's forward (fastvae/train_forward.py): encode -> bottleneck -> decode -> objective in
one module whose state is the model's own (checkpoints keep the model's tensor names), and the
lecture's loss from it."""

import torch

from fastvae import losses, noise
from fastvae.bottleneck import GaussianBottleneck
from fastvae.models import ConvVAE
from fastvae.objectives import Elbo, LDMLoss
from fastvae.train_forward import TrainForward


def test_its_state_is_the_models_and_the_objectives_networks_are_not_in_it():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=2)
    forward = TrainForward(model, GaussianBottleneck(), LDMLoss(perceptual=torch.nn.Linear(2, 2)))
    assert list(forward.state_dict()) == list(model.state_dict())
    assert [p for p in forward.parameters()] == [p for p in model.parameters()]
    forward.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    assert all(float(v.abs().sum()) == 0 for v in model.state_dict().values() if v.is_floating_point())


def test_the_elbo_step_is_the_lectures_loss_with_keyed_noise():
    torch.manual_seed(0)
    model = ConvVAE(latent_dim=2)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    key = (torch.tensor(3), noise.row_offsets(torch.arange(4), 2, 0))
    out = TrainForward(model, GaussianBottleneck(), Elbo(recon_weight=2.0))(x, key, torch.tensor(0.5))
    mu, logvar = model.encode(x)
    z = losses.reparameterize(mu, logvar, noise.keyed_normal(key[0], key[1], 2))
    recon = losses.reconstruction_loss(model.decode(z), x, "bce")
    want = losses.vae_loss(recon, losses.kl_divergence(mu, logvar), 2.0, 0.5)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-4)
    assert out.recon.shape == out.regularizer.shape == (4,) and out.output.shape == x.shape
