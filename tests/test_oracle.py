"""FP-KV greedy generation through the compiled engine equals transformers token for token:
text only, one image, two images, concurrent requests batched together, and a second chat turn
that reuses the first turn's KV blocks. Every test ends with every KV block free again."""
from __future__ import annotations

import asyncio

import pytest

from runtime.api import ChatMessage, TextPart
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.oracle_helpers import Oracle, png, request, user

MAX_NEW = 12


@pytest.fixture(scope="module")
def oracle(default_engine_dir):
    from tests.conftest import ROOT
    return Oracle(ROOT / "build" / "models" / "default")


@pytest.fixture
async def engine(default_engine_dir):
    eng = Engine.load(default_engine_dir, EngineConfig(kv_mode="float", max_batch=4))
    await eng.start()
    yield eng
    await eng.stop()
    assert eng.block_manager.num_used_blocks == 0
    eng.block_manager.check_integrity()


async def run(engine, req):
    deltas = [d async for d in engine.generate(req)]
    return [t for d in deltas for t in d.token_ids], deltas[-1]


def test_engine_is_fp32_with_both_graphs(default_engine_dir):
    from runtime.manifest import load_manifest
    m = load_manifest(default_engine_dir)
    assert {"decoder", "decoder_float", "vision_cpu", "vision_gpu"} <= set(m.partitions)


@pytest.mark.parametrize("case", ["text", "one image", "two images"])
async def test_greedy_matches_transformers(engine, oracle, case):
    parts = {"text": ["Hello! What can you do?"],
             "one image": [png((255, 0, 0)), "What shape is this?"],
             "two images": [png((0, 0, 255), (64, 96)), png((0, 200, 0), (128, 64), shape="circle"),
                            "Which colours do you see?"]}[case]
    messages = [user(*parts)]
    tokens, last = await run(engine, request(messages, MAX_NEW))
    assert tokens == oracle.generate(messages, MAX_NEW)
    assert last.usage.completion_tokens == len(tokens)
    assert engine.stats().kv_blocks_used == 0


async def test_concurrent_requests_batched_match_transformers(engine, oracle):
    convs = [[user("Hello there")], [user(png((255, 255, 0)), "Describe the image.")],
             [user("How many shapes are in a picture of two squares?")],
             [user(png((128, 0, 128), (160, 96)), "What colour is it?")]]
    steps_before = engine.step_count
    results = await asyncio.gather(*[run(engine, request(c, MAX_NEW)) for c in convs])
    # four streams of up to 12 tokens in far fewer steps than run one by one: they were batched
    assert engine.step_count - steps_before < sum(len(t) for t, _ in results)
    for conv, (tokens, _) in zip(convs, results):
        assert tokens == oracle.generate(conv, MAX_NEW)


async def test_second_turn_reuses_the_first_turns_blocks(engine, oracle):
    image = png((0, 128, 255), (96, 96), shape="circle")
    first = [user(image, "What is in this image?")]
    tokens, last = await run(engine, request(first, MAX_NEW))
    assert last.usage.cached_tokens == 0
    answer = engine.tokenizer.decode(tokens, skip_special_tokens=True)
    second = first + [ChatMessage("assistant", (TextPart(answer),)), user("And what colour is it?")]
    tokens2, last2 = await run(engine, request(second, MAX_NEW))
    # the whole first prompt (image included) is served from the cache, in whole blocks
    bs = engine.block_manager.block_size
    assert last2.usage.cached_tokens >= (last.usage.prompt_tokens // bs) * bs > 0
    assert tokens2 == oracle.generate(second, MAX_NEW)
    # a second question about the same image reuses its blocks too
    third = [user(image, "What colour is the shape?")]
    tokens3, last3 = await run(engine, request(third, MAX_NEW))
    assert last3.usage.cached_tokens > 0
    assert tokens3 == oracle.generate(third, MAX_NEW)
