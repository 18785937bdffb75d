"""How repeated runs become one number on a shared, noisy machine.

Each run records the intervals between consecutive generated tokens (decode steps as the caller
sees them). The headline decode rate is 1000 / the median interval pooled over all repeats: a
step preempted by another process lands in the tail, not in the median. The headline time to
first token is the median over runs. No row picks its best run: beside every headline the
min / median / max of the per-run values is kept (`spread`), so a reader sees the variance."""
from __future__ import annotations

import statistics


def intervals_ms(stamps: list[float]) -> list[float]:
    return [1e3 * (b - a) for a, b in zip(stamps, stamps[1:])]


def spread(values) -> dict | None:
    """{"min", "median", "max", "n"} of the values that are not None (None when there are none)."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)}


def combine(runs: list[dict]) -> dict:
    """Several runs of one measurement as one record: the headline step_ms / decode_tok_s from the
    pooled median interval, ttft_s the median run's, and the spread of each per-run value. Runs
    may carry cached_tokens (the engine's own count of prompt tokens served from the prefix cache);
    the record keeps their maximum so a caller can tell that no run saw a cache hit."""
    pooled = [x for r in runs for x in r.get("intervals_ms", [])]
    step = statistics.median(pooled) if pooled else None
    graph = [x for r in runs for x in r.get("run_ms", [])]
    first = runs[0]
    out = {"prompt_tokens": first["prompt_tokens"], "tokens": first["tokens"], "repeats": len(runs),
           "step_ms": step, "decode_tok_s": 1e3 / step if step else None, "step_samples": len(pooled),
           "ttft_s": statistics.median(r["ttft_s"] for r in runs),
           "spread": {"ttft_ms": spread(1e3 * r["ttft_s"] for r in runs),
                      "decode_tok_s": spread(r.get("decode_tok_s") for r in runs),
                      "step_ms_run_mean": spread(r.get("step_ms") for r in runs)}}
    if graph:       # our engine's runs: the step split into ONNX Runtime and the Python around it
        run = statistics.median(graph)
        out["step_breakdown"] = {"step_ms": step, "run_ms": run, "python_ms": step - run,
                                 "python_ms_per_step_median": statistics.median(
                                     i - g for r in runs for i, g in zip(r["intervals_ms"], r["run_ms"])),
                                 "samples": len(graph)}
    if any("cached_tokens" in r for r in runs):
        out["cached_tokens"] = [r.get("cached_tokens", 0) for r in runs]
        out["max_cached_tokens"] = max(out["cached_tokens"])
    if any("prefix_block_hits" in r for r in runs):
        out["prefix_block_hits"] = sum(r.get("prefix_block_hits", 0) for r in runs)
    if len({r["prompt_tokens"] for r in runs}) > 1:
        out["prompt_tokens_each"] = [r["prompt_tokens"] for r in runs]
    return out


def fmt_spread(s: dict | None, fmt: str = "{:.1f}") -> str:
    """'min / median / max' for the table ('-' when unmeasured)."""
    if not s:
        return "-"
    return " / ".join(fmt.format(s[k]) for k in ("min", "median", "max"))
