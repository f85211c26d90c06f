"""Reparameterization noise keyed by what a sample is, not by where it is computed.

eps of sample i in training step s is Philox(seed; counter words (low(i * D + j), s, high(i * D + j), 0)),
i its index in the data set. Every process draws the eps of its own samples and gets the numbers a single process
would have drawn for them: N processes x B/N follow the trajectory of 1 x B, whatever the loader,
the world size or the position of the sample in its batch.

`philox_normal` is Triton's `tl.randn(seed, offset)` written in torch (triton/language/random.py:
Philox4x32-10 on (offset low, offset high, 0, 0) with the 64-bit seed as key, then Box-Muller), so
the fused kernel drawing in-kernel and the eager ops drawing here give the same eps. torch has no
keyed normal of its own: its generators are streams, whose numbers depend on what was drawn before.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * b for a 32-bit constant a and uint32 values b in int64
    tensors; b is split in 16-bit halves so no product leaves int64."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    p_hi, p_lo = a * b_hi, a * b_lo  # each < 2**48
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return high, low


def philox_uint32x4(seed: torch.Tensor | int, offsets: torch.Tensor,
                    words: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, ...]:
    """The four uint32 words of Philox4x32-10 (as int64) for each int64 counter in `offsets`
    (Triton's tl.randn: counter words (low, high, 0, 0)), or for explicit words (c1, c2) beside
    c0 = the low word of `offsets` (the keyed layout: keyed_words)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=offsets.device)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    c0 = offsets & _MASK32
    if words is None:
        c1, c2 = (offsets >> 32) & _MASK32, torch.zeros_like(c0)
    else:
        c1, c2 = (w.expand_as(c0) & _MASK32 for w in words)
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _uniform(words: torch.Tensor) -> torch.Tensor:
    """Triton's uint_to_uniform_float: the word as int32, negatives folded by ~x, times 2**-31."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, ~signed, signed)
    return folded.to(torch.float32) * 4.6566127342e-10


def philox_normal(seed: torch.Tensor | int, offsets: torch.Tensor, words=None) -> torch.Tensor:
    """float32 N(0, 1) per counter, equal to Triton's tl.randn(seed, offsets) (or, with `words`, to
    the kernel's keyed draw: Box-Muller of the first two Philox words, as tl.randn)."""
    w0, w1, _, _ = philox_uint32x4(seed, offsets, words)
    u1, u2 = _uniform(w0).clamp_min(1.0e-7), _uniform(w1)
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(6.283185307179586 * u2)


def philox_normal64(seed: torch.Tensor | int, offsets: torch.Tensor, words=None) -> torch.Tensor:
    """float64 N(0, 1) per counter from 53-bit uniforms (all four Philox words). Not Triton's
    numbers: for evaluation, where tails matter (IWAE weights far samples). Triton's float32
    uniforms stop at 1e-7, cutting the normal at 5.7 sigma; these reach 8.5 sigma."""
    w0, w1, w2, w3 = philox_uint32x4(seed, offsets, words)
    scale = 2.0 ** -53
    u1 = ((w0 << 21) + (w1 >> 11)).to(torch.float64).add(0.5) * scale  # in (0, 1): log(u1) is finite
    u2 = ((w2 << 21) + (w3 >> 11)).to(torch.float64) * scale
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def row_offsets(sample_ids: torch.Tensor, dim: int, stream: torch.Tensor | int) -> torch.Tensor:
    """[B, 2] int64 per row: the element index of its first value (sample_id * dim) and the stream.

    Element j of the row draws at Philox counter words (c0, c1, c2, c3) = (low 32 bits of
    i = sample_id * dim + j, stream, high 32 bits of i, 0). Below i = 2^32 that is the counter
    (stream << 32) + i of earlier versions, so the numbers are the same there; above it the index
    goes on in c2 instead of running into the stream: 2^64 elements per stream, 2^32 streams."""
    index = sample_ids.to(torch.int64) * dim
    return torch.stack([index, torch.as_tensor(stream, dtype=torch.int64, device=index.device).expand_as(index)], 1)


def keyed_normal(seed: torch.Tensor | int, offsets_of_rows: torch.Tensor, dim: int,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """eps [B, dim] of the rows row_offsets describes; float32 gives the fused kernel's numbers,
    float64 philox_normal64's."""
    columns = torch.arange(dim, dtype=torch.int64, device=offsets_of_rows.device)
    index = offsets_of_rows[:, :1] + columns
    words = (offsets_of_rows[:, 1:2], index >> 32)  # c1 = the stream, c2 = the index's high word
    draw = philox_normal64 if dtype == torch.float64 else philox_normal
    return draw(seed, index, words)


def draw_eps(mu: torch.Tensor, key) -> torch.Tensor:
    """eps for mu [B, D]: each sample's own (keyed_normal) when `key` = (seed, row offsets) is
    given, else from torch's generator."""
    if key is None:
        return torch.randn(mu.shape, device=mu.device)
    return keyed_normal(key[0], key[1], mu.shape[1])
