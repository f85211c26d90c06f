"""The latent bottleneck (fastvae/bottleneck.py): the Gaussian one is the reparameterization + KL op it is
given, keyed per sample; K samples per image key as K copies of the batch would (sample k of image i is
the virtual sample i * K + k), so K = 1 is the one-sample case."""

import torch

from fastvae import losses, noise
from fastvae.bottleneck import GaussianBottleneck, repeated_key


def test_the_gaussian_bottleneck_is_the_reparameterization_and_kl_of_its_op():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    key = (torch.tensor(5), noise.row_offsets(torch.tensor([2, 7, 9]), 4, 3))
    latent = GaussianBottleneck()((mu, logvar), key)
    eps = noise.keyed_normal(key[0], key[1], 4)  # the eager op's numbers (the fused kernel's too)
    assert torch.equal(latent.z, losses.reparameterize(mu, logvar, eps))
    assert torch.equal(latent.regularizer, losses.kl_divergence(mu, logvar))
    assert latent.posterior[0] is mu and latent.terms == {}


def test_k_samples_are_keyed_as_virtual_samples_and_one_sample_is_unchanged():
    ids, dim, step, k = torch.tensor([2, 7]), 3, 4, 3
    seed, rows = torch.tensor(1), noise.row_offsets(ids, dim, step)
    _, repeated = repeated_key((seed, rows), k, dim)
    want = torch.cat([noise.row_offsets(ids * k + j, dim, step) for j in range(k)])
    assert torch.equal(repeated, want)
    assert torch.equal(repeated_key((seed, rows), 1, dim)[1], rows)
    mu = torch.zeros(2, dim)
    latent = GaussianBottleneck()((mu, mu), (seed, rows), samples=k)
    assert latent.z.shape == (k * 2, dim) and latent.regularizer.shape == (k * 2,)
