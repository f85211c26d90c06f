"""Discrete bottlenecks: the quantizers of tokenizers (VQ-VAE / VQGAN, FSQ, LFQ), one eager reference
each, written from the papers' formulas. Each is a latent bottleneck (fastvae/bottleneck.py):

    latent = quantizer(z_e)   # Latent(z_q, regularizer per image, terms, indices)

z_e is the encoder's output [B, C, *spatial] (or [B, C]); every vector along C is snapped to a code and
z_q has z_e's shape, with the straight-through gradient (z_e + sg(z_q - z_e)). What a quantizer
computes over a batch (EMA sums, restart candidates, the LFQ batch entropy, the usage counts) is over
the GLOBAL batch, and every state it updates is the same on every rank: N processes x B/N hold the
codebook one process x B holds, step by step (tests/test_quantizers.py, float64, 2 gloo ranks).

- VectorQuantizer (van den Oord et al. 2017): nearest code by squared L2; loss per vector
  ||sg(z) - e||^2 + commitment ||z - sg(e)||^2 (the codebook term only for a learned codebook).
  Options: `l2` (codes and inputs l2-normalized: cosine lookup, ViT-VQGAN / LlamaGen), `code_dim`
  (a low-dimensional lookup through a linear projection in and out), `ema_decay` (the codebook as an
  exponential moving average of its assigned vectors with Laplace-smoothed cluster sizes, VQ-VAE-2
  appendix), `restart_after` (a code unused for that many updates takes a vector of the global batch,
  drawn with a generator every rank seeds the same way), `kmeans_iters` (the codebook starts as k-means of
  the first global batch).
- FSQ (Mentzer et al. 2023): each channel bounded by tanh to its number of levels and rounded; the
  codebook is the grid (prod levels codes); no loss.
- LFQ (Yu et al. 2023, MAGVIT-v2): the sign of each channel (2^C codes); commitment loss and the
  entropy penalty: per-vector entropy minus the entropy of the global batch's mean code distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastvae.bottleneck import Latent
from fastvae.distributed import global_batch, global_batch_mean, sum_over_processes
from fastvae.losses import nearest_codes, vector_quantize

MAX_LFQ_BITS = 30  # 2^30 codes: more only with allow_large=True (its index needs int64 and its usage a huge table)
EXACT_ENTROPY_BITS = 12  # LFQ: the batch entropy over all 2^C codes up to this; factorized per channel beyond


def as_vectors(z: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """[B, C, *spatial] -> ([B * prod(spatial), C], the shape to restore)."""
    moved = z.movedim(1, -1)
    return moved.reshape(-1, z.shape[1]), moved.shape


def from_vectors(vectors: torch.Tensor, moved_shape: tuple) -> torch.Tensor:
    return vectors.reshape(*moved_shape[:-1], vectors.shape[-1]).movedim(-1, 1)


def per_image(values: torch.Tensor, images: int) -> torch.Tensor:
    """Per-vector values [B * V] averaged per image -> [B]."""
    return values.view(images, -1).mean(1)


def code_statistics(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes used) and perplexity (exp of the code distribution's entropy) of the
    global batch's code counts."""
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-30).log()).sum()
    return {"usage": (counts > 0).float().mean(), "perplexity": entropy.exp()}


class Quantizer(nn.Module):
    """What every quantizer shares: it computes in float32 with autocast off, whatever precision the
    step runs in (a bf16 distance or entropy picks other codes for near vectors: 8 bits of mantissa
    against 16,384 codes); z_q goes back in the encoder output's dtype. `quantize` sees float32 (or
    float64) latents."""

    def forward(self, z: torch.Tensor, noise_key=None, samples: int = 1) -> Latent:
        with torch.autocast(z.device.type, enabled=False):
            latent = self.quantize(z.float() if z.dtype in (torch.float16, torch.bfloat16) else z)
        return latent._replace(z=latent.z.to(z.dtype))


class VectorQuantizer(Quantizer):
    """dim: the encoder's channels C; codebook_size K; code_dim: the lookup's dimension (default C)."""

    def __init__(self, dim: int, codebook_size: int, code_dim: int | None = None, l2: bool = False,
                 commitment: float = 0.25, ema_decay: float = 0.0, ema_eps: float = 1e-5, restart_after: int = 0,
                 seed: int = 0, kmeans_iters: int = 0) -> None:
        super().__init__()
        check_vq(dim, codebook_size, code_dim, commitment, ema_decay, restart_after, kmeans_iters)
        code_dim = code_dim or dim
        self.dim, self.codebook_size, self.code_dim, self.l2 = dim, codebook_size, code_dim, l2
        self.commitment, self.ema_decay, self.ema_eps, self.restart_after = commitment, ema_decay, ema_eps, restart_after
        self.project_in = nn.Linear(dim, code_dim) if code_dim != dim else nn.Identity()
        self.project_out = nn.Linear(code_dim, dim) if code_dim != dim else nn.Identity()
        codes = torch.randn(codebook_size, code_dim) / math.sqrt(code_dim) if not l2 else \
            F.normalize(torch.randn(codebook_size, code_dim), dim=1)
        if ema_decay:  # the codebook follows its vectors; no gradient reaches it
            self.register_buffer("codebook", codes)
            self.register_buffer("cluster_size", torch.ones(codebook_size))
            self.register_buffer("embed_sum", codes.clone())
        else:
            self.codebook = nn.Parameter(codes)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # training forwards so far
        self.register_buffer("last_used", torch.zeros(codebook_size, dtype=torch.long))
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        self.kmeans_iters = kmeans_iters  # > 0: the codebook starts as k-means of the first global batch
        self.register_buffer("initialized", torch.tensor(kmeans_iters == 0))
        self._initialized = kmeans_iters == 0  # the buffer read once (no host sync per step)
        self.lookup = vector_quantize

    def use_lookup(self, lookup) -> None:
        """The nearest-code op: vector_quantize (eager, the default) or fastvae.kernels' fused_vector_quantize
        (train.ops=triton), both (v, codes, commitment, codebook_weight) -> (z_q, indices, loss per vector)."""
        self.lookup = lookup

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.l2 else self.codebook

    def quantize(self, z: torch.Tensor) -> Latent:
        vectors, shape = as_vectors(z)
        v = self.project_in(vectors)
        if self.l2:
            v = F.normalize(v, dim=1)
        if self.training and not self._initialized:
            self._kmeans_init(v.detach())
        # this step's codes and loss; the update below is for the next step
        q_st, indices, loss = self.lookup(v, self.codes().to(v.dtype), self.commitment, 0.0 if self.ema_decay else 1.0)
        counts = None
        if self.training:
            counts = self._update(v.detach(), indices)
        z_q = from_vectors(self.project_out(q_st), shape)
        terms = {} if counts is None else {k: t.detach() for k, t in code_statistics(counts).items()}
        if counts is not None and self.restart_after:
            terms["dead_codes"] = ((self.updates - self.last_used) >= self.restart_after).sum().float()
        return Latent(z_q, per_image(loss, z.shape[0]), terms, indices.view(z.shape[0], *shape[1:-1]))

    @torch.no_grad()
    def _update(self, v: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """One training step's state changes, from the global batch: code counts, the EMA codebook, dead-code
        restarts. Returns the global counts."""
        # counts and sums by index, no [N, K] one-hot: the step's memory stays O(N + K x D)
        counts = sum_over_processes(torch.bincount(indices, minlength=self.codebook_size).to(v.dtype))
        self.updates += 1
        self.last_used[counts > 0] = self.updates
        if self.ema_decay:
            sums = sum_over_processes(v.new_zeros(self.codebook_size, v.shape[1]).index_add_(0, indices, v))
            self.cluster_size.mul_(self.ema_decay).add_(counts.to(self.cluster_size.dtype), alpha=1 - self.ema_decay)
            self.embed_sum.mul_(self.ema_decay).add_(sums.to(self.embed_sum.dtype), alpha=1 - self.ema_decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.ema_eps) / (n + self.codebook_size * self.ema_eps) * n
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        if self.restart_after:
            self._restart(v)
        return counts

    @torch.no_grad()
    def _kmeans_init(self, v: torch.Tensor) -> None:
        """The codebook as k-means (kmeans_iters Lloyd steps) of the first training batch, gathered from all
        processes in rank order (the one-process batch), its first centres drawn by a generator seeded by
        the seed: every rank computes the same codebook, and it is one process's."""
        if not bool(self.initialized):
            candidates = global_batch(v)
            generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 - 1)
            centres, counts = kmeans(candidates, self.codebook_size, self.kmeans_iters, generator, self.l2)
            self.codebook.data.copy_(centres.to(self.codebook.dtype))
            if self.ema_decay:  # the moving averages start from the clusters: sizes and sums that give the centres
                self.cluster_size.copy_(counts.to(self.cluster_size.dtype))
                self.embed_sum.copy_(centres.to(self.embed_sum.dtype) * self.cluster_size[:, None])
            self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "updates" in state_dict:  # a checkpoint from before k-means init had none to do
            state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = self.kmeans_iters == 0  # read the loaded buffer again at the next training step

    @torch.no_grad()
    def _restart(self, v: torch.Tensor) -> None:
        """Codes unused for restart_after updates take vectors of the global batch (gathered in rank order:
        the one-process batch), drawn without replacement by a generator seeded by (seed, update)."""
        dead = ((self.updates - self.last_used) >= self.restart_after).nonzero().flatten()
        if dead.numel() == 0:
            return
        candidates = global_batch(v)
        generator = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.updates))
        fresh = candidates[drawn_rows(candidates.shape[0], dead.numel(), generator).to(candidates.device)]
        fresh = fresh.to(self.codebook.dtype)
        self.codebook.data[dead] = fresh
        if self.ema_decay:
            self.embed_sum[dead] = fresh
            self.cluster_size[dead] = 1.0
        self.last_used[dead] = self.updates

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices [B, *spatial] -> z_q [B, C, *spatial]: what the decoder takes."""
        q = self.codes()[indices.flatten()]
        return from_vectors(self.project_out(q), (*indices.shape, q.shape[1]))


def drawn_rows(rows: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` of `rows` row indices drawn without replacement by `generator`, cycled when there are fewer
    rows than asked for (a restart's or k-means' picks from the global batch)."""
    picks = torch.randperm(rows, generator=generator)
    return picks.repeat(math.ceil(count / max(1, rows)))[:count]


def kmeans(vectors: torch.Tensor, k: int, iters: int, generator: torch.Generator, l2: bool = False):
    """(k centres, their cluster sizes) after `iters` Lloyd steps from k vectors drawn without replacement
    (cycled when there are fewer); spherical (centres re-normalized) when l2. An empty cluster keeps its
    centre. The same on every rank given the same vectors and generator."""
    picks = drawn_rows(vectors.shape[0], k, generator).to(vectors.device)
    centres, counts = vectors[picks].clone(), torch.ones(k, dtype=vectors.dtype, device=vectors.device)
    for _ in range(iters):
        assigned = nearest_codes(vectors, centres)
        counts = torch.bincount(assigned, minlength=k).to(vectors.dtype)
        means = vectors.new_zeros(k, vectors.shape[1]).index_add_(0, assigned, vectors) / counts.clamp_min(1)[:, None]
        if l2:
            means = F.normalize(means, dim=1)
        centres = torch.where(counts[:, None] > 0, means, centres)
    return centres, counts


def check_vq(dim, codebook_size, code_dim, commitment, ema_decay, restart_after, kmeans_iters=0) -> None:
    """The arguments a VQ can take, each named: ValueError, one line."""
    if type(codebook_size) is not int or codebook_size < 2:
        raise ValueError(f"codebook_size {codebook_size!r}: expected at least 2 codes")
    if code_dim is not None and (type(code_dim) is not int or not 1 <= code_dim <= dim):
        raise ValueError(f"code_dim {code_dim!r}: expected 1 to the latent's {dim} channels (a lower-dimensional "
                         f"lookup, e.g. 8)")
    if commitment < 0:
        raise ValueError(f"commitment {commitment!r}: expected a weight >= 0 (0.25 in VQ-VAE)")
    if not 0 <= ema_decay < 1:
        raise ValueError(f"ema_decay {ema_decay!r}: expected 0 (a learned codebook) or a decay in (0, 1), e.g. 0.99")
    if type(restart_after) is not int or restart_after < 0:
        raise ValueError(f"restart_after {restart_after!r}: expected 0 (off) or a number of updates >= 1")
    if type(kmeans_iters) is not int or kmeans_iters < 0:
        raise ValueError(f"kmeans_iters {kmeans_iters!r}: expected 0 (off) or a number of Lloyd steps >= 1, e.g. 10")


class FSQ(Quantizer):
    """Finite scalar quantization: channel i of z (dim = len(levels)) bounded to levels[i] values by
    tanh and rounded, straight-through; the code is the grid point, its index mixed-radix."""

    def __init__(self, dim: int, levels: list[int], eps: float = 1e-3) -> None:
        super().__init__()
        if not levels or any(type(n) is not int or n < 2 for n in levels):
            raise ValueError(f"levels {levels!r}: expected each channel's number of levels, each at least 2 "
                             f"(e.g. [8, 5, 5, 5])")
        if len(levels) != dim:
            raise ValueError(f"levels {levels!r}: {len(levels)} channels, the latent has {dim}; expected one level "
                             f"count per latent channel")
        self.dim, self.levels_list, self.eps = dim, list(levels), eps
        self.codebook_size = math.prod(levels)
        self.register_buffer("levels", torch.tensor(levels, dtype=torch.long), persistent=False)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), 0)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        """tanh-bounded to (-(L-1)/2, (L-1)/2), shifted by half a step for an even L (Mentzer et al.'s code)."""
        levels = self.levels.to(z.dtype)
        half = (levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0).to(z.dtype)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: torch.Tensor) -> Latent:
        v, shape = as_vectors(z)
        bounded = self.bound(v)
        rounded = bounded + (bounded.round() - bounded).detach()
        half_width = (self.levels // 2).to(v.dtype)
        q = rounded / half_width  # in [-1, 1]
        indices = self.indices_of(rounded.detach())
        terms = {}
        if self.training:
            counts = sum_over_processes(torch.bincount(indices, minlength=self.codebook_size).to(v.dtype))
            terms = {k: t.detach() for k, t in code_statistics(counts).items()}
        regularizer = v.new_zeros(z.shape[0])
        return Latent(from_vectors(q, shape), regularizer, terms, indices.view(z.shape[0], *shape[1:-1]))

    def indices_of(self, rounded: torch.Tensor) -> torch.Tensor:
        """Grid values (-L//2 ... ) -> digits 0 ... L - 1 -> the mixed-radix index."""
        digits = (rounded + (self.levels // 2).to(rounded.dtype)).round().long()
        return (digits * self.basis).sum(1)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        digits = (indices.flatten()[:, None] // self.basis) % self.levels
        rounded = digits.float() - (self.levels // 2).float()
        q = rounded / (self.levels // 2).float()
        return from_vectors(q, (*indices.shape, self.dim))


class LFQ(Quantizer):
    """Lookup-free quantization: code = sign(z) per channel, 2^dim codes; loss per vector: commitment x
    ||z - sg(q)||^2 + entropy_weight x (the vector's code entropy) and, for the batch, - entropy_weight x
    the entropy of the global batch's mean code distribution (softmax over codes of 2 z.c / temperature)."""

    def __init__(self, dim: int, commitment: float = 0.25, entropy_weight: float = 0.1, temperature: float = 0.01,
                 allow_large: bool = False) -> None:
        super().__init__()
        if dim > MAX_LFQ_BITS and not allow_large:
            raise ValueError(f"dim {dim}: 2^{dim} codes; expected at most {MAX_LFQ_BITS} bits, or allow_large=true "
                             f"(usage statistics then count each bit)")
        if entropy_weight < 0 or commitment < 0 or temperature <= 0:
            raise ValueError(f"entropy_weight {entropy_weight}, commitment {commitment}, temperature {temperature}: "
                             f"expected weights >= 0 and a temperature > 0")
        self.dim, self.commitment, self.entropy_weight, self.temperature = dim, commitment, entropy_weight, temperature
        self.codebook_size = 2 ** dim
        self.register_buffer("bits", 2 ** torch.arange(dim - 1, -1, -1, dtype=torch.long), persistent=False)

    def quantize(self, z: torch.Tensor) -> Latent:
        v, shape = as_vectors(z)
        q = torch.where(v > 0, 1.0, -1.0).to(v.dtype)
        q_st = v + (q - v).detach()
        indices = ((q > 0).long() * self.bits).sum(1)
        loss = self.commitment * (v - q.detach()).pow(2).mean(1)
        terms = {}
        if self.entropy_weight and self.training:
            per_vector, batch = self.entropies(v)
            loss = loss + self.entropy_weight * (per_vector - batch)  # the batch term: the same for every vector
            terms.update({"entropy": per_vector.mean().detach(), "batch_entropy": batch.detach()})
        if self.training:
            counts = self.code_counts(indices, v.dtype)
            if counts is not None:
                terms.update({k: t.detach() for k, t in code_statistics(counts).items()})
        return Latent(from_vectors(q_st, shape), per_image(loss, z.shape[0]), terms,
                      indices.view(z.shape[0], *shape[1:-1]))

    def entropies(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each vector's code entropy [N], the entropy of the global batch's mean code distribution). The code
        distribution factorizes over channels (p(c_j = +1) = sigmoid(4 z_j / T)), so per-vector entropies are
        sums over channels; the batch's mean distribution does not: exact over all codes up to
        EXACT_ENTROPY_BITS channels, the sum of the channels' mean entropies beyond (an upper bound)."""
        p_plus = torch.sigmoid(4 * v / self.temperature)
        per_channel = binary_entropy(p_plus)
        per_vector = per_channel.sum(1)
        if self.dim <= EXACT_ENTROPY_BITS:
            codes = ((torch.arange(self.codebook_size, device=v.device)[:, None] & self.bits) > 0).to(v.dtype) * 2 - 1
            probabilities = torch.softmax(2 * v @ codes.t() / self.temperature, dim=1)
            mean = global_batch_mean(probabilities)
            batch = -(mean * mean.clamp_min(1e-30).log()).sum()
        else:
            batch = binary_entropy(global_batch_mean(p_plus)).sum()
        return per_vector, batch

    def code_counts(self, indices: torch.Tensor, dtype) -> torch.Tensor | None:
        if self.codebook_size > 1 << 20:  # a table of every code is too large: no usage statistics
            return None
        return sum_over_processes(torch.bincount(indices, minlength=self.codebook_size).to(dtype))

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        q = ((indices.flatten()[:, None] & self.bits) > 0).float() * 2 - 1
        return from_vectors(q, (*indices.shape, self.dim))


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-30).log() + (1 - p) * (1 - p).clamp_min(1e-30).log())


def build_quantizer(dim: int, spec: dict, seed: int = 0) -> nn.Module:
    """The quantizer a `quantizer` config section describes, for a latent of `dim` channels."""
    kind = spec.get("kind", "vq")
    if kind == "vq":
        return VectorQuantizer(dim, spec.get("codebook_size", 1024), spec.get("code_dim") or None,
                               spec.get("l2", False), spec.get("commitment", 0.25), spec.get("ema_decay", 0.0),
                               restart_after=spec.get("restart_after", 0), seed=seed,
                               kmeans_iters=spec.get("kmeans_iters", 0))
    if kind == "fsq":
        return FSQ(dim, list(spec.get("levels", [])))
    if kind == "lfq":
        return LFQ(dim, spec.get("commitment", 0.25), spec.get("entropy_weight", 0.1),
                   spec.get("temperature", 0.01), spec.get("allow_large", False))
    raise ValueError(f"quantizer kind {kind!r}: expected vq, fsq or lfq")
