"""Row 1c: what the prefix cache buys, reported as such (row 1's prefill is cold by construction).

Two warm cases, each beside its cold twin on the same engine, with the engine's own count of
prompt tokens it served from the cache (Usage.cached_tokens):
  * same prompt again: a never-seen prompt (cold, checked), then the very same prompt again;
  * second chat turn over a first turn with an image: turn one (image + question, answered),
    then turn two = turn one + its answer + a new question. Its cold twin is the same second-turn
    conversation over an image the engine has never seen (same size, so the same token count),
    sent without its first turn. The vision embedding cache's hits are shown too where the engine
    exposes them (engine.preparer.cache.hits).
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from exporter.bench import ours
from exporter.bench.timing import combine
from runtime.api import ChatMessage, TextPart


def bench_image(seed: int, side: int = 256) -> bytes:
    """A PNG of random coloured rectangles; a different seed is a different picture."""
    from PIL import Image, ImageDraw
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (side, side), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = (int(v) for v in rng.integers(0, side - 40, 2))
        w, h = (int(v) for v in rng.integers(20, 80, 2))
        draw.rectangle((x0, y0, x0 + w, y0 + h), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _vision_hits(engine) -> int | None:
    cache = getattr(getattr(engine, "preparer", None), "cache", None)
    return getattr(cache, "hits", None)


def _summary(runs: list[dict]) -> dict:
    r = combine(runs)
    return {"prompt_tokens": r["prompt_tokens"], "ttft_s": r["ttft_s"], "spread": r["spread"],
            "cached_tokens": r["cached_tokens"], "repeats": r["repeats"]}


async def prefix_cache(engine_dir: Path, threads: int, s) -> dict:
    engine = ours.load_engine(engine_dir, threads)
    await engine.start()
    try:
        await ours.warm_up(engine, s.prefill_prompt)
        cold, warm = [], []
        for text in ours.fresh_prompts(engine, s.prefill_prompt, s.repeats):
            cold.append(await ours.timed(engine, ours.request(text, 1)))
            warm.append(await ours.timed(engine, ours.request(text, 1)))
        ours.assert_cold(cold, "prefix cache row: first sight of a prompt")
        same = {"cold": _summary(cold), "warm": _summary(warm)}
        same["speedup"] = _speedup(same)

        first_q = ours.fresh_prompts(engine, s.decode_prompt, s.repeats)
        second_q = ours.fresh_prompts(engine, s.decode_prompt, s.repeats)
        turn1, turn2, twin = [], [], []
        vision0 = _vision_hits(engine)
        for i in range(s.repeats):
            seen, unseen = bench_image(1000 + 2 * i), bench_image(1001 + 2 * i)
            r1 = await ours.timed(engine, ours.chat((ours.image_turn(seen, first_q[i]),), s.turn_tokens))
            turn1.append(r1)
            answer = ChatMessage("assistant", (TextPart(r1["text"]),))
            follow = ChatMessage("user", (TextPart(second_q[i]),))
            turn2.append(await ours.timed(engine, ours.chat(
                (ours.image_turn(seen, first_q[i]), answer, follow), 1)))
            twin.append(await ours.timed(engine, ours.chat(
                (ours.image_turn(unseen, first_q[i]), answer, follow), 1)))
        ours.assert_cold(turn1, "prefix cache row: first turn with a new image")
        ours.assert_cold(twin, "prefix cache row: second turn over an unseen image")
        vision1 = _vision_hits(engine)
        turns = {"first_turn": _summary(turn1), "cold": _summary(twin), "warm": _summary(turn2),
                 "first_turn_answer_tokens": s.turn_tokens,
                 "vision_cache_hits": None if vision0 is None else vision1 - vision0}
        turns["speedup"] = _speedup(turns)
    finally:
        await engine.stop()
    return {"engine": str(engine_dir), "kv_mode": engine.core.kv_mode, "same_prompt": same,
            "second_turn_image": turns}


def _speedup(pair: dict) -> float | None:
    c, w = pair["cold"]["ttft_s"], pair["warm"]["ttft_s"]
    return c / w if c and w else None
