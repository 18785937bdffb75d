"""Server mechanics of logprobs, n, /v1/completions and /tokenize with the fake engine: wire
shapes, and the token-counting routes outside /v1 pass the same key, Origin and Content-Type checks."""
from __future__ import annotations

import pytest

from tests.fake_engine import SCRIPT, FakeEngine
from tests.test_server_api import chat, make_client, parse_sse  # noqa: F401  (fixture)


async def test_chat_logprobs_wire_shape(make_client):
    client, _ = await make_client()
    body = chat(logprobs=True, top_logprobs=2, max_tokens=5)
    full = await (await client.post("/v1/chat/completions", json=body)).json()
    content = full["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == list(SCRIPT[:5])
    assert content[1] == {"token": " see", "logprob": -0.25, "bytes": list(b" see"),
                          "top_logprobs": [{"token": " see", "logprob": -0.25, "bytes": list(b" see")},
                                           {"token": "alt0", "logprob": -1.25, "bytes": list(b"alt0")}]}
    assert full["choices"][0]["logprobs"]["refusal"] is None
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [e for e in parse_sse(await r.text())[:-1] if e["choices"]]
    streamed = [x for e in events if e["choices"][0]["logprobs"]
                for x in e["choices"][0]["logprobs"]["content"]]
    assert streamed == content


async def test_n_choices_from_the_fake(make_client):
    client, engine = await make_client()
    full = await (await client.post("/v1/chat/completions", json=chat(n=3, max_tokens=4))).json()
    assert [c["index"] for c in full["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in full["choices"]} == {"".join(SCRIPT[:4])}
    assert full["usage"]["completion_tokens"] == 12
    assert engine.requests[-1].sampling.n == 3


async def test_legacy_completions_shape(make_client):
    client, engine = await make_client()
    r = await client.post("/v1/completions", json={"model": "fake-qwen3-vl", "prompt": "Say hi",
                                                  "logprobs": 1})
    full = await r.json()
    assert r.status == 200 and full["object"] == "text_completion"
    req = engine.requests[-1]
    assert req.prompt == "Say hi" and req.messages == () and req.sampling.max_tokens == 16
    assert req.sampling.logprobs and req.sampling.top_logprobs == 1
    c = full["choices"][0]
    assert c["text"] == "".join(SCRIPT[:16]) and c["finish_reason"] == "length"
    assert c["logprobs"]["tokens"] == list(SCRIPT[:16])
    assert c["logprobs"]["text_offset"][:3] == [0, 1, 5]
    assert c["logprobs"]["top_logprobs"][1] == {" see": -0.25}
    r = await client.post("/v1/completions", json={"prompt": "Say hi", "stream": True, "max_tokens": 3})
    events = parse_sse(await r.text())
    assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) \
        == "".join(SCRIPT[:3])
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


async def test_tokenize_routes_through_the_fake(make_client):
    client, _ = await make_client()
    r = await (await client.post("/tokenize", json={"content": "hé"})).json()
    assert r["tokens"] == list("hé".encode()) and r["count"] == 3 and r["max_model_len"] == 4096
    r = await (await client.post("/detokenize", json={"tokens": list("hé".encode())})).json()
    assert r == {"content": "hé", "prompt": "hé"}
    r = await client.post("/detokenize", json={"tokens": [300]})
    assert r.status == 400 and "tokens[0]" in (await r.json())["error"]["message"]


@pytest.mark.parametrize("path,body", [("/tokenize", {"content": "hi"}), ("/detokenize", {"tokens": [104]})])
async def test_token_routes_pass_the_api_checks(make_client, path, body):
    client, _ = await make_client(server={"api_key": "k-1"})
    r = await client.post(path, json=body)
    assert r.status == 401
    auth = {"Authorization": "Bearer k-1"}
    assert (await client.post(path, json=body, headers=auth)).status == 200
    r = await client.post(path, data='{"content": "hi"}', headers={**auth, "Content-Type": "text/plain"})
    assert r.status == 415
    r = await client.post(path, json=body, headers={**auth, "Origin": "https://evil.example"})
    assert r.status == 403
    r = await client.post(path, json=body, headers=auth)
    assert "Content-Security-Policy" not in r.headers
