"""fastvae's quantizers beside vector-quantize-pytorch (the library most tokenizer code imports), on the same
inputs and codebook: where the definitions agree, the same codes, values, losses, gradients and EMA update
(docs/tokenizers.md lists where they differ)."""

import pytest
import torch
import torch.nn.functional as F

from fastvae.losses import vector_quantize
from fastvae.quantizers import FSQ, LFQ, VectorQuantizer

vqp = pytest.importorskip("vector_quantize_pytorch")

D, K = 8, 64


def images(seed=0, channels=D, scale=1.0):
    return torch.randn(4, channels, 5, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def theirs_vq(**kwargs):
    return vqp.VectorQuantize(dim=D, codebook_size=K, accept_image_fmap=True, rotation_trick=False, **kwargs).double()


def test_ema_vq_same_codes_commitment_loss_and_ema_update():
    ours = VectorQuantizer(D, K, commitment=0.25, ema_decay=0.8).double()
    theirs = theirs_vq(decay=0.8, commitment_weight=0.25)
    theirs._codebook.embed.data.copy_(ours.codebook[None])
    theirs._codebook.embed_avg.data.copy_(ours.embed_sum[None])  # both start as the codes, cluster sizes 1
    z = images()
    latent = ours(z)
    quantized, indices, loss = theirs(z)
    assert torch.equal(latent.posterior, indices)
    torch.testing.assert_close(latent.z, quantized)
    torch.testing.assert_close(latent.regularizer.mean(), loss)  # 0.25 x mse(z, sg(e)): per image, then mean
    torch.testing.assert_close(ours.codebook, theirs._codebook.embed[0])  # the Laplace-smoothed EMA step
    torch.testing.assert_close(ours.cluster_size, theirs._codebook.cluster_size[0])


def test_cosine_lookup_picks_the_same_codes():
    ours = VectorQuantizer(D, K, l2=True).double().eval()
    theirs = theirs_vq(use_cosine_sim=True).eval()
    theirs._codebook.embed.data.copy_(F.normalize(ours.codebook.detach(), dim=1)[None])
    z = images(1)
    latent = ours(z)
    quantized, indices, _ = theirs(z)
    assert torch.equal(latent.posterior, indices)
    torch.testing.assert_close(latent.z, quantized)


def test_learnable_codebook_gradients_equal_ours_with_the_codebook_term_weighted_like_commitment():
    """Theirs: w x mse(z, e) without a stop-gradient, so the codebook term's weight is tied to the
    commitment weight; ours with codebook_weight = commitment = w gives the same gradients."""
    w = 0.25
    theirs = theirs_vq(learnable_codebook=True, ema_update=False, commitment_weight=w)
    codes = torch.randn(K, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    theirs._codebook.embed.data.copy_(codes[None])
    z1 = images(2).requires_grad_(True)
    quantized, indices, loss = theirs(z1)
    (quantized.pow(2).sum() + loss).backward()
    v = images(2).movedim(1, -1).reshape(-1, D).requires_grad_(True)
    ours_codes = codes.clone().requires_grad_(True)
    q, ours_indices, ours_loss = vector_quantize(v, ours_codes, w, w)
    (q.pow(2).sum() + ours_loss.mean()).backward()
    assert torch.equal(ours_indices, indices.flatten())
    torch.testing.assert_close(v.grad, z1.grad.movedim(1, -1).reshape(-1, D))
    torch.testing.assert_close(ours_codes.grad, theirs._codebook.embed.grad[0])


def test_fsq_same_values_and_indices():
    levels = [8, 5, 5, 3]
    ours, theirs = FSQ(4, levels).double(), vqp.FSQ(levels, allowed_dtypes=(torch.float64,)).double()
    z = images(4, channels=4, scale=2.0)
    latent = ours(z)
    quantized, indices = theirs(z)
    torch.testing.assert_close(latent.z, quantized)
    assert torch.equal(latent.posterior, indices)


def test_lfq_same_codes_commitment_and_entropies():
    """Theirs: softmax(2 z.c x inv_temperature), ours: softmax(2 z.c / temperature); per-sample entropy (ours
    factorized per channel, theirs over all 2^d codes: equal) and the batch's code entropy."""
    ours = LFQ(D, commitment=0.25, entropy_weight=0.1, temperature=0.05).double()
    theirs = vqp.LFQ(dim=D, entropy_loss_weight=0.1, commitment_loss_weight=0.25, force_quantization_f32=False).double()
    z = images(5, scale=0.2)
    latent = ours(z)
    (quantized, indices, aux), breakdown = theirs(z, inv_temperature=1 / 0.05, return_loss_breakdown=True)
    torch.testing.assert_close(latent.z, quantized)
    assert torch.equal(latent.posterior, indices)
    torch.testing.assert_close(latent.terms["entropy"], breakdown.per_sample_entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(latent.terms["batch_entropy"], breakdown.batch_entropy, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(latent.regularizer.mean(), aux, rtol=1e-4, atol=1e-6)
