"""How repeated runs become one number on a shared, noisy machine.

Each run records the intervals between consecutive generated tokens (decode steps as the caller
sees them). The headline decode rate is 1000 / the median interval pooled over all repeats: a
step preempted by another process lands in the tail, not in the median. The best run's mean
(total decode time / (tokens - 1)) is kept beside it, so a reader sees both."""
from __future__ import annotations

import statistics


def intervals_ms(stamps: list[float]) -> list[float]:
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]


def combine(runs: list[dict]) -> dict:
    """The best run (least decode time, or least time to first token for one-token runs) plus
    step_ms / decode_tok_s from the pooled median interval, and repeats."""
    multi = any(r["tokens"] > 1 for r in runs)
    best = dict(min(runs, key=(lambda r: r["decode_s"]) if multi else (lambda r: r["ttft_s"])))
    pooled = [x for r in runs for x in r.pop("intervals_ms", [])]
    best.pop("intervals_ms", None)
    best["repeats"] = len(runs)
    best["step_ms_best_run_mean"] = best.pop("step_ms", None)
    best["decode_tok_s_best_run_mean"] = best.pop("decode_tok_s", None)
    best["step_ms"] = statistics.median(pooled) if pooled else None
    best["decode_tok_s"] = 1e3 / best["step_ms"] if best["step_ms"] else None
    best["step_samples"] = len(pooled)
    return best
