"""fused_reparam_kl vs the eager reference (float64), under TRITON_INTERPRET=1 on CPU."""

import pytest
import torch

from fastvae import losses
from fastvae.kernels import fused_reparam_kl, triton_runs_on
from parity import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 200), (64, 1), (64, 2), (64, 200), (7, 1000), (33, 129)]


def test_interpreter_is_what_runs_here():
    assert triton_runs_on(torch.device("cpu"))  # conftest sets TRITON_INTERPRET=1: the kernels are exercised


def make_inputs(shape, dtype, seed=0, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    B, D = shape
    if non_contiguous:  # every other column of a wider tensor
        mu, logvar, eps = (torch.randn(B, 2 * D, generator=g)[:, ::2] for _ in range(3))
        assert B * D == 1 or not mu.is_contiguous()
    else:
        mu, logvar, eps = (torch.randn(B, D, generator=g) for _ in range(3))
    return mu.to(dtype), logvar.to(dtype), eps.to(dtype)


def reference(mu, logvar, eps):
    """Float64 reference on exactly the values the kernel sees, with gradients."""
    mu64 = mu.detach().double().requires_grad_(True)
    lv64 = logvar.detach().double().requires_grad_(True)
    z = losses.reparameterize(mu64, lv64, eps.double())
    kl = losses.kl_divergence(mu64, lv64)
    return mu64, lv64, z, kl


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_forward_backward_parity(shape, dtype, non_contiguous):
    mu, logvar, eps = make_inputs(shape, dtype, non_contiguous=non_contiguous)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl = fused_reparam_kl(mu, logvar, eps)
    assert z.dtype == dtype and kl.dtype == torch.float32 and kl.shape == (shape[0],)
    mu64, lv64, z_ref, kl_ref = reference(mu, logvar, eps)
    assert_parity(z, z_ref, dtype, "z")
    assert_parity(kl, kl_ref, dtype, "kl")
    g = torch.Generator().manual_seed(1)
    dz, dkl = torch.randn(z.shape, generator=g), torch.randn(kl.shape, generator=g)
    torch.autograd.backward((z, kl), (dz.to(z.dtype), dkl))
    torch.autograd.backward((z_ref, kl_ref), (dz.to(z.dtype).double(), dkl.double()))
    assert_parity(mu.grad, mu64.grad, dtype, "dmu")
    assert_parity(logvar.grad, lv64.grad, dtype, "dlogvar")


def test_gradcheck_float64_explicit_and_in_kernel_eps():
    mu = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    eps = torch.randn(5, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, lv: fused_reparam_kl(m, lv, eps), (mu, logvar))
    # in-kernel eps: the same seed regenerates the same eps on every call, so z is a function
    assert torch.autograd.gradcheck(lambda m, lv: fused_reparam_kl(m, lv, seed=11), (mu, logvar))


def drawn_eps(shape, seed):
    zeros = torch.zeros(shape)
    z, _ = fused_reparam_kl(zeros, zeros, seed=seed)  # mu = 0, sigma = 1: z is eps itself
    return z


def test_in_kernel_rng_is_keyed_by_the_seed():
    a, b, c = drawn_eps((64, 200), 5), drawn_eps((64, 200), 5), drawn_eps((64, 200), 6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and (a - c).abs().mean() > 0.5
    torch.manual_seed(0)
    d, _ = fused_reparam_kl(torch.zeros(4, 8), torch.zeros(4, 8))
    torch.manual_seed(0)
    e, _ = fused_reparam_kl(torch.zeros(4, 8), torch.zeros(4, 8))
    assert torch.equal(d, e)  # no seed: taken from torch's global generator, so manual_seed reproduces it


def test_in_kernel_eps_is_standard_normal():
    eps = drawn_eps((512, 512), 123).flatten()
    assert abs(eps.mean().item()) < 0.01
    assert abs(eps.std().item() - 1.0) < 0.01
    assert abs((eps.abs() < 1).float().mean().item() - 0.6827) < 0.01  # the normal's 1-sigma mass


def test_backward_with_regenerated_eps_equals_explicit_eps():
    shape, seed = (33, 129), 77
    eps = drawn_eps(shape, seed)
    mu, logvar, _ = make_inputs(shape, torch.float32, seed=3)
    grads = []
    for kwargs in ({"seed": seed}, {"eps": eps}):
        m, lv = mu.clone().requires_grad_(True), logvar.clone().requires_grad_(True)
        z, kl = fused_reparam_kl(m, lv, **kwargs)
        (z.sum() * 0.3 + kl.sum()).backward()
        grads.append((z.detach(), m.grad, lv.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_extreme_logvar_is_finite_and_exact():
    mu = torch.tensor([[0.5, -3.0, 100.0, 0.0]]).repeat(2, 1)
    logvar = torch.tensor([[30.0, -30.0, 0.0, 30.0], [-30.0, 30.0, -30.0, 0.0]])
    eps = torch.ones_like(mu)
    z, kl = fused_reparam_kl(mu, logvar, eps)
    assert torch.isfinite(z).all() and torch.isfinite(kl).all()
    _, _, z_ref, kl_ref = reference(mu, logvar, eps)
    assert_parity(z, z_ref, torch.float32, "z")
    assert_parity(kl, kl_ref, torch.float32, "kl")


def test_nan_in_gives_nan_out():
    mu, logvar, eps = make_inputs((3, 6), torch.float32)
    mu[1, 2] = float("nan")
    z, kl = fused_reparam_kl(mu, logvar, eps)
    assert torch.isnan(z[1, 2]) and torch.isnan(kl[1])
    assert torch.isfinite(kl[0]) and torch.isfinite(kl[2])


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="expected equal \\[B, D\\] shapes"):
        fused_reparam_kl(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="expected the shape of mu"):
        fused_reparam_kl(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3, 3))


def test_fallback_without_triton_matches_reference(monkeypatch):
    """On a CPU without TRITON_INTERPRET the op runs the reference math, same contract."""
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_runs_on(torch.device("cpu"))
    mu, logvar, eps = make_inputs((9, 13), torch.float32)
    mu.requires_grad_(True)
    logvar.requires_grad_(True)
    z, kl = fused_reparam_kl(mu, logvar, eps)
    (z.sum() + kl.sum()).backward()
    mu64, lv64, z_ref, kl_ref = reference(mu, logvar, eps)
    (z_ref.sum() + kl_ref.sum()).backward()
    for a, b, what in ((z, z_ref, "z"), (kl, kl_ref, "kl"), (mu.grad, mu64.grad, "dmu"),
                       (logvar.grad, lv64.grad, "dlogvar")):
        assert_parity(a, b, torch.float32, what)
    zeros = torch.zeros(64, 64)
    a, _ = fused_reparam_kl(zeros, zeros, seed=4)
    b, _ = fused_reparam_kl(zeros, zeros, seed=4)
    assert torch.equal(a, b) and abs(a.std().item() - 1) < 0.05
    m, lv = torch.randn(4, 3, dtype=torch.float64, requires_grad=True), torch.randn(4, 3, dtype=torch.float64,
                                                                                   requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: fused_reparam_kl(x, y, seed=9), (m, lv))
