"""The quantizers (fastvae/quantizers.py) against float64 transcriptions of their papers' formulas, and
their state over 2 gloo ranks against one process: the codebook, EMA sums, usage window and restarts
are the same on every rank and equal to one process's, step by step."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastvae.losses as losses
from fastvae.losses import nearest_codes
from fastvae.quantizers import FSQ, LFQ, VectorQuantizer, build_quantizer


def latents(seed=0, shape=(4, 6, 3, 3)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_vq_is_the_nearest_code_with_vq_vaes_losses_and_a_straight_through_gradient():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 16, commitment=0.25).double()
    z = latents().requires_grad_()
    latent = vq(z)
    vectors = z.detach().movedim(1, -1).reshape(-1, 6)
    nearest = torch.cdist(vectors, vq.codebook.detach()).argmin(1)  # the brute-force reference
    assert torch.equal(latent.posterior.flatten(), nearest)
    e = vq.codebook[nearest]
    per_vector = (vectors - e).pow(2).mean(1) + 0.25 * (vectors - e.detach()).pow(2).mean(1)
    torch.testing.assert_close(latent.regularizer, per_vector.view(4, -1).mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(latent.z.movedim(1, -1).reshape(-1, 6), e.detach(), rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(latent.z.sum(), z)  # straight through: dz_q / dz = identity
    assert torch.equal(grad, torch.ones_like(z))


def test_ema_codebook_follows_its_vectors_with_laplace_smoothing_in_float64():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 8, ema_decay=0.9, ema_eps=1e-5).double()
    size, embed = vq.cluster_size.clone(), vq.embed_sum.clone()
    z = latents(1)
    vectors = z.movedim(1, -1).reshape(-1, 6)
    indices = torch.cdist(vectors, vq.codebook).argmin(1)
    vq(z)
    onehot = F.one_hot(indices, 8).double()
    size = 0.9 * size + 0.1 * onehot.sum(0)
    embed = 0.9 * embed + 0.1 * onehot.t() @ vectors
    n = size.sum()
    want = embed / ((size + 1e-5) / (n + 8 * 1e-5) * n)[:, None]
    torch.testing.assert_close(vq.codebook, want, rtol=1e-12, atol=1e-12)
    assert not any(p.requires_grad for p in [vq.codebook])  # a buffer: no gradient reaches it


def test_dead_codes_take_vectors_of_the_batch_drawn_by_the_seeded_generator():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 32, restart_after=2, seed=5).double()
    z = latents(2)
    vq(z)  # update 1: codes not used since update 0 are not dead yet (1 < 2)
    used = vq.last_used == 1
    before = vq.codebook.detach().clone()
    vq(z)  # update 2: every code unused since update 0 is restarted
    dead = (~used).nonzero().flatten()
    vectors = z.movedim(1, -1).reshape(-1, 6)
    picks = torch.randperm(len(vectors), generator=torch.Generator().manual_seed(5 * 1_000_003 + 2))[:len(dead)]
    torch.testing.assert_close(vq.codebook.detach()[dead], vectors[picks])
    assert torch.equal(vq.codebook.detach()[used], before[used]) and (vq.last_used[dead] == 2).all()


def test_l2_and_low_dimensional_lookups_search_normalized_projected_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(6, 16, code_dim=2, l2=True).double()
    z = latents(3)
    latent = vq(z)
    projected = F.normalize(vq.project_in(z.movedim(1, -1).reshape(-1, 6)), dim=1)
    codes = F.normalize(vq.codebook, dim=1)
    assert torch.equal(latent.posterior.flatten(), (projected @ codes.t()).argmax(1))  # cosine nearest
    vq.eval()
    torch.testing.assert_close(vq.decode_indices(latent.posterior), vq(z).z)


def test_kmeans_init_starts_the_codebook_at_the_first_batchs_cluster_means():
    """After the first training forward the codes are Lloyd's fixed point on that batch: each is the mean of
    the vectors nearest to it (l2: their normalized mean); the initialization happens once, and a loaded
    state is not initialized again (the same next step, bit for bit)."""
    z = torch.cat([latents(20, (6, 3, 4, 4)) + 4.0, latents(21, (6, 3, 4, 4)) - 4.0])  # two blobs
    for l2, ema in ((False, 0.0), (True, 0.9)):
        vq = VectorQuantizer(3, 5, l2=l2, ema_decay=ema, kmeans_iters=30).double()
        vq(z)
        vectors = z.movedim(1, -1).reshape(-1, 3)
        vectors = F.normalize(vectors, dim=1) if l2 else vectors
        assigned = nearest_codes(vectors, vq.codes().detach())
        if not ema:  # (an EMA codebook has moved on by the step's update)
            for k in assigned.unique():
                mean = vectors[assigned == k].mean(0)
                torch.testing.assert_close(vq.codes()[k].detach(), F.normalize(mean, dim=0) if l2 else mean)
        assert bool(vq.initialized)
        state = {k: v.clone() for k, v in vq.state_dict().items()}
        vq(z + 1)  # no second init: only the step's update moves the codebook
        fresh = VectorQuantizer(3, 5, l2=l2, ema_decay=ema, kmeans_iters=30).double()
        fresh.load_state_dict(state)
        fresh(z + 1)
        for name, value in vq.state_dict().items():
            torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)


def test_a_codebook_saved_before_kmeans_init_existed_loads():
    state = VectorQuantizer(3, 5).state_dict()
    del state["initialized"]
    vq = VectorQuantizer(3, 5, kmeans_iters=4)
    vq.load_state_dict(state)
    assert bool(vq.initialized)


def test_the_search_in_chunks_equals_one_block(monkeypatch):
    g = torch.Generator().manual_seed(4)
    vectors, codebook = torch.randn(1000, 8, generator=g), torch.randn(300, 8, generator=g)
    whole = nearest_codes(vectors, codebook)
    monkeypatch.setattr(losses, "DISTANCE_BUDGET", 300 * 4 * 7)  # 7 vectors at a time
    assert torch.equal(nearest_codes(vectors, codebook), whole)


def test_fsq_rounds_each_channel_to_its_levels_and_indexes_every_code_once():
    fsq = FSQ(4, [8, 5, 5, 3]).double()
    z = latents(5, (2000, 4)) * 3
    latent = fsq(z)
    levels = torch.tensor([8, 5, 5, 3], dtype=torch.float64)
    grid = latent.z * (levels // 2)
    assert torch.equal(grid, grid.round()) and (grid >= -(levels // 2)).all() and (grid < (levels + 1) / 2).all()
    assert fsq.codebook_size == 600 and latent.posterior.max() < 600 and latent.regularizer.abs().sum() == 0
    every = torch.arange(600)
    codes = fsq.decode_indices(every).double()  # [600, 4] in [-1, 1]: each index's grid point once
    assert torch.equal(fsq.indices_of(codes * (levels // 2)), every) and len(codes.unique(dim=0)) == 600
    z.requires_grad_()
    (grad,) = torch.autograd.grad(fsq(z).z.sum(), z)  # straight through the rounding: the bound's derivative
    half = (levels - 1) * (1 + 1e-3) / 2
    shift = torch.atanh(torch.where(levels % 2 == 0, 0.5, 0.0) / half)
    want = (1 - torch.tanh(z.detach() + shift).pow(2)) * half / (levels // 2)
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def test_lfq_is_the_sign_with_its_entropy_penalty_in_float64():
    lfq = LFQ(4, commitment=0.25, entropy_weight=0.1, temperature=0.5).double()
    z = latents(6, (3, 4, 2, 2))
    latent = lfq(z)
    v = z.movedim(1, -1).reshape(-1, 4)
    q = torch.where(v > 0, 1.0, -1.0).double()
    codes = torch.tensor([[1 if (c >> (3 - j)) & 1 else -1 for j in range(4)] for c in range(16)], dtype=torch.float64)
    p = torch.softmax(-torch.cdist(v, codes).pow(2) / 0.5, dim=1)  # softmax of minus distance / T
    per_vector = -(p * p.log()).sum(1)
    mean = p.mean(0)
    loss = 0.25 * (v - q).pow(2).mean(1) + 0.1 * (per_vector + (mean * mean.log()).sum())
    torch.testing.assert_close(latent.regularizer, loss.view(3, -1).mean(1), rtol=1e-10, atol=1e-12)
    assert torch.equal(lfq.decode_indices(latent.posterior), from_sign(q, (3, 2, 2, 4)))


def from_sign(q, shape):
    return q.reshape(shape).movedim(-1, 1)


@pytest.mark.parametrize("spec, message", [
    ({"kind": "vq", "codebook_size": 1}, "codebook_size 1: expected at least 2 codes"),
    ({"kind": "vq", "code_dim": 9}, "code_dim 9: expected 1 to the latent's 6 channels"),
    ({"kind": "vq", "restart_after": -1}, "restart_after -1: expected 0 (off)"),
    ({"kind": "vq", "kmeans_iters": -2}, "kmeans_iters -2: expected 0 (off)"),
    ({"kind": "fsq", "levels": [8, 1, 5, 5, 5, 5]}, "each at least 2"),
    ({"kind": "fsq", "levels": [8, 5]}, "2 channels, the latent has 6"),
    ({"kind": "lfq", "entropy_weight": -1}, "expected weights >= 0"),
    ({"kind": "rq"}, "quantizer kind 'rq': expected vq, fsq or lfq"),
])
def test_bad_quantizer_arguments_are_one_line(spec, message):
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        build_quantizer(6, spec)
    with pytest.raises(ValueError, match="31: 2\\^31 codes; expected at most 30 bits"):
        LFQ(31)


# ---------------------------------------------------------------- 2 ranks = 1 process


def quantizer_steps(rank, world, spec):
    """3 training steps of a quantizer on 8 images (each rank its contiguous share), float64: its state
    and the input gradient of the regularizer (averaged over ranks as DDP would)."""
    import torch.distributed as dist

    torch.manual_seed(0)
    q = build_quantizer(6, spec, seed=3).double().train()
    grads = []
    for step in range(3):
        z = latents(10 + step, (8, 6, 2, 2))[rank * 8 // world:(rank + 1) * 8 // world].requires_grad_()
        out = q(z)
        (grad,) = torch.autograd.grad(out.regularizer.mean(), z)
        grads.append(grad)
    grad = torch.cat(grads, 0)
    if world > 1:
        every = [torch.zeros_like(grad) for _ in range(world)]
        dist.all_gather(every, grad)
        grad = torch.stack([g / world for g in every]).flatten(0, 1).view(world, 3, -1, 6, 2, 2).transpose(0, 1) \
            .reshape(-1, 6, 2, 2)
    else:
        grad = grad.view(3, -1, 6, 2, 2).reshape(-1, 6, 2, 2)
    return {k: v.clone() for k, v in q.state_dict().items()}, grad


@pytest.mark.parametrize("spec", [
    {"kind": "vq", "codebook_size": 32, "code_dim": 3, "l2": True, "ema_decay": 0.9, "restart_after": 1},
    {"kind": "vq", "codebook_size": 32, "restart_after": 2},
    {"kind": "vq", "codebook_size": 16, "code_dim": 3, "l2": True, "ema_decay": 0.9, "kmeans_iters": 5},
    {"kind": "lfq", "entropy_weight": 0.1, "temperature": 0.5},
])
def test_two_processes_keep_the_state_one_process_keeps(tmp_path, spec):
    """EMA sums and codebook, the usage window, restarts drawn from the gathered global batch, k-means init
    of the gathered first batch, the LFQ batch entropy: after 3 steps every rank's state is one process's, and so is the gradient."""
    from ranks import on_ranks

    one_state, one_grad = quantizer_steps(0, 1, spec)
    for state, grad in on_ranks(quantizer_steps, 2, tmp_path, spec):
        assert state.keys() == one_state.keys()
        for name in state:
            torch.testing.assert_close(state[name], one_state[name], rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(grad, one_grad, rtol=1e-10, atol=1e-13)
    assert math.isfinite(float(one_grad.abs().sum()))


def test_quantizers_compute_in_float32_under_bf16_autocast():
    """A bf16 step (autocast) gives the quantizer bf16 latents; the lookup, projections and entropies still
    run in float32: the codes and losses a float32 step gets from the same latents."""
    z = latents(30, (4, 8, 3, 3)).float().bfloat16()
    for q in (VectorQuantizer(8, 256, code_dim=4, l2=True), LFQ(8, temperature=0.5), FSQ(8, [5] * 8)):
        q.train()
        seen = []
        if isinstance(q, VectorQuantizer):
            lookup = q.lookup
            q.use_lookup(lambda v, c, a, b: (seen.append((v.dtype, c.dtype)), lookup(v, c, a, b))[1])
        want = q(z.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = q(z)
        assert torch.equal(got.posterior, want.posterior), type(q).__name__
        torch.testing.assert_close(got.regularizer, want.regularizer)
        assert got.z.dtype == torch.bfloat16 and all(d == (torch.float32, torch.float32) for d in seen)
