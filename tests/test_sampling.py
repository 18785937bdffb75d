"""Sampler: greedy is argmax, seeds reproduce regardless of batch mates, top-k/top-p never leave
their allowed set, and the sampled distribution matches the softmax."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.api import InvalidRequest, SamplingParams
from runtime.sampling import Sampler, allowed_probs, new_rng, validate


def logits(b, v, seed=0):
    return np.random.default_rng(seed).standard_normal((b, v)).astype(np.float32) * 3


def test_greedy_is_argmax_and_ignores_the_generator():
    x = logits(4, 50)
    x[2, 7] = x[2, 9] = 100.0                     # a tie: the lower id wins
    params = [SamplingParams(temperature=0.0)] * 4
    out = Sampler()(x, params, [new_rng(1), None, new_rng(2), None])
    assert out.tolist() == [int(np.argmax(r)) for r in x] and out[2] == 7


def test_same_seed_same_tokens_whatever_the_batch():
    sampler = Sampler()
    sp = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1234)
    steps = [logits(3, 200, seed=s) for s in range(12)]
    alone_rng, mate_rng = new_rng(sp.seed), new_rng(sp.seed)
    alone = [sampler(x[1:2], [sp], [alone_rng])[0] for x in steps]
    others = [SamplingParams(temperature=1.5, seed=None), SamplingParams(temperature=0.0)]
    rng_a = new_rng(None)
    in_batch = [sampler(x[[2, 1, 0]], [others[0], sp, others[1]], [rng_a, mate_rng, None])[1]
                for x in steps]
    assert alone == in_batch
    other_seed = [sampler(x[1:2], [sp], [new_rng(99)])[0] for x in steps]
    assert other_seed != alone                     # 12 draws: a collision is vanishingly unlikely


def test_top_k_and_top_p_never_leave_the_allowed_set():
    rng = new_rng(0)
    x = logits(1, 300, seed=5)[0]
    order = np.argsort(-x, kind="stable")
    probs = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    nucleus_len = int(np.searchsorted(np.cumsum(probs[order]), 0.5)) + 1
    cases = [(SamplingParams(temperature=1.0, top_k=5), set(order[:5])),
             (SamplingParams(temperature=1.0, top_p=0.5), set(order[:nucleus_len])),
             (SamplingParams(temperature=2.0, top_k=1), {order[0]})]
    for sp, allowed in cases:
        seen = {int(Sampler.sample_row(x, sp, rng)) for _ in range(400)}
        assert seen <= allowed
        assert len(seen) == len(allowed) or len(allowed) > 20   # and they do get used
    cand, p = allowed_probs(x, SamplingParams(temperature=1.0, top_p=0.5))
    assert cand.tolist() == order[:nucleus_len].tolist() and p.sum() == pytest.approx(1.0)


def test_sampled_frequencies_follow_the_tempered_softmax():
    x = np.array([2.0, 1.0, 0.0, -1.0, -50.0], np.float32)
    sp = SamplingParams(temperature=0.7, seed=3)
    rng = new_rng(sp.seed)
    counts = np.bincount([Sampler.sample_row(x, sp, rng) for _ in range(20000)], minlength=5)
    want = np.exp(x / 0.7) / np.exp(x / 0.7).sum()
    np.testing.assert_allclose(counts / counts.sum(), want, atol=0.015)
    assert counts[4] == 0


def test_nucleus_shortcut_matches_a_full_sort_on_a_large_vocabulary():
    for seed, top_p in [(0, 0.9), (1, 0.5), (2, 0.99)]:
        x = np.random.default_rng(seed).standard_normal(20000) * 4
        sp = SamplingParams(temperature=1.0, top_p=top_p)
        cand, p = allowed_probs(x, sp)
        order = np.argsort(-x, kind="stable")
        full = np.exp(x[order] - x.max())
        full /= full.sum()
        n = int(np.searchsorted(np.cumsum(full), top_p)) + 1
        assert cand.tolist() == order[:n].tolist()
        np.testing.assert_allclose(p, full[:n] / full[:n].sum(), rtol=1e-9)


def test_masked_logits_are_never_sampled_and_bad_params_are_refused():
    x = np.full(10, -np.inf, np.float32)
    x[[3, 6]] = 0.0
    rng = new_rng(0)
    assert {Sampler.sample_row(x, SamplingParams(temperature=1.0), rng) for _ in range(100)} == {3, 6}
    for bad in [SamplingParams(temperature=-1.0), SamplingParams(top_p=0.0),
                SamplingParams(top_k=-2), SamplingParams(max_tokens=0)]:
        with pytest.raises(InvalidRequest):
            validate(bad)
    validate(SamplingParams(temperature=0.5, top_p=1.0, top_k=3))
    with pytest.raises(ValueError):
        Sampler()(logits(2, 5), [SamplingParams()], [None])
