"""Engine behaviour beyond greedy parity: seeded sampling, stop strings, cancellation at any
point, a full queue, chunked prefill alongside running streams. KV blocks all free afterwards."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from runtime.api import QueueFull
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.oracle_helpers import png, request, user
from tests.waiting import wait_until


@pytest.fixture
async def make_engine(default_engine_dir):
    engines = []

    async def make(**kw):
        eng = Engine.load(default_engine_dir, EngineConfig(**kw))
        await eng.start()
        engines.append(eng)
        return eng
    yield make
    for eng in engines:
        await eng.stop()
        assert eng.block_manager.num_used_blocks == 0
        eng.block_manager.check_integrity()


async def tokens(engine, req):
    return [t async for d in engine.generate(req) for t in d.token_ids]


async def test_seeded_sampling_is_reproducible_alone_and_batched(make_engine):
    """Fresh engines (no cached prefix), FP KV: the same seed gives the same tokens whether the
    request runs alone or batched with others."""
    req = request([user("Tell me about shapes")], 16, temperature=1.0, top_k=50, seed=1234)
    alone = await tokens(await make_engine(kv_mode="float"), req)
    engine = await make_engine(kv_mode="float")
    others = [request([user(f"noise {i}")], 16, temperature=1.0, seed=i) for i in range(3)]
    batched = await asyncio.gather(tokens(engine, req), *[tokens(engine, r) for r in others])
    assert batched[0] == alone
    reseeded = request([user("Tell me about shapes")], 16, temperature=1.0, top_k=50, seed=99)
    assert await tokens(await make_engine(kv_mode="float"), reseeded) != alone


async def test_stop_string_ends_the_answer_before_it(make_engine):
    engine = await make_engine()
    deltas = [d async for d in engine.generate(request([user("Hello")], 24))]
    text = "".join(d.text for d in deltas)
    if len(text.strip()) < 4:
        pytest.skip("the model's answer is too short to cut")
    stop = text[len(text) // 2:len(text) // 2 + 2]
    cut = [d async for d in engine.generate(request([user("Hello")], 24, stop=(stop,)))]
    out = "".join(d.text for d in cut)
    assert cut[-1].finish_reason == "stop" and stop not in out and text.startswith(out)


async def test_cancellation_at_any_point_frees_blocks(make_engine):
    engine = await make_engine(max_batch=1, max_tokens_per_step=16)
    long_prompt = [user(png((255, 0, 0), (256, 256)), "word " * 300)]
    # A step takes at least 5 ms here, so the ~20-step prefill lasts long enough for the checks
    # below to see it under way on a fast, idle machine too (the leaner step made it ~5 ms in all).
    real_step = engine.core.step

    def slow_step(**kw):
        time.sleep(0.005)
        return real_step(**kw)
    engine.core.step = slow_step

    async def consume(req, n):
        got = 0
        async for _ in engine.generate(req):
            got += 1
            if got >= n:
                return got
        return got

    # cancelled while its prompt is being prefilled in chunks, and while waiting behind it
    first = asyncio.create_task(consume(request(long_prompt, 200, ignore_eos=True), 10 ** 6))
    await wait_until(lambda: engine.block_manager.num_used_blocks > 0)
    second = asyncio.create_task(consume(request([user("hi")], 200, ignore_eos=True), 10 ** 6))
    await wait_until(lambda: engine.stats().requests_waiting >= 1)
    assert engine.stats().requests_waiting >= 1
    assert engine.scheduler.running[0].num_computed_tokens < engine.scheduler.running[0].num_prompt_tokens
    second.cancel()
    first.cancel()
    await asyncio.gather(first, second, return_exceptions=True)
    assert await wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.scheduler.has_work)
    # cancelled mid-decode (the consumer stops after 3 deltas and closes the iterator)
    assert await consume(request([user("count")], 200, ignore_eos=True), 3) == 3
    assert await wait_until(lambda: engine.block_manager.num_used_blocks == 0 and not engine.scheduler.has_work)


async def test_a_full_queue_is_refused(make_engine):
    engine = await make_engine(max_batch=1, max_queue=1)
    started = [asyncio.create_task(tokens(engine, request([user(f"long {i}")], 1000, ignore_eos=True)))
               for i in range(2)]
    # wait for the state under test (one running, one queued) rather than a fixed time
    await wait_until(lambda: engine.stats().requests_waiting >= 1)
    assert engine.stats().requests_waiting == 1 and not any(t.done() for t in started)
    with pytest.raises(QueueFull):
        await tokens(engine, request([user("one too many")], 5))
    for t in started:
        t.cancel()
    await asyncio.gather(*started, return_exceptions=True)


async def test_a_long_prompt_does_not_stall_a_running_stream(make_engine):
    engine = await make_engine(max_tokens_per_step=64)
    stream = engine.generate(request([user("Go on")], 60, ignore_eos=True))
    first = await stream.__anext__()
    steps_at_join = engine.step_count
    long = asyncio.create_task(tokens(engine, request([user("word " * 600)], 4)))
    got = 1
    async for _ in stream:
        got += 1
        if got == 15:
            break
    await stream.aclose()
    # the 600-token prompt is prefilled in >= 9 chunks of 64 while the stream kept producing
    assert not long.done() or engine.step_count - steps_at_join >= 10
    await long
    assert first.text is not None


async def _handovers(make_engine, monkeypatch, interval_ms: float) -> tuple[list[int], list]:
    """(tokens, one entry per wake-up of the event loop: the outputs it carried) for a 12-token
    answer with `stream_interval_ms` = interval_ms."""
    import runtime.engine as engine_mod
    wakes = []
    deliver = engine_mod._deliver

    def record(items):
        wakes.append([out for _, out in items])
        deliver(items)
    monkeypatch.setattr(engine_mod, "_deliver", record)
    engine = await make_engine(stream_interval_ms=interval_ms)
    toks = await tokens(engine, request([user("Go on")], 12, ignore_eos=True))
    return toks, wakes


async def test_fast_steps_hand_their_tokens_over_together(make_engine, monkeypatch):
    """Within the stream interval the engine loop wakes the event loop once for several steps,
    but never holds the first token or the end: with a 10 s interval, a 12-token answer comes in
    exactly two wake-ups (its first token; then the other eleven with the finish), the same
    tokens as with no interval, where every step wakes the event loop."""
    each, every_step = await _handovers(make_engine, monkeypatch, 0.0)
    assert len(each) == 12
    assert sum(1 for w in every_step if any(o.new_token_ids for o in w)) == 12
    together, wakes = await _handovers(make_engine, monkeypatch, 10_000.0)
    assert together == each
    assert len(wakes) == 2
    assert [len(o.new_token_ids) for o in wakes[0]] == [1]
    assert sum(len(o.new_token_ids) for o in wakes[1]) == 11
    assert wakes[1][-1].finish_reason == "length"


async def test_a_held_token_is_not_lost_when_the_request_is_cancelled(make_engine):
    """Tokens held for the next hand-over still reach the stream before its cancellation ends
    it, and the blocks come back (make_engine checks)."""
    engine = await make_engine(stream_interval_ms=10_000.0)
    req = dataclasses.replace(request([user("Go on")], 200, ignore_eos=True), request_id="held-1")
    got, reason = [], None
    async for d in engine.generate(req):
        got += d.token_ids
        if d.finish_reason:
            reason = d.finish_reason
            break
        if len(got) == 1:
            await wait_until(lambda: engine.step_count > 5)
            await engine.cancel(req.request_id)
    assert reason == "cancelled" and len(got) > 1
