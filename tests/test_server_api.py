"""The HTTP layer against a scripted FakeEngine: OpenAI chat format (streamed and not), usage,
sampling parameters, media parts, uploads, disconnect handling, metrics, stats and static files."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os

import pytest
from aiohttp import FormData
from PIL import Image
from yarl import URL

from runtime.api import ImagePart, TextPart, VideoPart
from runtime.config import from_dict
from runtime.server import create_app
from tests.fake_engine import SCRIPT, FakeEngine
from tests.waiting import wait_ready, wait_until

METRIC_NAMES = ("appliance_kv_blocks_used", "appliance_kv_blocks_total", "appliance_requests_running",
                "appliance_requests_waiting", "appliance_time_to_first_token_seconds_bucket",
                "appliance_generated_tokens_total", "process_cpu_seconds_total",
                "process_resident_memory_bytes", "appliance_gpu_memory_bytes")


def png_data_url(w: int = 64, h: int = 48, color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def parse_sse(text: str) -> list:
    """SSE events -> their `data:` JSON objects, with the literal '[DONE]' kept as a string (an
    `event: error` block yields its {"error": ...} object like any other)."""
    out = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                payload = line[len("data: "):]
                out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


@pytest.fixture
def make_client(aiohttp_client):
    async def make(engine: FakeEngine | None = None, **sections):
        engine = engine or FakeEngine()
        client = await aiohttp_client(create_app(from_dict(sections), engine))
        await wait_ready(client)
        return client, engine
    return make


def chat(content="Describe the picture.", **kw) -> dict:
    return {"model": "fake-qwen3-vl", "messages": [{"role": "user", "content": content}], **kw}


async def test_non_streamed_answer_and_usage(make_client):
    client, engine = await make_client()
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status == 200
    body = await r.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == engine.model_name
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "".join(SCRIPT), "refusal": None}
    assert choice["finish_reason"] == "stop"
    prompt = engine.prompt_tokens(engine.requests[-1])
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": len(SCRIPT),
                             "total_tokens": prompt + len(SCRIPT),
                             "prompt_tokens_details": {"cached_tokens": 0}}
    # the same first message again: the fake engine reports block-aligned prefix reuse
    long_prompt = " ".join(["word"] * 40)
    await client.post("/v1/chat/completions", json=chat(long_prompt))
    body = await (await client.post("/v1/chat/completions", json=chat(long_prompt))).json()
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert engine.stats().kv_blocks_used == 0


async def test_streamed_equals_non_streamed(make_client):
    client, engine = await make_client()
    for params in ({}, {"max_tokens": 7}, {"stop": ["square"]}):
        plain = await (await client.post("/v1/chat/completions", json=chat(**params))).json()
        r = await client.post("/v1/chat/completions",
                              json=chat(stream=True, stream_options={"include_usage": True}, **params))
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = parse_sse(await r.text())
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len({c["id"] for c in chunks}) == 1
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        usage_chunk, finish_chunk, content_chunks = chunks[-1], chunks[-2], chunks[1:-2]
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == plain["usage"]
        assert finish_chunk["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
        assert all(c["usage"] is None for c in chunks[:-1])
        text = "".join(c["choices"][0]["delta"]["content"] for c in content_chunks)
        assert text == plain["choices"][0]["message"]["content"]
        assert len(content_chunks) == plain["usage"]["completion_tokens"]
    # without include_usage there is no usage key and no usage chunk
    events = parse_sse(await (await client.post("/v1/chat/completions", json=chat(stream=True))).text())
    assert all("usage" not in c for c in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_sampling_parameters_reach_the_engine(make_client):
    client, engine = await make_client()
    r = await client.post("/v1/chat/completions", json=chat(
        max_tokens=100, max_completion_tokens=4, temperature=0.7, top_p=0.9, top_k=20, seed=1234,
        stop="zzz", n=1))
    body = await r.json()
    s = engine.requests[-1].sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, s.stop) == (4, 0.7, 0.9, 20, 1234, ("zzz",))
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4
    body = await (await client.post("/v1/chat/completions", json=chat(stop=[" red", "zzz"]))).json()
    assert body["choices"][0]["message"]["content"] == "I see a"
    assert body["choices"][0]["finish_reason"] == "stop"
    s = engine.requests[-1].sampling
    assert s.stop == (" red", "zzz") and s.temperature == 0.0 and s.max_tokens == 1024


async def test_multi_turn_and_image_parts(make_client):
    client, engine = await make_client()
    url = png_data_url()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]},
            {"role": "assistant", "content": "A square."},
            {"role": "user", "content": [{"type": "text", "text": "Colour?"}]}]
    r = await client.post("/v1/chat/completions", json={"messages": msgs})
    assert r.status == 200, await r.text()
    req = engine.requests[-1]
    assert [m.role for m in req.messages] == ["system", "user", "assistant", "user"]
    parts = req.messages[1].parts
    assert parts[0] == TextPart("What is this?")
    assert isinstance(parts[1], ImagePart)
    assert parts[1].data == base64.b64decode(url.split(",", 1)[1])


async def test_upload_then_reference_as_video_and_image(make_client, tmp_path):
    client, engine = await make_client()
    payload = os.urandom(300_000)
    form = FormData()
    form.add_field("file", payload, filename="clip.mp4", content_type="video/mp4")
    r = await client.post("/v1/uploads", data=form)
    assert r.status == 200, await r.text()
    up = await r.json()
    assert up["bytes"] == len(payload) and up["url"] == f"upload://{up['id']}"
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": up["url"]}}, {"type": "text", "text": "What happens?"}]}]})
    assert r.status == 200, await r.text()
    video = engine.requests[-1].messages[0].parts[0]
    assert isinstance(video, VideoPart) and video.data is None
    with open(video.path, "rb") as f:
        assert f.read() == payload
    # an uploaded image is read back into an ImagePart
    png = base64.b64decode(png_data_url().split(",", 1)[1])
    form = FormData()
    form.add_field("file", png, filename="a.png", content_type="image/png")
    img = await (await client.post("/v1/uploads", data=form)).json()
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img["url"]}}]}]})
    assert r.status == 200
    assert engine.requests[-1].messages[0].parts[0] == ImagePart(png)
    # delete, then the reference is refused
    assert (await client.delete(f"/v1/uploads/{img['id']}")).status == 200
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": img["url"]}}]}]})
    assert r.status == 400 and "upload" in (await r.json())["error"]["message"]


async def test_upload_over_cap_is_refused_and_not_kept(make_client):
    client, _ = await make_client(limits={"max_upload_bytes": 100_000})
    store_dir = client.app[__import__("runtime.server.keys", fromlist=["UPLOADS"]).UPLOADS].dir

    async def body():                      # chunked: no Content-Length, so the streaming cap decides
        yield b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.mp4\"\r\n"
        yield b"Content-Type: video/mp4\r\n\r\n"
        for _ in range(30):
            yield os.urandom(10_000)
        yield b"\r\n--XyZ--\r\n"
    r = await client.post("/v1/uploads", data=body(),
                          headers={"Content-Type": "multipart/form-data; boundary=XyZ"})
    assert r.status == 413
    assert (await r.json())["error"]["code"] == "payload_too_large"
    assert list(store_dir.iterdir()) == []


async def test_client_disconnect_cancels_the_engine_request(make_client):
    engine = FakeEngine(script=tuple(f" t{i}" for i in range(400)), token_delay=0.02)
    client, _ = await make_client(engine)
    r = await client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=400))
    assert r.status == 200
    seen = b""
    while b" t3" not in seen:
        seen += await r.content.readany()
    assert engine.stats().kv_blocks_used > 0
    r.close()                                          # the client goes away mid-stream
    await wait_until(lambda: engine.cancelled)
    assert len(engine.cancelled) == 1 and engine.finished == []
    assert engine.stats().kv_blocks_used == 0 and engine.stats().requests_running == 0
    metrics = await (await client.get("/metrics")).text()
    assert 'appliance_requests_total{outcome="cancelled"} 1.0' in metrics
    assert "appliance_kv_blocks_used 0.0" in metrics


async def test_metrics_stats_models_health(make_client):
    client, engine = await make_client()
    await client.post("/v1/chat/completions", json=chat(max_tokens=5))
    r = await client.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    for name in METRIC_NAMES:
        assert name in text, name
    assert "appliance_generated_tokens_total 5.0" in text
    assert "appliance_time_to_first_token_seconds_count 1.0" in text
    stats = await (await client.get("/v1/stats")).json()
    assert stats["kv_blocks_total"] == 64 and stats["kv_blocks_used"] == 0
    assert stats["generated_tokens_total"] == 5 and stats["gpu_memory_bytes"] == 123_456_789
    assert stats["rss_bytes"] > 0 and stats["cpu_percent"] >= 0
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == engine.model_name
    assert models["data"][0]["appliance"]["max_side"] == 1024
    assert (await client.get(f"/v1/models/{engine.model_name}")).status == 200
    assert (await (await client.get("/health")).json()) == {"status": "ok"}
    assert (await client.get("/ready")).status == 200


async def test_two_apps_have_separate_registries(make_client):
    a, _ = await make_client()
    b, _ = await make_client()
    await a.post("/v1/chat/completions", json=chat(max_tokens=3))
    assert "appliance_time_to_first_token_seconds_count 1.0" in await (await a.get("/metrics")).text()
    assert "appliance_time_to_first_token_seconds_count 0.0" in await (await b.get("/metrics")).text()


async def test_static_page_and_no_path_traversal(make_client):
    client, _ = await make_client()
    r = await client.get("/")
    assert r.status == 200 and "<html" in (await r.text()).lower()
    for asset in ("app.js", "style.css", "vendor/marked.min.js", "vendor/purify.min.js"):
        assert (await client.get(f"/static/{asset}")).status == 200, asset
    for raw in ("/static/../runtime/config.py", "/static/%2e%2e/runtime/config.py",
                "/static/..%2fruntime%2fconfig.py", "/static/vendor/../../runtime/config.py"):
        r = await client.get(URL(raw, encoded=True))
        assert r.status in (403, 404), raw
        body = await r.text()
        assert "ConfigError" not in body and json.loads(body)["error"]["code"] in ("not_found", "forbidden")


async def test_shutdown_stops_engine_and_deletes_uploads(aiohttp_client):
    engine = FakeEngine()
    client = await aiohttp_client(create_app(from_dict({}), engine))
    from runtime.server import keys
    store = client.app[keys.UPLOADS]
    form = FormData()
    form.add_field("file", b"some video bytes", filename="v.mp4")
    assert (await client.post("/v1/uploads", data=form)).status == 200
    upload_dir = store.dir
    assert len(list(upload_dir.iterdir())) == 1
    await client.close()
    assert engine.stopped
    assert not upload_dir.exists()


async def test_shutdown_cancels_running_streams(aiohttp_server):
    import aiohttp
    engine = FakeEngine(script=tuple(f" t{i}" for i in range(1000)), token_delay=0.02)
    server = await aiohttp_server(create_app(from_dict({"server": {"shutdown_grace_seconds": 0.2}}), engine))
    await wait_until(lambda: engine.ready)
    async with aiohttp.ClientSession() as session:
        r = await session.post(server.make_url("/v1/chat/completions"), json=chat(stream=True, max_tokens=1000))
        assert r.status == 200
        await r.content.readany()
        closing = asyncio.create_task(server.close())
        events = parse_sse(await r.text())
        await closing
    assert events[-1]["error"]["code"] == "not_ready" and "[DONE]" not in events
    assert "shutting down" in events[-1]["error"]["message"]
    assert engine.cancelled and engine.stats().kv_blocks_used == 0 and engine.stopped


async def test_uploads_expire(make_client):
    import time
    from aiohttp import FormData as Form

    from runtime.server import keys
    client, _ = await make_client(limits={"upload_ttl_seconds": 60})
    form = Form()
    form.add_field("file", b"video bytes", filename="v.mp4")
    up = await (await client.post("/v1/uploads", data=form)).json()
    store = client.app[keys.UPLOADS]
    assert store.expire(now=time.time() + 30) == 0
    assert store.expire(now=time.time() + 61) == 1
    assert list(store.dir.iterdir()) == []
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": up["url"]}}]}]})
    assert r.status == 400 and "expired" in (await r.json())["error"]["message"]


async def test_remote_urls_fetched_when_allowed(make_client, aiohttp_server):
    from aiohttp import web
    png = base64.b64decode(png_data_url(30, 20).split(",", 1)[1])
    media = web.Application()
    media.router.add_get("/a.png", lambda r: web.Response(body=png, content_type="image/png"))
    media.router.add_get("/big.mp4", lambda r: web.Response(body=b"v" * 5000))
    origin = await aiohttp_server(media)
    client, engine = await make_client(media={"allow_remote_urls": True}, limits={"max_upload_bytes": 4000})
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": str(origin.make_url("/a.png"))}}]}]})
    assert r.status == 200, await r.text()
    assert engine.requests[-1].messages[0].parts[0] == ImagePart(png)
    for path, status, code in (("/missing.png", 400, "invalid_media"), ("/big.mp4", 413, "payload_too_large")):
        kind = "video_url" if path.endswith("mp4") else "image_url"
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": kind, kind: {"url": str(origin.make_url(path))}}]}]})
        assert r.status == status and (await r.json())["error"]["code"] == code
