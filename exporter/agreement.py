"""How closely two sets of next-token logits agree, position by position: greedy (top-1)
agreement, KL(p_reference || p_candidate) and the largest logit difference. Used by the parity
gate for quantised graphs and by the tests that compare INT8 with float KV."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Agreement:
    positions: int
    greedy_agreement: float          # fraction of positions whose argmax agrees
    mean_kl: float                   # mean KL(p_reference || p_candidate), nats
    max_kl: float
    max_abs_logit_diff: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(reference: list[np.ndarray], candidate: list[np.ndarray]) -> Agreement:
    ref, cand = np.concatenate(reference), np.concatenate(candidate)
    lp, lq = _log_softmax(ref), _log_softmax(cand)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return Agreement(positions=int(ref.shape[0]),
                     greedy_agreement=float((ref.argmax(-1) == cand.argmax(-1)).mean()),
                     mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                     max_abs_logit_diff=float(np.abs(ref - cand).max()))
