"""The second half of OpenAI API completeness through the HTTP server and the real default engine:
logprobs (shape and one entry per token, streamed and not), n > 1 (choices, indices, usage, a
client leaving frees every answer's blocks), legacy /v1/completions (raw prompt, no template),
/tokenize and /detokenize equal to transformers' AutoTokenizer, and the official openai client."""
from __future__ import annotations

import re

import asyncio
import math

import pytest

from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.server import create_app
from tests.conftest import ROOT
from tests.test_server_api import parse_sse
from tests.waiting import wait_ready


@pytest.fixture
async def served(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=512, max_batch=8))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    for _ in range(100):
        if engine.block_manager.num_used_blocks == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_integrity()


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ROOT / "build" / "models" / "default")


def chat(content="Tell me about red circles.", **kw):
    return {"model": "default", "messages": [{"role": "user", "content": content}],
            "max_tokens": 10, **kw}


def check_logprob_entries(entries, top):
    for e in entries:
        assert set(e) == {"token", "logprob", "bytes", "top_logprobs"}
        assert e["logprob"] <= 0 and isinstance(e["bytes"], list)
        assert len(e["top_logprobs"]) == top
        assert e["top_logprobs"][0]["logprob"] >= e["logprob"] - 1e-9
        assert [t["logprob"] for t in e["top_logprobs"]] == sorted(
            (t["logprob"] for t in e["top_logprobs"]), reverse=True)


async def test_logprobs_streamed_equal_non_streamed(served):
    client, _ = served
    body = chat(logprobs=True, top_logprobs=3, ignore_eos=True)
    full = await (await client.post("/v1/chat/completions", json=body)).json()
    choice = full["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == full["usage"]["completion_tokens"] == 10
    check_logprob_entries(entries, 3)
    # greedy: each chosen token is the top one, and the tokens' bytes spell the answer
    assert all(e["top_logprobs"][0]["token"] == e["token"] for e in entries)
    # (special tokens, here the end-of-turn ignore_eos generates past, are skipped in the text)
    said = [e for e in entries if not (e["token"].startswith("<|") and e["token"].endswith("|>"))]
    assert bytes(b for e in said for b in e["bytes"]).decode() == choice["message"]["content"]
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [e for e in parse_sse(await r.text())[:-1] if e["choices"]]
    streamed = [x for e in events if e["choices"][0]["logprobs"]
                for x in e["choices"][0]["logprobs"]["content"]]
    assert streamed == entries
    # a stop string: text cut or held back still has its tokens' entries, each with the delta
    # that carries the token id
    text = choice["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.find(stop)]
    r = await client.post("/v1/chat/completions", json={**body, "stop": [stop], "stream": True})
    events = [e for e in parse_sse(await r.text())[:-1] if e["choices"]]
    got = [x for e in events if e["choices"][0]["logprobs"] for x in e["choices"][0]["logprobs"]["content"]]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == cut
    assert got == entries[:len(got)]
    # the token that completed the stop string has its entry, though its text is not shown
    spelled = bytes(b for e in got for b in e["bytes"]).decode(errors="replace")
    assert spelled.startswith(cut) and stop in spelled
    stopped = await (await client.post("/v1/chat/completions", json={**body, "stop": [stop]})).json()
    assert len(stopped["choices"][0]["logprobs"]["content"]) == stopped["usage"]["completion_tokens"] == len(got)
    # without logprobs: null, as OpenAI answers
    plain = await (await client.post("/v1/chat/completions", json=chat())).json()
    assert plain["choices"][0]["logprobs"] is None


async def test_top_logprobs_above_20_and_without_logprobs_are_400(served):
    client, engine = served
    for body, needle in ((chat(logprobs=True, top_logprobs=21), "top_logprobs"),
                         (chat(top_logprobs=2), "top_logprobs needs logprobs"),
                         (chat(n=9), "n must be"),
                         (chat(n=True), "n must be an integer")):
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status == 400 and needle in (await r.json())["error"]["message"]
    r = await client.post("/v1/chat/completions", json=chat(logprobs=True, top_logprobs=20,
                                                            max_tokens=2))
    assert r.status == 200
    assert len((await r.json())["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 20


async def test_n_answers_non_streamed_and_streamed(served):
    client, engine = served
    body = chat(n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    full = await (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] for c in full["choices"]]
    assert len(set(texts)) > 1
    one = await (await client.post("/v1/chat/completions", json=chat(max_tokens=12))).json()
    assert full["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]       # counted once
    assert full["usage"]["completion_tokens"] == 36
    again = await (await client.post("/v1/chat/completions", json=body)).json()
    assert [c["message"]["content"] for c in again["choices"]] == texts          # the seed
    r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    events = parse_sse(await r.text())
    assert events[-1] == "[DONE]"
    pieces, finishes, roles = {0: "", 1: "", 2: ""}, [], []
    for e in events[:-1]:
        for c in e["choices"]:
            if c["delta"].get("role"):
                roles.append(c["index"])
            pieces[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                finishes.append(c["index"])
    assert sorted(roles) == [0, 1, 2] and sorted(finishes) == [0, 1, 2]
    assert [pieces[i] for i in range(3)] == texts
    usages = [e["usage"] for e in events[:-1] if e.get("usage")]
    assert len(usages) == 1 and not events[-2]["choices"]
    assert {k: usages[0][k] for k in ("prompt_tokens", "completion_tokens")} == \
        {"prompt_tokens": full["usage"]["prompt_tokens"], "completion_tokens": 36}


async def test_greedy_n2_answers_are_identical(served):
    client, _ = served
    full = await (await client.post("/v1/chat/completions",
                                    json=chat(n=2, max_tokens=16, logprobs=True))).json()
    a, b = full["choices"]
    assert a["message"]["content"] == b["message"]["content"] != ""
    assert a["logprobs"] == b["logprobs"]


async def test_a_client_leaving_frees_every_answers_blocks(served):
    client, engine = served
    r = await client.post("/v1/chat/completions",
                          json=chat(n=4, stream=True, max_tokens=400, ignore_eos=True))
    assert r.status == 200
    for _ in range(6):
        await r.content.readline()
    assert engine.stats().requests_running == 4
    r.close()
    for _ in range(200):
        if engine.block_manager.num_used_blocks == 0 and engine.stats().requests_running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.block_manager.num_used_blocks == 0
    assert (await client.post("/v1/chat/completions", json=chat(n=2))).status == 200


async def test_legacy_completions(served, hf_tokenizer):
    client, _ = served
    prompt = "Once upon a time there was a red circle"
    r = await client.post("/v1/completions", json={"model": "default", "prompt": prompt,
                                                   "ignore_eos": True})
    assert r.status == 200, await r.text()
    full = await r.json()
    assert full["object"] == "text_completion" and full["id"].startswith("cmpl-")
    choice = full["choices"][0]
    assert full["usage"]["completion_tokens"] == 16                      # OpenAI's default
    # the raw prompt, no chat template
    assert full["usage"]["prompt_tokens"] == len(hf_tokenizer(prompt)["input_ids"])
    assert choice["logprobs"] is None and choice["finish_reason"] == "length" and choice["text"]
    body = {"prompt": [prompt], "max_tokens": 8, "logprobs": 2, "n": 2, "ignore_eos": True}
    lp = await (await client.post("/v1/completions", json=body)).json()
    assert [c["index"] for c in lp["choices"]] == [0, 1]
    for c in lp["choices"]:
        legacy = c["logprobs"]
        assert len(legacy["tokens"]) == len(legacy["token_logprobs"]) == 8
        # each token's own text, special tokens included (ignore_eos lets the model write
        # <|im_end|> and go on); the text skips those, as a full decode does
        assert re.sub(r"<\|[a-z_]+\|>", "", "".join(legacy["tokens"])) == c["text"]
        assert legacy["text_offset"][0] == 0 and legacy["text_offset"] == sorted(legacy["text_offset"])
        for tok, value, top in zip(legacy["tokens"], legacy["token_logprobs"], legacy["top_logprobs"]):
            assert top[tok] == value and 1 <= len(top) <= 3 and max(top.values()) <= 0
    assert lp["choices"][0]["text"] == choice["text"][:len(lp["choices"][0]["text"])]
    r = await client.post("/v1/completions", json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}})
    events = parse_sse(await r.text())
    assert events[-1] == "[DONE]" and events[-2]["usage"] == lp["usage"]
    texts = {0: "", 1: ""}
    offsets = {0: [], 1: []}
    for e in events[:-2]:
        assert e["object"] == "text_completion"
        for c in e["choices"]:
            texts[c["index"]] += c["text"]
            if c["logprobs"]:
                offsets[c["index"]] += c["logprobs"]["text_offset"]
    assert [texts[0], texts[1]] == [c["text"] for c in lp["choices"]]
    assert offsets[0] == lp["choices"][0]["logprobs"]["text_offset"]
    for bad, needle in (({"prompt": prompt, "echo": True}, "echo"),
                        ({"prompt": prompt, "logprobs": 6}, "logprobs"),
                        ({"prompt": ["a", "b"]}, "prompt"), ({"prompt": ""}, "prompt"),
                        ({"prompt": [1, 2, 3]}, "prompt"), ({"prompt": prompt, "best_of": 3}, "best_of"),
                        ({}, "prompt")):
        r = await client.post("/v1/completions", json=bad)
        assert r.status == 400 and needle in (await r.json())["error"]["message"], bad


TEXTS = ["Hello world", "Prix: 12,50 € — 日本語 🙂 naïve", "  spaces\tand\nnewlines  ",
         "def f(x):\n    return x ** 2  # code", "Count to 10: 1, 2, 3."]


async def test_tokenize_and_detokenize_equal_transformers(served, hf_tokenizer):
    client, engine = served
    for text in TEXTS:
        want = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        llama = await (await client.post("/tokenize", json={"content": text})).json()
        vllm = await (await client.post("/tokenize", json={"prompt": text})).json()
        assert llama["tokens"] == vllm["tokens"] == want
        assert vllm["count"] == len(want) and vllm["max_model_len"] == engine.max_context
        back = await (await client.post("/detokenize", json={"tokens": want})).json()
        assert back["content"] == back["prompt"] == hf_tokenizer.decode(want) == text
    pieces = await (await client.post("/tokenize", json={"content": "Hello world",
                                                         "with_pieces": True})).json()
    assert "".join(p["piece"] for p in pieces["tokens"]) == "Hello world"
    assert [p["id"] for p in pieces["tokens"]] == hf_tokenizer("Hello world")["input_ids"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    chat_ids = await (await client.post("/tokenize", json={"messages": msgs})).json()
    want = hf_tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
    assert chat_ids["tokens"] == list(want)
    # the count a chat request reports for the same messages
    r = await (await client.post("/v1/chat/completions",
                                 json={"messages": msgs, "max_tokens": 1})).json()
    assert r["usage"]["prompt_tokens"] == chat_ids["count"]
    vocab = engine.token_texts.vocab_size
    for bad, needle in (({"tokens": [1, vocab]}, "tokens[1]"), ({"tokens": [-1]}, "tokens[0]"),
                        ({"tokens": "12"}, "tokens"), ({"tokens": [1.5]}, "tokens")):
        r = await client.post("/detokenize", json=bad)
        assert r.status == 400 and needle in (await r.json())["error"]["message"]
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}
    r = await client.post("/tokenize", json={"messages": [image]})
    assert r.status == 400 and "only text" in (await r.json())["error"]["message"]
    assert (await client.post("/tokenize", json={"content": 5})).status == 400


async def test_openai_client_logprobs_n_and_completions(served):
    openai = pytest.importorskip("openai")
    client, _ = served
    oc = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0)
    msgs = [{"role": "user", "content": "What colour is the sky?"}]
    resp = await oc.chat.completions.create(model="default", messages=msgs, max_tokens=6, n=2,
                                            logprobs=True, top_logprobs=2, temperature=0.9, seed=5)
    assert [c.index for c in resp.choices] == [0, 1]
    assert sum(len(c.logprobs.content) for c in resp.choices) == resp.usage.completion_tokens
    for c in resp.choices:
        assert all(len(t.top_logprobs) == 2 and math.isfinite(t.logprob) for t in c.logprobs.content)
    seen = {}
    async for chunk in await oc.chat.completions.create(model="default", messages=msgs,
                                                         max_tokens=6, n=2, logprobs=True,
                                                         temperature=0.9, seed=5, stream=True):
        for c in chunk.choices:
            if c.logprobs and c.logprobs.content:
                seen.setdefault(c.index, []).extend(t.token for t in c.logprobs.content)
    assert seen == {i: [t.token for t in c.logprobs.content] for i, c in enumerate(resp.choices)}
    legacy = await oc.completions.create(model="default", prompt="The sky is", max_tokens=5,
                                         logprobs=3)
    assert legacy.object == "text_completion" and len(legacy.choices[0].logprobs.tokens) == 5
    await oc.close()
