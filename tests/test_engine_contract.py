"""The EngineAPI contract, run against the fake engine (server mechanics) and the real one: the
server relies on exactly these behaviours and nothing else of either."""
from __future__ import annotations

import asyncio
import dataclasses

import pytest

from runtime.api import (ChatMessage, EngineAPI, GenerationRequest, InvalidRequest, NotReady, QueueFull,
                         SamplingParams, TextPart)
from runtime.engine import AsyncEngine
from runtime.engine_config import EngineConfig
from tests.fake_engine import FakeEngine
from tests.media_fixtures import encode_clip
from tests.waiting import wait_until


@pytest.fixture(params=["fake", "real"])
async def engine(request, default_engine_dir):
    if request.param == "fake":
        eng = FakeEngine(script=tuple(f" w{i}" for i in range(300)), token_delay=0.005,
                         max_running=2, max_queue=1)
    else:
        eng = AsyncEngine(default_engine_dir, EngineConfig(max_context=512, max_batch=2, max_queue=1))
    assert isinstance(eng, EngineAPI)
    yield eng
    if eng.ready:
        await eng.stop()


def ask(text: str, max_tokens: int = 8, rid: str = "", **kw) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", (TextPart(text),)),),
                             SamplingParams(max_tokens=max_tokens, **kw), request_id=rid)


async def test_life_cycle(engine):
    assert not engine.ready and engine.max_context is None
    with pytest.raises(NotReady):
        await anext(engine.generate(ask("hi")))
    await engine.start()
    assert engine.ready and engine.max_context > 0 and engine.model_name
    s = engine.stats()
    assert s.kv_blocks_used == 0 and s.kv_blocks_total > 0 and s.requests_running == 0
    await engine.stop()
    assert not engine.ready
    with pytest.raises(NotReady):
        await anext(engine.generate(ask("hi")))


async def test_generate_counts_every_token_once(engine):
    await engine.start()
    deltas = [d async for d in engine.generate(ask("Hello", 6, ignore_eos=True))]
    assert all(d.finish_reason is None for d in deltas[:-1])
    last = deltas[-1]
    assert last.finish_reason in ("stop", "length") and last.usage is not None
    assert sum(len(d.token_ids) for d in deltas) == last.usage.completion_tokens <= 6
    assert last.usage.prompt_tokens > 0
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0)


async def test_closing_the_iterator_cancels_and_frees(engine):
    await engine.start()
    agen = engine.generate(ask("Go on", 250, ignore_eos=True))
    await anext(agen)
    assert await wait_until(lambda: engine.stats().kv_blocks_used > 0)
    await agen.aclose()
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0
                            and engine.stats().requests_running == 0)


async def test_cancel_by_id(engine):
    await engine.start()
    agen = engine.generate(ask("Go on", 250, rid="r-1", ignore_eos=True))
    await anext(agen)
    assert await engine.cancel("r-1")
    rest = [d async for d in agen]
    assert rest[-1].finish_reason == "cancelled"
    assert not await engine.cancel("r-unknown")
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0)


async def test_admission_refuses_beyond_running_plus_queue(engine):
    await engine.start()
    streams = [engine.generate(ask(f"long {i}", 250, ignore_eos=True)) for i in range(3)]
    firsts = await asyncio.gather(*(anext(s) for s in streams))        # 2 running + 1 queued
    assert len(firsts) == 3
    with pytest.raises(QueueFull) as err:
        await anext(engine.generate(ask("one too many")))
    assert err.value.status == 429 and err.value.retry_after > 0
    for s in streams:
        await s.aclose()
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0)
    deltas = [d async for d in engine.generate(ask("room again", 2))]
    assert deltas[-1].finish_reason in ("stop", "length")


async def test_preview_video(engine, tmp_path):
    await engine.start()
    path = tmp_path / "clip.mp4"
    encode_clip(width=96, height=64, fps=10, frames=40, gop=5, path=str(path))
    video = await engine.preview_video(str(path))
    assert video.grid_thw[0] >= 2 and len(video.timestamps) == video.grid_thw[0]
    assert video.num_tokens > 0


def test_the_request_record_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ask("x").request_id = "y"


async def test_n_answers_logprobs_and_usage(engine):
    await engine.start()
    deltas = [d async for d in engine.generate(ask("Hello", 5, ignore_eos=True, n=2,
                                                   logprobs=True, top_logprobs=2))]
    assert {d.index for d in deltas} == {0, 1}
    assert all(d.logprobs is not None and len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert all(len(e.top) == 2 and e.logprob <= 0 for d in deltas for e in d.logprobs)
    assert sorted(d.index for d in deltas if d.finish_reason) == [0, 1]
    assert deltas[-1].finish_reason and all(d.usage is None for d in deltas[:-1])
    assert deltas[-1].usage.completion_tokens == sum(len(d.token_ids) for d in deltas) == 10
    with pytest.raises(InvalidRequest, match="n must be"):
        await anext(engine.generate(ask("Hello", 3, n=3)))          # beyond max_batch (2)
    plain = [d async for d in engine.generate(ask("Hello", 3))]
    assert all(d.logprobs is None and d.index == 0 for d in plain)
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0)


async def test_tokenize_round_trip_and_bad_ids(engine):
    await engine.start()
    t = await engine.tokenize("Hello there, 12 €")
    assert t.token_ids and len(t.pieces) == len(t.token_ids)
    assert await engine.detokenize(t.token_ids) == "Hello there, 12 €"
    chat = await engine.tokenize(messages=(ChatMessage("user", (TextPart("Hello"),)),))
    assert len(chat.token_ids) > len((await engine.tokenize("Hello")).token_ids)
    with pytest.raises(InvalidRequest, match=r"tokens\[1\]"):
        await engine.detokenize((1, 10**7))


async def test_cancel_by_id_ends_every_answer(engine):
    await engine.start()
    agen = engine.generate(ask("Go on", 250, rid="r-n", ignore_eos=True, n=2))
    first = await anext(agen)
    assert await engine.cancel("r-n")
    rest = [first] + [d async for d in agen]
    assert sorted(d.index for d in rest if d.finish_reason == "cancelled") == [0, 1]
    assert rest[-1].usage is not None
    assert await wait_until(lambda: engine.stats().kv_blocks_used == 0
                            and engine.stats().requests_running == 0)
