"""Token sampling for a batch of logits, each row with its own SamplingParams.

temperature == 0: greedy (argmax, lowest id on ties). Otherwise: divide by the temperature, keep
the top_k highest (0: all), keep the smallest set of the highest-probability tokens whose mass
reaches top_p, renormalise and draw with the request's own generator. Each row uses exactly one
draw from its generator, so a request seeded with `seed` reproduces the same tokens whatever
else shares its batch.
"""
from __future__ import annotations

from typing import Sequence as Seq

import numpy as np

from runtime.api import MAX_TOP_LOGPROBS, InvalidRequest, SamplingParams


def new_rng(seed: int | None) -> np.random.Generator:
    """A request's generator: PCG64(seed), or fresh entropy when seed is None. A negative seed
    (the API takes int64) is taken modulo 2**64."""
    return np.random.Generator(np.random.PCG64(None if seed is None else seed % 2**64))


def answer_rng(seed: int | None, index: int, n: int) -> np.random.Generator:
    """Answer `index` of n > 1 answers: its own stream, a function of (seed, index) only."""
    if seed is None:
        return new_rng(None)
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed % 2**64,
                                                                      spawn_key=(index,))))


def validate(params: SamplingParams, vocab_size: int | None = None) -> None:
    """Raise InvalidRequest for parameters the sampler cannot honour."""
    if not (params.temperature >= 0.0) or params.temperature != params.temperature:
        raise InvalidRequest(f"temperature must be >= 0, got {params.temperature}")
    if not (0.0 < params.top_p <= 1.0):
        raise InvalidRequest(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise InvalidRequest(f"top_k must be >= 0, got {params.top_k}")
    if params.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {params.max_tokens}")
    for name in ("frequency_penalty", "presence_penalty"):
        v = getattr(params, name)
        if not -2.0 <= v <= 2.0:
            raise InvalidRequest(f"{name} must be between -2 and 2, got {v}")
    for token, bias in params.logit_bias:
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InvalidRequest(f"logit_bias: token id {token} is outside the vocabulary"
                                 + (f" (0..{vocab_size - 1})" if vocab_size else ""))
        if not -100.0 <= bias <= 100.0:
            raise InvalidRequest(f"logit_bias[{token}] must be between -100 and 100, got {bias}")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got "
                             f"{params.top_logprobs}")
    if params.top_logprobs and not params.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    if params.n < 1:
        raise InvalidRequest(f"n must be >= 1, got {params.n}")


def adjusts_logits(params: SamplingParams) -> bool:
    return bool(params.frequency_penalty or params.presence_penalty or params.logit_bias)


def adjust_logits(row: np.ndarray, params: SamplingParams, output_ids: Seq[int]) -> None:
    """OpenAI's penalties and logit_bias, in place on one row of logits (the raw ones stay for
    log-probabilities): each token loses frequency_penalty x the times it was generated so far,
    and presence_penalty once it has been; logit_bias adds its value to its token's logit."""
    if output_ids and (params.frequency_penalty or params.presence_penalty):
        ids, counts = np.unique(np.asarray(output_ids, dtype=np.int64), return_counts=True)
        keep = ids < row.shape[0]
        ids, counts = ids[keep], counts[keep]
        row[ids] -= (params.frequency_penalty * counts + params.presence_penalty).astype(row.dtype)
    for token, bias in params.logit_bias:
        if 0 <= token < row.shape[0]:
            row[token] += bias


def allowed_probs(logits: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Candidate token ids (most likely first) and their renormalised probabilities after
    temperature, top-k and top-p. logits: [V]."""
    x = logits.astype(np.float64) / params.temperature
    vocab = x.shape[0]
    k = params.top_k if 0 < params.top_k < vocab else vocab
    if k < vocab:
        # Take the k best (stable: lower id first among ties), then order them.
        part = np.argpartition(-x, k - 1)[:k]
        kth = x[part].min()
        cand = np.flatnonzero(x >= kth)            # ties at the boundary, cut by id below
        cand = cand[np.argsort(-x[cand], kind="stable")][:k]
    elif params.top_p < 1.0:
        cand = _nucleus_order(x, params.top_p)
    else:
        cand = np.arange(vocab)
    z = x[cand]
    top = z.max()
    if not np.isfinite(top):
        raise ValueError("logits row has no finite value")
    p = np.exp(z - top)
    # Normalise over the top-k set (or the whole vocabulary, of which cand may be the head).
    p /= p.sum() if k < vocab else np.exp(x - top).sum()
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (at least one token).
        keep = int(np.searchsorted(np.cumsum(p), params.top_p, side="left")) + 1
        cand, p = cand[:keep], p[:keep]
        p = p / p.sum()
    return cand, p


def _nucleus_order(x: np.ndarray, top_p: float, first: int = 1024) -> np.ndarray:
    """Token ids in descending order, enough of them to hold top_p of the mass: sort only the
    `first` best when they already hold it (exact, and avoids sorting the whole vocabulary)."""
    if x.shape[0] > 2 * first:
        part = np.argpartition(-x, first - 1)[:first]
        part = part[np.argsort(-x[part], kind="stable")]
        top = x[part[0]]
        total = np.exp(x - top).sum()
        if np.exp(x[part] - top).sum() >= top_p * total * (1 + 1e-9):
            return part
    return np.argsort(-x, kind="stable")


class Sampler:
    """Samples one token per row of a [B, V] logits batch."""

    def __call__(self, logits: np.ndarray, params: Seq[SamplingParams],
                 rngs: Seq[np.random.Generator | None]) -> np.ndarray:
        if logits.ndim != 2 or logits.shape[0] != len(params) or len(params) != len(rngs):
            raise ValueError(f"logits {logits.shape} do not match {len(params)} params / "
                             f"{len(rngs)} generators")
        out = np.empty(logits.shape[0], dtype=np.int64)
        for b, (row, sp, rng) in enumerate(zip(logits, params, rngs)):
            out[b] = self.sample_row(row, sp, rng)
        return out

    @staticmethod
    def sample_row(row: np.ndarray, params: SamplingParams,
                   rng: np.random.Generator | None) -> int:
        if params.temperature == 0.0:
            return int(np.argmax(row))
        if rng is None:
            rng = new_rng(params.seed)
        cand, p = allowed_probs(row, params)
        # Invert the CDF in token-id order, not probability order: a tiny change in the logits
        # (another batch shape, a cached prefix) then moves the result only near a boundary
        # instead of reshuffling near-equal candidates.
        order = np.argsort(cand, kind="stable")
        cand, p = cand[order], p[order]
        u = rng.random()
        idx = int(np.searchsorted(np.cumsum(p), u, side="right"))
        return int(cand[min(idx, len(cand) - 1)])
