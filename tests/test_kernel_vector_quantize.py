"""fused_vector_quantize vs the eager reference (fastvae.quantizers.vector_quantize, float64), under
TRITON_INTERPRET=1 on CPU: the same indices (the first code on a tie), values and gradients to the
parity tolerance, no [N, K] matrix, and one graph under torch.compile."""

import pytest
import torch
import torch.nn.functional as F

from fastvae.kernels import fused_vector_quantize
from fastvae.kernels.vector_quantize import tile_settings
from fastvae.losses import vector_quantize
from fastvae.quantizers import VectorQuantizer
from parity import assert_parity

# (N vectors, K codes, D): tails of every tile, D below tl.dot's 16, D over several 32-wide slices
SHAPES = [(1, 2, 1), (37, 100, 8), (130, 70, 3), (200, 1024, 64), (64, 33, 100)]


def inputs(n, k, d, dtype, seed=0, l2=False):
    g = torch.Generator().manual_seed(seed)
    v, codes = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(k, d, generator=g, dtype=torch.float64)
    if l2:
        v, codes = F.normalize(v, dim=1), F.normalize(codes, dim=1)
    return v.to(dtype), codes.to(dtype)


def run(fn, v, codes, commitment, codebook_weight, dq, dloss):
    v, codes = v.clone().requires_grad_(True), codes.clone().requires_grad_(True)
    q, indices, loss = fn(v, codes, commitment, codebook_weight)
    torch.autograd.backward([q, loss], [dq.to(q.dtype), dloss.to(loss.dtype)])
    return q, indices, loss, v.grad, codes.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("codebook_weight", [1.0, 0.0])
def test_forward_backward_parity(shape, dtype, codebook_weight):
    n, k, d = shape
    v, codes = inputs(n, k, d, dtype)
    g = torch.Generator().manual_seed(1)
    dq, dloss = torch.randn(n, d, generator=g, dtype=torch.float64), torch.rand(n, generator=g, dtype=torch.float64)
    fused = run(fused_vector_quantize, v, codes, 0.25, codebook_weight, dq, dloss)
    ref = run(vector_quantize, v.double(), codes.double(), 0.25, codebook_weight, dq, dloss)
    assert torch.equal(fused[1], ref[1]), "indices differ"
    for name, a, b in zip(("z_q", "loss", "dv", "dcodes"), (fused[0], *fused[2:]), (ref[0], *ref[2:])):
        if b is None or not b.abs().sum():
            assert a is None or not a.abs().sum(), name  # EMA codebook: no gradient reaches it
            continue
        assert a.dtype == dtype, name
        assert_parity(a, b, dtype, name)


def test_l2_normalized_and_low_dimensional_lookups_through_the_quantizer():
    """The quantizer normalizes and projects; the fused lookup gives its indices, loss and gradients."""
    torch.manual_seed(0)
    z = torch.randn(4, 32, 6, 6, dtype=torch.float64)
    for kwargs in ({"l2": True, "code_dim": 8}, {"code_dim": 4}, {"l2": True}):
        vq = VectorQuantizer(32, 300, **kwargs).double()
        grads = []
        for lookup in (vector_quantize, fused_vector_quantize):
            vq.use_lookup(lookup)
            x = z.clone().requires_grad_(True)
            latent = vq(x)
            (latent.z.pow(2).sum() + latent.regularizer.sum()).backward()
            grads.append((latent.posterior, latent.z.detach(), latent.regularizer.detach(), x.grad,
                          vq.codebook.grad.clone()))
            vq.zero_grad()
        assert torch.equal(grads[0][0], grads[1][0]), kwargs
        for a, b in zip(grads[0][1:], grads[1][1:]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_ties_go_to_the_first_code_across_tiles():
    """Duplicate codes in two different 64-code tiles and inside one: the lowest index wins, as argmin."""
    v, codes = inputs(50, 200, 8, torch.float32)
    codes[150] = codes[7]  # another tile
    codes[8] = codes[7]  # the same tile
    v[:10] = codes[7]
    _, indices, _ = fused_vector_quantize(v, codes)
    _, ref, _ = vector_quantize(v, codes, 0.25, 1.0)
    assert torch.equal(indices, ref) and (indices[:10] == 7).all()


def test_half_inputs_are_computed_in_float32():
    v, codes = inputs(40, 64, 16, torch.bfloat16)
    q, indices, loss = fused_vector_quantize(v, codes)
    assert q.dtype == loss.dtype == torch.float32
    assert torch.equal(indices, vector_quantize(v.float(), codes.float(), 0.25, 1.0)[1])


def test_bad_shapes_are_one_line():
    with pytest.raises(ValueError, match=r"expected \[N, D\] and \[K, D\]"):
        fused_vector_quantize(torch.randn(4, 8), torch.randn(16, 4))


def test_tiles_fit_tl_dot_and_stay_small():
    for d in (1, 8, 16, 100, 256):
        s = tile_settings(1000, d, on_gpu=True)
        assert 16 <= s["BLOCK_D"] <= 32 and s["BLOCK_N"] * s["BLOCK_K"] <= 4096


def test_one_graph_under_torch_compile():
    """The custom op and its autograd trace into one graph: no break, the same numbers."""
    import torch._dynamo

    torch._dynamo.reset()
    v, codes = inputs(100, 80, 8, torch.float32)

    def step(v, codes):
        q, _, loss = fused_vector_quantize(v, codes)
        return q.sum() + loss.sum()

    explanation = torch._dynamo.explain(step)(v, codes)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0
    v1 = v.clone().requires_grad_(True)
    torch.compile(step)(v1, codes).backward()
    v2 = v.clone().requires_grad_(True)
    step(v2, codes).backward()
    torch.testing.assert_close(v1.grad, v2.grad)
