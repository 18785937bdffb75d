"""Engines of non-default configs from the export matrix serve greedy tokens equal to
transformers' `generate` on the same checkpoint, through the real runtime (FP-KV graph, continuous
batching): 6 query heads over 2 KV heads with merge size 1 and untied embeddings, and
transformers' own Qwen3-VL test config (head_dim 8 with MRoPE sections [16, 8, 8] that overrun
it, merge size 1, a 512-token context). Every KV block is free again at the end."""
from __future__ import annotations

import asyncio

import pytest

from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.conftest import build_cached_engine
from tests.model_matrix import matrix_model_dir
from tests.oracle_helpers import Oracle, png, request, user

MAX_NEW = 10
SERVED = ["gqa3-untied-merge1", "hf-test-config"]
CONVERSATIONS = {
    "text": [user("Hello! What can you do?")],
    "one image": [user(png((255, 0, 0)), "What shape is this?")],
    "two images": [user(png((0, 0, 255), (64, 96)), png((0, 200, 0), (128, 64), shape="circle"),
                        "Which colours do you see?")],
}


@pytest.fixture(scope="module", params=SERVED)
def variant(request):
    model = matrix_model_dir(request.param)
    return build_cached_engine(model), Oracle(model)


async def run(engine, req):
    deltas = [d async for d in engine.generate(req)]
    return [t for d in deltas for t in d.token_ids]


async def test_greedy_tokens_equal_transformers(variant):
    engine_dir, oracle = variant
    engine = Engine.load(engine_dir, EngineConfig(kv_mode="float", max_batch=4))
    await engine.start()
    try:
        # one at a time, then all three batched together
        for name, conv in CONVERSATIONS.items():
            want = oracle.generate(conv, MAX_NEW)
            assert want, name
            assert await run(engine, request(conv, MAX_NEW)) == want, name
        got = await asyncio.gather(*[run(engine, request(c, MAX_NEW)) for c in CONVERSATIONS.values()])
        assert got == [oracle.generate(c, MAX_NEW) for c in CONVERSATIONS.values()]
    finally:
        await engine.stop()
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_integrity()
