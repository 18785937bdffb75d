"""frequency_penalty, presence_penalty and logit_bias (OpenAI's sampling adjustments): the sampler
sees the adjusted logits, log-probabilities stay the model's own. Unit tests of the arithmetic, then
the real default engine through the HTTP server (a bias that forbids the greedy first token changes
the answer; a penalty makes a run of repeats more varied; bad values are 400s naming the field)."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.api import SamplingParams
from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.sampling import adjust_logits
from runtime.server import create_app
from tests.waiting import wait_ready


def test_penalties_subtract_counts_and_presence_and_bias_adds():
    row = np.zeros(6, dtype=np.float32)
    adjust_logits(row, SamplingParams(frequency_penalty=0.5, presence_penalty=1.0,
                                      logit_bias=((5, 3.0), (0, -100.0))), [1, 1, 1, 2])
    assert row.tolist() == [-100.0, -2.5, -1.5, 0.0, 0.0, 3.0]


def test_no_adjustment_leaves_the_row_alone():
    row = np.arange(4, dtype=np.float32)
    adjust_logits(row, SamplingParams(), [0, 1, 2])
    assert row.tolist() == [0, 1, 2, 3]


@pytest.fixture
async def served(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=512))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    assert engine.block_manager.num_used_blocks == 0


def ask(**kw) -> dict:
    return {"model": "default", "max_tokens": 24, "logprobs": True,
            "messages": [{"role": "user", "content": "Hello!"}], **kw}


async def answer(client, **kw) -> tuple[str, list[dict]]:
    r = await client.post("/v1/chat/completions", json=ask(**kw))
    assert r.status == 200, await r.text()
    c = (await r.json())["choices"][0]
    return c["message"]["content"], c["logprobs"]["content"]


async def test_logit_bias_forbids_and_forces_tokens(served):
    client, engine = served
    text, entries = await answer(client)
    first = engine.tokenizer.token_to_id(entries[0]["token"])
    assert first is not None, entries[0]
    banned, banned_entries = await answer(client, logit_bias={str(first): -100})
    assert banned_entries[0]["token"] != entries[0]["token"] and banned != text
    # the log-probability reported is still the model's own for the token that was sampled
    assert banned_entries[0]["logprob"] < entries[0]["logprob"]
    forced = engine.tokenizer.token_to_id("x")
    _, forced_entries = await answer(client, logit_bias={str(forced): 100}, max_tokens=5)
    assert [e["token"] for e in forced_entries] == ["x"] * 5


async def test_frequency_penalty_breaks_repetition(served):
    client, _ = served
    _, plain = await answer(client, max_tokens=48, ignore_eos=True)
    _, penalised = await answer(client, max_tokens=48, ignore_eos=True, frequency_penalty=2.0,
                                presence_penalty=1.0)
    most = lambda es: max(sum(1 for e in es if e["token"] == t["token"]) for t in es)  # noqa: E731
    assert len(plain) == len(penalised) == 48
    assert most(penalised) < most(plain), (most(penalised), most(plain))


@pytest.mark.parametrize("field, value, words", [
    ("frequency_penalty", 3, "frequency_penalty must be between"),
    ("presence_penalty", "a", "presence_penalty must be a number"),
    ("logit_bias", [1], "logit_bias must be an object"),
    ("logit_bias", {"x": 1}, "is not a token id"),
    ("logit_bias", {"5": 101}, "logit_bias['5']"),
    ("logit_bias", {"99999999": 1}, "outside the vocabulary"),
])
async def test_bad_adjustments_are_400_naming_the_field(served, field, value, words):
    client, _ = served
    r = await client.post("/v1/chat/completions", json=ask(**{field: value}))
    assert r.status == 400
    assert words in (await r.json())["error"]["message"]
