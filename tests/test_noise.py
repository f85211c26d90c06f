"""Keyed reparameterization noise (fastvae/noise.py): a sample's eps depends on what it is, not where."""

import pytest
import torch

from fastvae import noise
from fastvae.kernels import fused_reparam_kl


def test_noise_is_keyed_by_sample_and_matches_the_kernels_in_kernel_draws():
    ids, dim, seed = torch.tensor([7, 3, 11, 0, 5]), 33, 1234
    offsets = noise.row_offsets(ids, dim, stream=9)
    eps = noise.keyed_normal(seed, offsets, dim)
    # a sample's eps does not depend on the batch it is in (what N processes x B/N needs)
    assert torch.equal(noise.keyed_normal(seed, offsets[[2, 0]], dim), eps[[2, 0]])
    assert not torch.equal(noise.keyed_normal(seed, noise.row_offsets(ids, dim, 10), dim), eps)  # next step
    z, _ = fused_reparam_kl(torch.zeros(5, dim), torch.zeros(5, dim), seed=torch.tensor(seed), row_offsets=offsets)
    torch.testing.assert_close(z, eps, rtol=0, atol=2e-6)  # Triton's tl.randn, drawn in-kernel (interpreter)
    big = noise.philox_normal(seed, torch.arange(1 << 18))
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01


def test_draw_eps_is_the_one_rule_keyed_or_from_torchs_generator():
    mu = torch.zeros(4, 6)
    key = (torch.tensor(5), noise.row_offsets(torch.tensor([3, 1, 2, 0]), 6, 2))
    assert torch.equal(noise.draw_eps(mu, key), noise.keyed_normal(5, key[1], 6))
    torch.manual_seed(0)
    first = noise.draw_eps(mu, None)
    torch.manual_seed(0)
    assert torch.equal(first, torch.randn(4, 6)) and first.shape == mu.shape


def test_float64_draws_reach_further_into_the_tails_than_tritons_float32():
    offsets = torch.arange(1 << 16)
    assert noise.philox_normal64(3, offsets).abs().max() > 3.5
    assert noise.philox_normal64(3, offsets).dtype == torch.float64


@pytest.mark.parametrize("seed", [0, 2**31 - 2, 2**31 - 1, 2**31, 2**32 - 1, 2**40 + 7])
def test_one_seed_rule_for_the_kernel_and_its_torch_twin_at_the_boundaries(seed):
    """An int seed and the same seed as a tensor draw fastvae.noise's numbers in the kernel (the
    launcher once reduced int seeds modulo 2^31 - 1 and drew other noise for seeds from 2^31 - 1 on)."""
    rows = noise.row_offsets(torch.tensor([3, 0, 9]), 16, 5)
    want = noise.keyed_normal(seed, rows, 16)
    for given in (seed, torch.tensor(seed)):
        z, _ = fused_reparam_kl(torch.zeros(3, 16), torch.zeros(3, 16), seed=given, row_offsets=rows)
        torch.testing.assert_close(z, want, rtol=0, atol=2e-6)


def test_the_counter_layout_keeps_todays_numbers_and_never_runs_into_the_next_step():
    """Counter words (low(i), step, high(i), 0) for element index i = sample x D + j: below i = 2^32 the
    numbers of the earlier layout (counter (step << 32) + i); above it no overlap with the next step,
    which the earlier layout had from 2^32 / D samples on (21.5M at D = 200)."""
    ids, dim, seed = torch.tensor([0, 7, 21_474_830]), 200, 99  # the last: i just under 2^32
    for step in (0, 3):
        old = noise.philox_normal(seed, (step << 32) + ids[:, None] * dim + torch.arange(dim))
        torch.testing.assert_close(noise.keyed_normal(seed, noise.row_offsets(ids, dim, step), dim), old, rtol=0, atol=0)
    beyond = 2**32 + 1000  # element index of a sample past 2^32 / D, at step 0 ...
    clash = noise.philox_normal(seed, torch.tensor([(0 << 32) + beyond]))
    assert torch.equal(clash, noise.philox_normal(seed, torch.tensor([(1 << 32) + 1000])))  # ... was step 1's
    new = noise.keyed_normal(seed, torch.tensor([[beyond, 0]]), 4)
    assert not torch.equal(new, noise.keyed_normal(seed, torch.tensor([[1000, 1]]), 4))


def test_the_kernel_draws_the_twins_numbers_past_2_to_the_32():
    rows = noise.row_offsets(torch.tensor([2**32 // 8 + 3, 5, 2**40]), 8, 7)  # element indices past 2^32
    z, _ = fused_reparam_kl(torch.zeros(3, 8), torch.zeros(3, 8), seed=torch.tensor(11), row_offsets=rows)
    torch.testing.assert_close(z, noise.keyed_normal(11, rows, 8), rtol=0, atol=2e-6)
