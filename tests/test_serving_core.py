"""Errors reported as errors, every token once, bad input as 400s, readiness while loading, through
the REAL engine (the default model): a failing ONNX Runtime session injected under the runner."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import pytest
from tokenizers import Tokenizer

import runtime.engine as engine_module
from runtime.config import from_dict
from runtime.engine import AsyncEngine
from runtime.engine_config import EngineConfig
from runtime.server import create_app
from tests.oracle_helpers import request, user
from tests.test_server_api import parse_sse
from tests.waiting import wait_ready, wait_until


class FailingSession:
    """An ONNX Runtime session whose every run raises after `ok_runs` good ones."""

    def __init__(self, real, ok_runs: int):
        self.real, self.ok_runs, self.runs = real, ok_runs, 0

    def __getattr__(self, name):
        attr = getattr(self.real, name)
        if not name.startswith("run"):
            return attr

        def run(*args, **kwargs):
            self.runs += 1
            if self.runs > self.ok_runs:
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : injected failure")
            return attr(*args, **kwargs)
        return run


@pytest.fixture
async def served(aiohttp_client, default_engine_dir):
    engine = AsyncEngine.load(default_engine_dir, EngineConfig(max_context=512))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    assert await wait_until(lambda: engine.core.block_manager.num_used_blocks == 0)
    engine.core.scheduler.check_integrity()


def chat(content, **kw):
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 12,
            **kw}


def inject(engine, real, ok_runs: int) -> FailingSession:
    failing = FailingSession(real, ok_runs)
    engine.core.runner.session = failing
    return failing


async def server_errors(client) -> float:
    text = await (await client.get("/metrics")).text()
    for line in text.splitlines():
        if line.startswith('appliance_requests_total{outcome="server_error"}'):
            return float(line.split()[-1])
    return 0.0


async def test_a_failed_decoder_step_is_an_error_not_a_success(served):
    client, engine = served
    real = engine.core.runner.session
    # before the first token: HTTP 500 in OpenAI's shape, no traceback, no secret detail
    inject(engine, real, 0)
    r = await client.post("/v1/chat/completions", json=chat("Hello"))
    assert r.status == 500
    err = (await r.json())["error"]
    assert err["code"] == "engine_error" and err["type"] == "server_error"
    assert "ONNXRuntimeError" not in err["message"] and "Traceback" not in err["message"]
    # mid-stream (prefill and a few decode steps succeed): an SSE error event, and no [DONE]
    inject(engine, real, 3)
    r = await client.post("/v1/chat/completions",
                          json=chat("Tell me more", stream=True, max_tokens=40, ignore_eos=True))
    assert r.status == 200
    text = await r.text()
    events = parse_sse(text)
    assert "event: error\n" in text and "[DONE]" not in events
    assert events[-1]["error"]["code"] == "engine_error"
    assert not any(e.get("choices") and e["choices"][0].get("finish_reason") for e in events[:-1])
    assert await server_errors(client) == 2.0                 # the counter matches the 500s sent
    # the engine keeps serving once the session works again
    engine.core.runner.session = real
    r = await client.post("/v1/chat/completions", json=chat("Hello again"))
    assert r.status == 200 and (await r.json())["choices"][0]["finish_reason"] in ("stop", "length")


async def test_every_generated_token_is_delivered_exactly_once(served, default_engine_dir):
    _, engine = served
    tok = Tokenizer.from_file(str(default_engine_dir / "tokenizer.json"))
    # ignore_eos runs past the end marker: special tokens (skipped in text) are generated too
    deltas = [d async for d in engine.generate(request([user("Hello")], 40, ignore_eos=True))]
    ids = [t for d in deltas for t in d.token_ids]
    assert len(ids) == deltas[-1].usage.completion_tokens == 40
    assert "".join(d.text for d in deltas) == tok.decode(ids, skip_special_tokens=True)
    assert any(not d.text for d in deltas[:-1]), "some token yields no text of its own"
    # a stop string: the tokens delivered (up to the one that completed it) are the ones counted
    text = "".join(d.text for d in deltas)
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = [d async for d in engine.generate(request([user("Hello")], 40, ignore_eos=True,
                                                    stop=(stop,)))]
    cut_ids = [t for d in cut for t in d.token_ids]
    assert cut[-1].finish_reason == "stop" and len(cut_ids) == cut[-1].usage.completion_tokens
    assert cut_ids == ids[:len(cut_ids)] and stop not in "".join(d.text for d in cut)


async def test_deep_json_and_lone_surrogates_are_400s(served):
    client, _ = served
    deep = '{"model": "default", "messages": ' + "[" * 1000 + "]" * 1000 + "}"
    r = await client.post("/v1/chat/completions", data=deep,
                          headers={"Content-Type": "application/json"})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"
    deeper = "[" * 200_000 + "]" * 200_000
    r = await client.post("/v1/chat/completions", data=deeper,
                          headers={"Content-Type": "application/json"})
    assert r.status == 400
    body = '{"model": "default", "max_tokens": 4, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    assert json.loads(body)["messages"][0]["content"] == "a\ud800b"
    r = await client.post("/v1/chat/completions", data=body,
                          headers={"Content-Type": "application/json"})
    assert r.status == 400
    err = (await r.json())["error"]
    assert "messages[0].content[0]" in err["message"] and "Unicode" in err["message"]
    r = await client.post("/v1/chat/completions", json=chat("still fine"))
    assert r.status == 200


async def test_ready_is_503_while_the_engine_loads(aiohttp_client, default_engine_dir, monkeypatch):
    """The server listens at once; the engine loads in the background (gated here)."""
    gate = threading.Event()
    real_load = engine_module.EngineCore.load

    def gated_load(*args, **kwargs):
        gate.wait(60)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(engine_module.EngineCore, "load", gated_load)
    engine = AsyncEngine(default_engine_dir, EngineConfig(max_context=512))   # not loaded yet
    assert engine.max_context is None and not engine.ready
    client = await aiohttp_client(create_app(from_dict({}), engine))
    assert (await client.get("/health")).status == 200
    r = await client.get("/ready")
    assert r.status == 503 and (await r.json())["error"]["code"] == "not_ready"
    r = await client.post("/v1/chat/completions", json=chat("Hello"))
    assert r.status == 503
    gate.set()
    await wait_ready(client, timeout=120)
    assert engine.max_context == 512
    r = await client.post("/v1/chat/completions", json=chat("Hello"))
    assert r.status == 200


async def test_cancel_by_id_ends_the_stream_and_frees_blocks(served):
    _, engine = served
    req = dataclasses.replace(request([user("count")], 200, ignore_eos=True), request_id="req-42")
    agen = engine.generate(req)
    first = await agen.__anext__()
    assert first.finish_reason is None
    assert await engine.cancel("req-42")
    rest = [d async for d in agen]
    assert rest[-1].finish_reason == "cancelled"
    assert await wait_until(lambda: engine.core.block_manager.num_used_blocks == 0)
    assert not await engine.cancel("no-such-request")


async def test_stats_never_wait_for_a_step(served):
    """stats() reads the snapshot the loop thread publishes: it answers while a step holds the
    core (a session run blocked here)."""
    client, engine = served
    blocked, release = threading.Event(), threading.Event()
    real = engine.core.runner.session

    class Blocking:
        def __getattr__(self, name):
            attr = getattr(real, name)
            if not name.startswith("run"):
                return attr

            def run(*a, **k):
                blocked.set()
                release.wait(30)
                return attr(*a, **k)
            return run
    engine.core.runner.session = Blocking()
    task = asyncio.create_task(client.post("/v1/chat/completions", json=chat("Hi", max_tokens=2)))
    assert await wait_until(blocked.is_set)
    r = await asyncio.wait_for(client.get("/v1/stats"), 10)
    assert r.status == 200 and (await r.json())["kv_blocks_used"] >= 0
    r = await asyncio.wait_for(client.get("/metrics"), 10)
    assert r.status == 200
    release.set()
    engine.core.runner.session = real
    assert (await task).status == 200


async def test_sigterm_on_the_cli_server_drains_streams(default_engine_dir):
    """`python -m runtime serve`: it listens before the engine is up, and on SIGTERM /ready turns
    503 while running streams finish (with [DONE]); then it exits cleanly."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    import aiohttp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--engine", str(default_engine_dir),
                             "--port", str(port), "--max-context-length", "512",
                             "--shutdown-grace-seconds", "60"],
                            cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            async def ready_status():
                try:
                    async with s.get(base + "/ready") as r:
                        return r.status
                except aiohttp.ClientConnectionError:
                    return None
            assert await wait_until(lambda: _is(ready_status(), 200), timeout=120)
            body = chat("Tell me a long story", stream=True, max_tokens=400, ignore_eos=True)
            streams = [await s.post(base + "/v1/chat/completions", json=body) for _ in range(4)]
            for r in streams:
                assert r.status == 200
                await r.content.readline()
            proc.send_signal(signal.SIGTERM)
            assert await wait_until(lambda: _is(ready_status(), 503), timeout=10)
            for r in streams:
                assert parse_sse(await r.text())[-1] == "[DONE]"
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "Traceback" not in out and "ERROR" not in out
    finally:
        if proc.poll() is None:
            proc.kill()


async def _is(status_coro, want: int) -> bool:
    return (await status_coro) == want
