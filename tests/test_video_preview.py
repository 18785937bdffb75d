"""GET /v1/uploads/{id}/keyframes: the engine's own frame selection for an uploaded video, as a
thumbnail strip with times, pair timestamps, grid and visual token count. Against the real engine
(the preview equals what a chat request with that upload prepares) and the FakeEngine (caching,
executor thread, errors, auth)."""
from __future__ import annotations

import asyncio
import base64
import io
import threading

import pytest
from aiohttp import FormData
from PIL import Image

from runtime.api import ChatMessage, GenerationRequest, SamplingParams, TextPart, VideoPart
from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.server import create_app, keys
from tests.fake_engine import FakeEngine
from tests.media_fixtures import encode_clip
from tests.waiting import wait_ready

DATA_JPEG = "data:image/jpeg;base64,"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(fmt="mp4", codec="libx264", width=96, height=64, fps=10, frames=60, gop=5)


async def upload(client, data: bytes, name: str = "clip.mp4", ctype: str = "video/mp4",
                 headers: dict | None = None) -> dict:
    form = FormData()
    form.add_field("file", data, filename=name, content_type=ctype)
    r = await client.post("/v1/uploads", data=form, headers=headers or {})
    assert r.status == 200, await r.text()
    return await r.json()


def decode_jpeg(url: str) -> Image.Image:
    assert url.startswith(DATA_JPEG)
    img = Image.open(io.BytesIO(base64.b64decode(url[len(DATA_JPEG):])))
    img.load()
    return img


@pytest.fixture
async def real(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=2048))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    assert engine.block_manager.num_used_blocks == 0


async def test_keyframes_match_what_the_engine_prepares(real, clip):
    client, engine = real
    up = await upload(client, clip)
    r = await client.get(f"/v1/uploads/{up['id']}/keyframes")
    assert r.status == 200, await r.text()
    body = await r.json()
    params = engine.preparer.video_params()

    times = [f["time"] for f in body["frames"]]
    assert len(times) >= 2 and times == sorted(times) and len(set(times)) == len(times)
    # at most `fps` (<= 2) frames per second, and every thumbnail a real JPEG within the size cap
    sel = body["frame_times"]
    assert all(b - a >= 1 / params.fps - 1e-3 for a, b in zip(sel, sel[1:]))
    assert params.fps <= 2 and set(times) <= set(sel)
    for f in body["frames"]:
        img = decode_jpeg(f["thumbnail"])
        assert img.format == "JPEG" and max(img.size) <= params.thumbnail_side
    t, h, w = body["grid_thw"]
    assert body["visual_tokens"] == t * h * w // 4 and len(body["pairs"]) == t
    assert body["mode"] in ("keyframes", "seek") and body["frames_decoded"] >= len(sel)
    # a GOP of 5 at 10 fps is denser than the 0.5 s targets: keyframe-only decoding
    assert body["mode"] == "keyframes"

    # the chat request with this upload prepares exactly the previewed frames
    path = client.server.app[keys.UPLOADS].resolve(up["id"]).path
    req = GenerationRequest((ChatMessage("user", (VideoPart(path=str(path)), TextPart("What moves?"))),),
                            SamplingParams(max_tokens=3))
    video = engine.preparer.video_preview(str(path))       # what prepare() decodes (one cache)
    assert list(video.grid_thw) == body["grid_thw"]
    assert [round(x, 3) for x in video.timestamps] == [p["timestamp"] for p in body["pairs"]]
    assert [round(x, 3) for x in video.frame_times] == sel
    assert video.content_hash == body["content_hash"]
    vid = engine.manifest.special_tokens.video_token_id
    assert int((engine.preparer.prepare(req).token_ids == vid).sum()) == body["visual_tokens"]
    r = await client.post("/v1/chat/completions", json={
        "model": "default", "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": up["url"]}}, {"type": "text", "text": "What moves?"}]}]})
    assert r.status == 200, await r.text()
    # asked again: the same answer (cached per upload)
    assert await (await client.get(f"/v1/uploads/{up['id']}/keyframes")).json() == body


async def test_unknown_ids_are_404_and_text_is_400(real):
    client, _ = real
    for uid in ("A" * 22, "no-such-upload-id-here", "..%2F..%2Fetc"):
        r = await client.get(f"/v1/uploads/{uid}/keyframes")
        assert r.status == 404
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    up = await upload(client, b"hello, I am a text file, not a video\n" * 20, "notes.mp4")
    r = await client.get(f"/v1/uploads/{up['id']}/keyframes")
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_media"


@pytest.fixture
async def fake(aiohttp_client):
    async def make(**sections):
        engine = FakeEngine()
        client = await aiohttp_client(create_app(from_dict(sections), engine))
        await wait_ready(client)
        return client, engine
    return make


async def test_one_decode_per_upload_in_the_executor_and_dropped_with_it(fake, clip, monkeypatch):
    import tests.fake_engine as fake_module
    client, engine = await fake()
    seen_threads = []
    original = fake_module.preprocess_video

    def spy(source, params):
        seen_threads.append(threading.current_thread())
        return original(source, params)
    monkeypatch.setattr(fake_module, "preprocess_video", spy)
    up = await upload(client, clip)
    url = f"/v1/uploads/{up['id']}/keyframes"
    rs = await asyncio.gather(*(client.get(url) for _ in range(3)))
    bodies = [await r.json() for r in rs]
    assert all(r.status == 200 for r in rs) and bodies[0] == bodies[1] == bodies[2]
    assert (await (await client.get(url)).json()) == bodies[0]
    assert len(seen_threads) == 1 and seen_threads[0] is not threading.main_thread()
    assert seen_threads[0].name.startswith("fake-media")          # the engine's worker pool
    # fake engine: default params (2 fps) over a 6 s clip -> 12 frames in 6 pairs of 64x96
    assert bodies[0]["grid_thw"] == [6, 4, 6] and bodies[0]["visual_tokens"] == 36
    assert (await client.delete(f"/v1/uploads/{up['id']}")).status == 200
    r = await client.get(url)
    assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_failures_are_not_cached(fake, clip):
    client, engine = await fake()
    up = await upload(client, b"corrupt" + b"\0" * 100)
    url = f"/v1/uploads/{up['id']}/keyframes"
    assert (await client.get(url)).status == 400
    assert (await client.get(url)).status == 400
    assert len(engine.previews) == 2


async def test_keyframes_need_the_api_key(fake, clip):
    client, _ = await fake(server={"api_key": "sekret"})
    auth = {"Authorization": "Bearer sekret"}
    up = await upload(client, clip, headers=auth)
    url = f"/v1/uploads/{up['id']}/keyframes"
    r = await client.get(url)
    assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    assert (await client.get(url, headers={"Authorization": "Bearer wrong"})).status == 401
    r = await client.get(url, headers=auth)
    assert r.status == 200 and len((await r.json())["frames"]) >= 2
