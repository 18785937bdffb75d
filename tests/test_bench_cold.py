"""The benchmark's cold-run guard through the real engine: a prompt the engine has seen is served
from its prefix cache, and exporter.bench.ours refuses to call such a run cold; fresh prompts
(a new salt each) are cold by the engine's own counters. No timing is asserted."""
from __future__ import annotations

import asyncio

import pytest

from exporter.bench import ours
from exporter.bench.timing import combine, spread


def _run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def engine(default_engine_dir):
    return ours.load_engine(default_engine_dir, 1)


def test_repeated_prompt_is_caught_and_fresh_prompts_are_cold(engine):
    async def go():
        await engine.start()
        try:
            texts = ours.fresh_prompts(engine, 48, 3)
            assert len(set(texts)) == 3
            lengths = {len(ours.prompt_ids(engine, t)) for t in texts}
            assert lengths == {48}                           # same-length prompts: comparable runs
            cold = await ours.cold(engine, texts, 2, "fresh")
            assert cold["cached_tokens"] == [0, 0, 0] and cold["prefix_block_hits"] == 0
            with pytest.raises(ours.CacheHit, match="hit the prefix cache"):
                await ours.cold(engine, [texts[0]], 2, "repeated")
            again = await ours.timed(engine, ours.request(texts[1], 1))
            assert again["cached_tokens"] == 32 and again["prefix_block_hits"] == 2   # 2 of 3 blocks
        finally:
            await engine.stop()
    _run(go())


def test_combine_reports_the_median_and_the_spread_not_the_best_run():
    runs = [{"prompt_tokens": 8, "tokens": 3, "ttft_s": t, "decode_tok_s": r, "step_ms": 1e3 / r,
             "intervals_ms": [1e3 / r] * 2, "cached_tokens": 0} for t, r in ((0.03, 100), (0.01, 400), (0.02, 200))]
    out = combine(runs)
    assert out["ttft_s"] == 0.02 and out["step_ms"] == 5.0 and out["decode_tok_s"] == 200
    assert out["spread"]["ttft_ms"] == pytest.approx({"min": 10, "median": 20, "max": 30, "n": 3})
    assert out["spread"]["decode_tok_s"] == {"min": 100, "median": 200, "max": 400, "n": 3}
    assert out["max_cached_tokens"] == 0 and spread([None]) is None
