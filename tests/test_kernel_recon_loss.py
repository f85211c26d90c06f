"""fused_recon_loss vs the eager reference (float64), under TRITON_INTERPRET=1 on CPU."""

import pytest
import torch

from fastvae import losses
from fastvae.kernels import fused_recon_loss
from parity import assert_parity

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(1, 1), (1, 1, 28, 28), (16, 1, 28, 28), (3, 3, 64, 64), (5, 1000), (9, 200)]
KINDS = ["bce", "mse"]


def make_inputs(shape, dtype, seed=0, non_contiguous=False, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    if non_contiguous:  # channels-last-like permuted views
        full = (shape[0], *reversed(shape[1:]))
        logits = (torch.randn(full, generator=g) * scale).permute(0, *range(len(shape) - 1, 0, -1))
        target = torch.rand(full, generator=g).permute(0, *range(len(shape) - 1, 0, -1))
    else:
        logits, target = torch.randn(shape, generator=g) * scale, torch.rand(shape, generator=g)
    return logits.to(dtype), target


def reference(logits, target, kind):
    x64 = logits.detach().double().requires_grad_(True)
    return x64, losses.reconstruction_loss(x64, target.double(), kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward_parity(shape, dtype, kind):
    logits, target = make_inputs(shape, dtype)
    logits.requires_grad_(True)
    loss = fused_recon_loss(logits, target, kind)
    assert loss.shape == (shape[0],) and loss.dtype == torch.float32
    x64, ref = reference(logits, target, kind)
    assert_parity(loss, ref, dtype, f"{kind} loss")
    dloss = torch.rand(shape[0], generator=torch.Generator().manual_seed(2)) + 0.5
    loss.backward(dloss)
    ref.backward(dloss.double())
    assert logits.grad.dtype == dtype
    assert_parity(logits.grad, x64.grad, dtype, f"{kind} dlogits")


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs(kind):
    logits, target = make_inputs((4, 3, 20, 12), torch.float32, non_contiguous=True)
    assert not logits.is_contiguous() and not target.is_contiguous()
    logits.requires_grad_(True)
    loss = fused_recon_loss(logits, target, kind)
    loss.sum().backward()
    x64, ref = reference(logits, target, kind)
    ref.sum().backward()
    assert_parity(loss, ref, torch.float32, "loss")
    assert_parity(logits.grad, x64.grad, torch.float32, "dlogits")
    assert logits.grad.shape == logits.shape


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(kind):
    logits = torch.randn(3, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    target = torch.rand(3, 2, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: fused_recon_loss(x, target, kind), (logits,))


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_are_finite_and_exact(kind):
    logits = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0], [-100.0, 100.0, 50.0, -50.0, 3.0]],
                          requires_grad=True)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 0.5], [0.3, 0.7, 1.0, 0.0, 0.2]])
    loss = fused_recon_loss(logits, target, kind)
    loss.sum().backward()
    x64, ref = reference(logits, target, kind)
    ref.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logits.grad).all()
    assert_parity(loss, ref, torch.float32, "loss")
    assert_parity(logits.grad, x64.grad, torch.float32, "dlogits")


@pytest.mark.parametrize("kind", KINDS)
def test_nan_in_gives_nan_out(kind):
    logits, target = make_inputs((3, 10), torch.float32)
    logits[1, 4] = float("nan")
    loss = fused_recon_loss(logits, target, kind)
    assert torch.isnan(loss[1]) and torch.isfinite(loss[0]) and torch.isfinite(loss[2])


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="expected one of"):
        fused_recon_loss(torch.zeros(2, 3), torch.zeros(2, 3), "l1")
    with pytest.raises(ValueError, match="expected equal shapes"):
        fused_recon_loss(torch.zeros(2, 3), torch.zeros(2, 4), "bce")
    with pytest.raises(ValueError, match="target requires grad"):
        fused_recon_loss(torch.zeros(2, 3), torch.zeros(2, 3, requires_grad=True), "bce")


@pytest.mark.parametrize("kind", KINDS)
def test_fallback_without_triton_matches_reference(kind, monkeypatch):
    from fastvae.kernels import triton_runs_on

    monkeypatch.delenv("TRITON_INTERPRET")
    assert not triton_runs_on(torch.device("cpu"))
    logits, target = make_inputs((4, 1, 28, 28), torch.bfloat16)
    logits.requires_grad_(True)
    loss = fused_recon_loss(logits, target, kind)
    loss.sum().backward()
    x64, ref = reference(logits, target, kind)
    ref.sum().backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.bfloat16
    assert_parity(loss, ref, torch.bfloat16, "loss")
    assert_parity(logits.grad, x64.grad, torch.bfloat16, "dlogits")


def test_fp16_gradient_survives_until_the_loss_scale():
    """fp16 training scales the loss (e.g. by 2^16) so that small gradients survive; the stored
    gradient must not underflow to 0 in fp16 before that scale reaches it in backward."""
    logits = torch.full((2, 1, 4, 4), -20.0, dtype=torch.float16, requires_grad=True)  # sigmoid = 2.1e-9
    target = torch.zeros(2, 1, 4, 4, dtype=torch.float16)
    (fused_recon_loss(logits, target, "bce").sum() * 2.0**16).backward()
    expected = torch.sigmoid(torch.tensor(-20.0, dtype=torch.float64)).item() * 2.0**16  # 1.35e-4, fine in fp16
    assert logits.grad.dtype == torch.float16
    assert torch.allclose(logits.grad.double(), torch.full_like(logits.grad, expected).double(), rtol=1e-2)


@pytest.mark.parametrize("target_layout", ["channels_last", "contiguous"])
def test_nhwc_logits_are_read_in_place_and_get_an_nhwc_gradient(target_layout):
    """train.memory_format=channels_last: the kernel reads NHWC logits without a row-major copy (the
    loss sums each image, pixel order does not matter) and returns the gradient in their layout."""
    from fastvae.kernels.recon_loss import channels_last_layout, memory_rows

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 8, 6, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    target = torch.rand(4, 3, 8, 6, generator=g)
    if target_layout == "channels_last":
        target = target.contiguous(memory_format=torch.channels_last)
    assert channels_last_layout(logits) and memory_rows(logits, True).data_ptr() == logits.data_ptr()
    for kind in ("bce", "mse"):
        loss = fused_recon_loss(logits, target, kind)
        (grad,) = torch.autograd.grad(loss.sum(), logits)
        plain = logits.detach().contiguous().requires_grad_(True)
        ref = losses.reconstruction_loss(plain.double(), target.double(), kind)
        (ref_grad,) = torch.autograd.grad(ref.sum(), plain)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(grad, ref_grad.float(), rtol=1e-5, atol=1e-6)
        assert grad.is_contiguous(memory_format=torch.channels_last)
