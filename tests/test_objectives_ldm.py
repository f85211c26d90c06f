"""The latent-diffusion autoencoder's objective (fastvae/objectives/ldm.py): LDM's loss term by term
against a float64 transcription of LPIPSWithDiscriminator, with real LPIPS and the real Critic, both
ways of taking the adaptive weight, and the precision its parts run in."""

import pytest
import torch
from torch import nn

from fastvae import losses
from fastvae.discriminator import NLayerDiscriminator
from fastvae.train import train
from helpers import tiny_config
from kl_runs import ToyAutoencoder, kl_latent, kl_overrides, lpips_weights

pytest.importorskip("diffusers")


# ---------------------------------------------------------------- the loss, against LDM's own arithmetic


def ldm_reference(x, x_hat, kl, logvar, p_loss, logits_fake, last_layer, kl_weight, perceptual_weight, disc_weight,
                  disc_factor, step, disc_start):
    """LDM's LPIPSWithDiscriminator.forward, optimizer_idx 0 (ldm/modules/losses/contperceptual.py), as written
    there: rec_loss, nll, kl_loss, g_loss, calculate_adaptive_weight, adopt_weight."""
    rec_loss = torch.abs(x.contiguous() - x_hat.contiguous())
    rec_loss = rec_loss + perceptual_weight * p_loss
    nll_loss = rec_loss / torch.exp(logvar) + logvar
    nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
    kl_loss = torch.sum(kl) / kl.shape[0]
    g_loss = -torch.mean(logits_fake)
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    d_weight = torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight
    factor = disc_factor if step >= disc_start else 0.0
    return nll_loss + kl_weight * kl_loss + d_weight * factor * g_loss


def toy_problem():
    """x, a last layer W and x_hat = tanh(h W) in float64, a patch critic's logits of x_hat, a KL per image."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    h = torch.randn(4 * 16, 5, generator=g, dtype=torch.float64)
    W = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    x_hat = torch.tanh(h @ W).view(4, 4, 4, 3).permute(0, 3, 1, 2)
    critic = torch.randn(3, generator=g, dtype=torch.float64)
    logits_fake = torch.einsum("bchw,c->bhw", x_hat, critic)
    return x, x_hat, W, logits_fake, torch.rand(4, generator=g, dtype=torch.float64) * 30


@pytest.mark.parametrize("step", [0, 5])
def test_the_ldm_terms_assemble_ldms_loss_in_float64(step):
    p_loss = torch.rand(4, 1, 1, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    logvar = torch.tensor(0.3, dtype=torch.float64)
    x, x_hat, W_ref, logits_fake, kl = toy_problem()  # the reference's own graph (it backpropagates through it)
    expected = ldm_reference(x, x_hat, kl, logvar, p_loss, logits_fake, W_ref, 1e-6, 1.0, 0.5, 1.0, step, 5)
    x, x_hat, W, logits_fake, kl = toy_problem()
    rec = losses.autoencoder_reconstruction(x, x_hat, "l1", p_loss.flatten(), 1.0)
    nll_loss = losses.autoencoder_nll(rec, logvar).mean()
    loss = nll_loss + 1e-6 * kl.mean()
    if step >= 5:
        g_loss = losses.generator_adversarial_loss(logits_fake)
        nll_grad, = torch.autograd.grad(nll_loss, W, retain_graph=True)
        g_grad, = torch.autograd.grad(g_loss, W, retain_graph=True)
        loss = loss + losses.adaptive_weight(nll_grad, g_grad, 0.5) * 1.0 * g_loss
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    # and its gradient with the adaptive weight held, as LDM holds it
    torch.testing.assert_close(torch.autograd.grad(loss, W)[0], torch.autograd.grad(expected, W_ref)[0], rtol=1e-12,
                               atol=1e-12)


def test_the_discriminator_losses_are_ldms():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64), torch.randn(4, 1, 3, 3, generator=g,
                                                                                        dtype=torch.float64)
    hinge = 0.5 * (torch.mean(torch.relu(1.0 - real)) + torch.mean(torch.relu(1.0 + fake)))
    vanilla = 0.5 * (torch.mean(nn.functional.softplus(-real)) + torch.mean(nn.functional.softplus(fake)))
    assert losses.hinge_d_loss(real, fake).item() == pytest.approx(hinge.item(), abs=1e-15)
    assert losses.vanilla_d_loss(real, fake).item() == pytest.approx(vanilla.item(), abs=1e-15)
    assert losses.adaptive_weight(torch.ones(4), torch.zeros(4), 0.5).item() == pytest.approx(1e4 * 0.5)


def test_the_nll_is_l2_when_asked_and_gradchecks():
    x, x_hat, W, _, _ = toy_problem()
    assert torch.equal(losses.autoencoder_reconstruction(x, x_hat, "l2"), (x - x_hat) ** 2)
    logvar = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda w, lv: losses.autoencoder_nll(
        losses.autoencoder_reconstruction(x, torch.tanh(w).expand_as(x), "l1"), lv), (W[:1, :1].detach().clone()
                                                                                      .requires_grad_(), logvar))


@pytest.mark.parametrize("ldm_way", [False, True])
def test_the_autoencoder_loss_with_lpips_and_critic_is_ldms(tmp_path_factory, ldm_way):
    """fastvae's LDM objective with the real Critic (float32, real LPIPS with random VGG weights, a
    PatchGAN) against the float64 transcription on the same numbers (the LPIPS distances and logits
    computed once, in float64); both ways: each backward once (fastvae's), LDM's (the reference)."""
    from fastvae.critic import Critic
    from fastvae.objectives import LDMLoss
    from fastvae.perceptual import load_lpips

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 32, 32, generator=g)
    W = nn.Parameter(torch.randn(3, 3, generator=g) * 0.5)
    h = torch.randn(2, 32, 32, 3, generator=g)
    disc = NLayerDiscriminator(3, 8, 2).eval()  # eval: the same logits when the reference calls it again
    critic = Critic(disc, None, weight=0.5, factor=1.0)
    lpips = load_lpips("vgg", lpips_weights(tmp_path_factory))
    model = ToyAutoencoder(W)
    output = torch.tanh(h @ W).permute(0, 3, 1, 2)
    kl = torch.rand(2, generator=g) * 10
    backward_runs = {"lpips": 0, "disc": 0}
    hooks = [net.register_full_backward_hook(lambda *_, name=name: backward_runs.__setitem__(
        name, backward_runs[name] + 1)) for name, net in (("lpips", lpips), ("disc", disc))]
    loss, recon, _, terms, _ = LDMLoss("l1", lpips, 1.0, learn_logvar=True, backward_once=not ldm_way)(
        model, x, kl_latent(kl), output, torch.tensor(1e-6), None, critic)
    ours = torch.autograd.grad(loss, [W, model.nll_logvar], retain_graph=True)
    assert backward_runs == ({"lpips": 2, "disc": 2} if ldm_way else {"lpips": 1, "disc": 1})
    for hook in hooks:
        hook.remove()
    x_pm = x * 2 - 1
    expected = ldm_reference(x_pm, output, kl, model.nll_logvar, lpips(x_pm, output), disc(output), W, 1e-6, 1.0, 0.5,
                             1.0, 1, 0)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    assert terms["lpips"] > 0 and set(terms) >= {"nll", "logvar", "pixel", "lpips", "g_loss", "d_weight"}
    # and its gradients (the last layer's and the learned logvar's): LPIPS's and D's backward run once
    # for the adaptive weight and once in the loss's backward there, once in all here
    theirs = torch.autograd.grad(expected, [W, model.nll_logvar])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_runs_the_networks_in_bf16_and_lpips_and_the_loss_in_float32(tmp_path, tmp_path_factory, monkeypatch):
    import fastvae.objectives.ldm as ldm_objective

    seen = []
    real = ldm_objective.lpips_distance

    def spy(model, a, b):
        seen.append((a.dtype, b.dtype))
        out = real(model, a, b)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(ldm_objective, "lpips_distance", spy)
    result = train(tiny_config(tmp_path / "bf16", *kl_overrides(tmp_path_factory, "train.max_steps=3"),
                               "train.mixed_precision=bf16"))
    assert result["step"] == 3 and seen and all(s in ((torch.float32, torch.float32), torch.float32) for s in seen)


def test_the_held_out_loss_of_ldm_is_its_nll_plus_beta_kl_on_test_images():
    """test_loss in metrics.jsonl for loss.objective=ldm: per image sum((|x - x_hat| + LPIPS) / exp(logvar) +
    logvar) + beta x KL, z drawn with evaluation's keyed eps, averaged over the images: the same number
    split over two shards as in one."""
    from fastvae.config import load_config
    from fastvae.data.base import ImageTensorDataset
    from fastvae.evaluation import eval_noise
    from fastvae.models import build_model
    from fastvae.objectives import LDMLoss
    from fastvae.reports import held_out_metrics

    cfg = load_config("mnist", ["model.name=kl_autoencoder", "loss.objective=ldm", "loss.beta=0.1",
                                "model.kwargs={block_out_channels: [4, 8], norm_num_groups: 4, latent_channels: 1}"])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.nll_logvar.data.fill_(0.3)
    images = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    test_set = ImageTensorDataset(images, torch.zeros(6))
    objective = LDMLoss("l1", None, 0.0)
    got = held_out_metrics(model, test_set, cfg, 6, objective=objective)["test_loss"]
    halves = [held_out_metrics(model, test_set, cfg, 6, (r, 2), objective=objective)["test_loss"] for r in range(2)]
    with torch.no_grad():
        x = images.float() / 255
        mu, logvar = model.encode(x)
        z = mu + (0.5 * logvar).exp() * eval_noise(cfg.seed + 1, torch.arange(6), mu.shape[1], 0).float()
        x_hat = model.decode(z)
        nll = ((x * 2 - 1 - x_hat).abs() / torch.tensor(0.3).exp() + 0.3).flatten(1).sum(1)
        want = (nll + 0.1 * losses.kl_divergence(mu, logvar)).mean()
    assert got == pytest.approx(want.item(), rel=1e-5)
    assert (halves[0] + halves[1]) / 2 == pytest.approx(got, rel=1e-6)  # 3 + 3 images


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_one_backward_way_compiles_under_autocast(dtype):
    """The objective with the critic inside torch.compile (AOT autograd, as train.compile runs it): under
    bf16 autocast x_hat is a float32 cast of the bf16 output, and the NLL's graph must take it in from
    outside for autograd.grad(nll, x_hat) to find it; the gradients are the eager ones."""
    from fastvae.critic import Critic
    from fastvae.objectives import LDMLoss

    g = torch.Generator().manual_seed(5)
    x, h = torch.rand(2, 3, 8, 8, generator=g), torch.randn(2, 8, 8, 3, generator=g)
    model = ToyAutoencoder(nn.Parameter(torch.randn(3, 3, generator=g) * 0.5))
    critic = Critic(NLayerDiscriminator(3, 4, 1, "none"), None, weight=0.5)
    objective = LDMLoss("l1", None, learn_logvar=True)

    def step(h):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            output = (h @ model.W).permute(0, 3, 1, 2)
            return objective(model, x, kl_latent(torch.ones(2)), output, torch.tensor(1e-6), None, critic).loss

    grads = []
    for fn in (step, torch.compile(step, backend="aot_eager")):
        torch._dynamo.reset()
        grads.append(torch.autograd.grad(fn(h), [model.W, model.nll_logvar]))
    for compiled, eager in zip(grads[1], grads[0]):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
