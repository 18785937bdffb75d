"""The HTTP API against the real compiled engine (the default model): streamed = non-streamed,
images, usage, bad media and over-long prompts as clear 4xx, a client leaving mid-stream frees
its KV blocks at once, and the server keeps serving through all of it."""
from __future__ import annotations

import asyncio
import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.server import create_app
from tests.test_server_api import parse_sse, png_data_url
from tests.waiting import wait_ready


@pytest.fixture
async def served(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=512))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_integrity()


def chat(content, **kw):
    return {"model": "default", "messages": [{"role": "user", "content": content}], "max_tokens": 10, **kw}


def image_part(url):
    return {"type": "image_url", "image_url": {"url": url}}


async def test_streamed_equals_non_streamed_with_an_image(served):
    client, engine = served
    body = chat([image_part(png_data_url(120, 80)), {"type": "text", "text": "What is this?"}])
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200
    full = await r.json()
    r = await client.post("/v1/chat/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}})
    events = parse_sse(await r.text())
    assert events[-1] == "[DONE]"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert streamed == full["choices"][0]["message"]["content"]
    usage = events[-2]["usage"]
    assert usage == full["usage"] or usage["completion_tokens"] == full["usage"]["completion_tokens"]
    assert full["usage"]["completion_tokens"] <= 10 and full["usage"]["prompt_tokens"] > 10


def _bomb_png(side=30000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) \
        + chunk(b"IEND", b"")


def _truncated_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()[:60]


@pytest.mark.parametrize("payload", [b"", b"not an image at all", _truncated_png(), _bomb_png(),
                                     b"%!PS-Adobe-3.0 EPSF-3.0\n"],
                         ids=["zero-byte", "garbage", "truncated", "bomb", "eps"])
async def test_bad_images_are_clear_400s(served, payload):
    client, _ = served
    url = "data:image/png;base64," + base64.b64encode(payload).decode()
    r = await client.post("/v1/chat/completions", json=chat([image_part(url), {"type": "text", "text": "hi"}]))
    assert r.status in (400, 413)
    err = (await r.json())["error"]
    assert err["message"] and "Traceback" not in err["message"]
    r = await client.post("/v1/chat/completions", json=chat("still there?"))
    assert r.status == 200


async def test_prompt_longer_than_the_context_is_400(served):
    client, _ = served
    r = await client.post("/v1/chat/completions", json=chat("apple " * 2000))
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "context_length_exceeded"


async def test_unknown_models_are_refused_by_the_real_server(served):
    """What peers refuse is refused here too: an unknown model is 404 model_not_found."""
    client, engine = served
    r = await client.post("/v1/chat/completions", json=chat("hi", model="gpt-4o"))
    assert r.status == 404 and (await r.json())["error"]["code"] == "model_not_found"
    r = await client.post("/v1/chat/completions", json=chat("hi", model=engine.model_name))
    assert r.status == 200 and (await r.json())["choices"][0]["message"]["content"]


async def test_disconnect_mid_stream_frees_blocks_at_once(served):
    client, engine = served
    body = chat("Tell me a long story.", stream=True, max_tokens=400, ignore_eos=True)
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200
    await r.content.readline()                 # the first event arrived: generation is running
    assert engine.block_manager.num_used_blocks > 0
    r.close()                                  # the client leaves
    for _ in range(200):
        if engine.block_manager.num_used_blocks == 0 and engine.stats().requests_running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.block_manager.num_used_blocks == 0
    metrics = await (await client.get("/metrics")).text()
    assert "appliance_kv_blocks_used 0.0" in metrics
    r = await client.post("/v1/chat/completions", json=chat("next one"))
    assert r.status == 200


async def test_openai_client_against_the_real_engine(served):
    openai = pytest.importorskip("openai")
    client, _ = served
    base = str(client.make_url("/v1"))
    oc = openai.AsyncOpenAI(base_url=base, api_key="unused")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                         {"type": "image_url", "image_url": {"url": png_data_url()}}]}]
    full = await oc.chat.completions.create(model="default", messages=msgs, max_tokens=8)
    text = ""
    async for chunk in await oc.chat.completions.create(model="default", messages=msgs, max_tokens=8,
                                                         stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == full.choices[0].message.content
    await oc.close()
