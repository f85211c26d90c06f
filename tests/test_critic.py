"""The critic (fastvae/critic.py): built from its parts, active from its start step, its update of the
discriminator, and LDM's adaptive weight from the global batch's gradients (2 ranks = 1)."""

import pytest
import torch
from torch import nn

from fastvae import losses
from fastvae.critic import Critic, adversarial_gradient
from fastvae.discriminator import NLayerDiscriminator


def test_a_critic_is_built_from_its_parts_and_steps_on_what_it_is_given():
    """No config, no accelerator: a discriminator and its optimizer. active_at(step) from `start`;
    step(real, fake) is one Adam step on LDM's discriminator loss of exactly those images, and leaves
    the discriminator frozen for the generator's side."""
    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 8, 2, "none")
    reference = NLayerDiscriminator(3, 8, 2, "none")
    reference.load_state_dict(disc.state_dict())
    critic = Critic(disc, torch.optim.Adam(disc.parameters(), lr=1e-3), weight=0.5, factor=2.0, start=3,
                    loss="hinge")
    assert [critic.active_at(s) for s in (0, 2, 3, 9)] == [False, False, True, True]
    assert not any(p.requires_grad for p in disc.parameters())
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    terms = critic.step(real, fake)
    optimizer = torch.optim.Adam(reference.parameters(), lr=1e-3)
    want = 2.0 * losses.hinge_d_loss(reference(real), reference(fake))
    want.backward()
    optimizer.step()
    torch.testing.assert_close(terms["d_loss"], want.detach())
    for a, b in zip(disc.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in disc.parameters())


def lecam_transcription(real_logits, fake_logits, ema_real, ema_fake):
    """Tseng et al. 2021's regularizer on mean logits, as MaskBit's compute_lecam_loss writes it."""
    return (torch.relu(real_logits.mean() - ema_fake) ** 2 + torch.relu(ema_real - fake_logits.mean()) ** 2)


def lecam_steps(rank, world):
    """3 discriminator steps with LeCam on 8 images (a share per rank, DDP's averaged gradient), float64:
    its weights and moving averages."""
    import torch.distributed as dist

    from fastvae.critic import build_discriminator
    from fastvae.config import DiscConfig

    torch.manual_seed(0)
    disc = build_discriminator(3, 16, 16, DiscConfig(weight=0.5, channels=8, layers=2, norm="none",
                                                     lecam_weight=0.3, lecam_decay=0.9), world, "cpu").double()
    optimizer = torch.optim.SGD(disc.parameters(), lr=0.1)

    def backward(loss):
        loss.backward()
        for p in disc.parameters():
            if world > 1:
                dist.all_reduce(p.grad)
                p.grad /= world

    critic = Critic(disc, optimizer, weight=0.5, loss="hinge", backward=backward, lecam_weight=0.3, lecam_decay=0.9)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        real, fake = (torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
        share = slice(rank * 8 // world, (rank + 1) * 8 // world)
        critic.step(real[share], fake[share])
    return {k: v.clone() for k, v in disc.state_dict().items()}


def test_lecam_regularizes_the_discriminator_as_maskbit_and_2_processes_as_1(tmp_path):
    """One step against the transcription (the loss, the averages' update), then 3 steps on 2 gloo ranks:
    the weights and moving averages one process has (means over the global batch)."""
    from ranks import on_ranks

    torch.manual_seed(0)
    disc = NLayerDiscriminator(3, 8, 2, "none")
    disc.register_buffer("lecam_ema", torch.tensor([0.4, -0.2]))
    reference = NLayerDiscriminator(3, 8, 2, "none")
    reference.load_state_dict({k: v for k, v in disc.state_dict().items() if k != "lecam_ema"})
    critic = Critic(disc, torch.optim.SGD(disc.parameters(), lr=0.1), weight=0.5, lecam_weight=0.3, lecam_decay=0.9)
    g = torch.Generator().manual_seed(1)
    real, fake = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.rand(4, 3, 16, 16, generator=g) * 2 - 1
    terms = critic.step(real, fake)
    r, f = reference(real), reference(fake)
    want = losses.hinge_d_loss(r, f) + 0.3 * lecam_transcription(r, f, torch.tensor(0.4), torch.tensor(-0.2))
    torch.testing.assert_close(terms["d_loss"], want.detach())
    assert terms["lecam"] > 0
    torch.testing.assert_close(disc.lecam_ema, torch.stack([0.9 * 0.4 + 0.1 * r.mean(), 0.9 * -0.2 + 0.1 * f.mean()])
                               .detach())
    one = lecam_steps(0, 1)
    for state in on_ranks(lecam_steps, 2, tmp_path):
        for name, value in one.items():
            torch.testing.assert_close(state[name], value, rtol=1e-12, atol=1e-12, msg=name)
    assert one["lecam_ema"].abs().sum() > 0


def generator_gradient(rank, world, per_rank_weight=False):
    """The decoder's gradient of the adversarial term on 8 images (a share per rank, averaged as DDP
    does), with the critic's BatchNorm synchronized over the global batch as fastvae.critic does;
    per_rank_weight: LDM's adaptive weight from each rank's own gradients."""
    import torch.distributed as dist

    import fastvae.critic as critic
    from fastvae.models.sync_batchnorm import convert_sync_batchnorm

    torch.manual_seed(0)
    decoder = nn.Conv2d(4, 3, 3, padding=1).double()  # float64: what differs is the weighting, not rounding
    disc = NLayerDiscriminator(3, 8, 2).double()
    if world > 1:
        disc = convert_sync_batchnorm(disc, torch.device("cpu"))
    disc.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    h = torch.randn(8, 4, 16, 16, generator=g, dtype=torch.float64)
    x = torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    share = slice(rank * 8 // world, (rank + 1) * 8 // world)
    x_hat = torch.tanh(decoder(h[share]))
    nll_loss = (x[share] - x_hat).abs().flatten(1).sum(1).mean()
    if per_rank_weight:
        critic.mean_over_processes = lambda t: t
    nll_grad, = torch.autograd.grad(nll_loss, x_hat, retain_graph=True)
    adv_grad, _, _ = adversarial_gradient(disc, x_hat, nll_grad, decoder.weight, 0.5, 1.0)
    x_hat.backward(nll_grad + adv_grad)
    grad = decoder.weight.grad.clone()
    if world > 1:
        dist.all_reduce(grad)
    return grad / world


@pytest.mark.parametrize("per_rank_weight", [False, True])
def test_two_processes_give_the_adversarial_gradient_of_one(tmp_path, per_rank_weight):
    """With the gradient norms of the global batch, 2 x 4 images give 1 x 8's gradient; LDM's per-rank
    norms (each rank's own adaptive weight) do not."""
    from ranks import on_ranks

    one = generator_gradient(0, 1)
    two = on_ranks(generator_gradient, 2, tmp_path, per_rank_weight)
    for grad in two:
        if per_rank_weight:
            assert not torch.allclose(grad, one, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(grad, one, rtol=1e-10, atol=1e-12)


def test_the_last_layer_is_a_compiled_graph_of_its_own():
    """torch.compile breaks the graph before the model's last layer (a pre-hook), so the adaptive weight's
    two gradients of its weight run that layer's backward alone; outside torch.compile nothing changes."""
    from fastvae.critic import last_layer_in_a_graph_of_its_own

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.head = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

        def last_layer(self):
            return self.head.weight

        def forward(self, x):
            return self.head(torch.relu(self.body(x)))

    model, x = Model(), torch.randn(3, 4)
    before = model(x)
    torch._dynamo.reset()
    assert torch._dynamo.explain(model)(x).graph_break_count == 0
    last_layer_in_a_graph_of_its_own(model)
    torch.testing.assert_close(model(x), before)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 1 and explanation.graph_count == 2
