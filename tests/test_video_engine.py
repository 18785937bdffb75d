"""A video request end to end: through the engine (prompt layout with timestamps, visual tokens),
and through the HTTP API by data URL and by upload reference; bad videos are clear 400s."""
from __future__ import annotations

import base64

import pytest

from runtime.api import ChatMessage, GenerationRequest, SamplingParams, TextPart, VideoPart
from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.server import create_app
from tests.media_fixtures import encode_clip, wav_bytes
from tests.waiting import wait_ready


@pytest.fixture(scope="module")
def clip() -> bytes:
    return encode_clip(fmt="mp4", codec="libx264", width=96, height=64, fps=10, frames=40, gop=5)


@pytest.fixture
async def engine(default_engine_dir):
    eng = Engine.load(default_engine_dir, EngineConfig(max_context=2048))
    await eng.start()
    yield eng
    await eng.stop()
    assert eng.block_manager.num_used_blocks == 0


async def test_video_request_through_the_engine(engine, clip):
    req = GenerationRequest((ChatMessage("user", (VideoPart(clip), TextPart("What changes?"))),),
                            SamplingParams(max_tokens=6))
    prompt = engine.preparer.prepare(req)
    video = engine.preparer.video_preview(clip)                # the decode prepare() used (cached)
    t, h, w = video.grid_thw
    assert t >= 2 and len(video.timestamps) == t
    # Qwen3-VL layout: per frame pair "<x.y seconds>" + vision_start + h*w/4 pads + vision_end
    text = engine.tokenizer.decode(prompt.token_ids.tolist(), skip_special_tokens=False)
    for ts in video.timestamps:
        assert f"<{ts:.1f} seconds>" in text
    vid = engine.manifest.special_tokens.video_token_id
    assert int((prompt.token_ids == vid).sum()) == t * h * w // 4 == prompt.inputs.visual.embeds.shape[0]
    deltas = [d async for d in engine.generate(req)]
    assert deltas[-1].finish_reason in ("stop", "length") and deltas[-1].usage.prompt_tokens == len(prompt.token_ids)


async def test_a_video_is_decoded_once_for_its_preview_and_every_turn(engine, clip, monkeypatch, tmp_path):
    """The keyframe preview of an upload, the chat request that follows it and a later turn that
    resends the same video share one decode (by content hash); another video decodes anew."""
    import runtime.preparation as prep
    calls = []
    real = prep.extract_frames
    monkeypatch.setattr(prep, "extract_frames", lambda src, params: calls.append(src) or real(src, params))
    path = tmp_path / "clip.mp4"
    path.write_bytes(clip)
    preview = engine.preparer.video_preview(str(path))

    def ask(part, question):
        return GenerationRequest((ChatMessage("user", (part, TextPart(question))),),
                                 SamplingParams(max_tokens=4))
    first = engine.preparer.prepare(ask(VideoPart(path=str(path)), "What changes?"))
    again = engine.preparer.prepare(ask(VideoPart(clip), "And then?"))     # same bytes, sent inline
    assert len(calls) == 1
    assert first.media_spans[0].content_hash == again.media_spans[0].content_hash == preview.content_hash
    assert not preview.pixel_values.flags.writeable            # shared: nobody may write into it
    other = encode_clip(fmt="mp4", codec="libx264", width=96, height=64, fps=10, frames=20, gop=5)
    assert (engine.preparer.prepare(ask(VideoPart(other), "What changes?")).media_spans[0].content_hash
            != preview.content_hash)
    assert len(calls) == 2
    assert [d async for d in engine.generate(ask(VideoPart(clip), "What changes?"))][-1].finish_reason


@pytest.fixture
async def client(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=2048))
    c = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(c)
    yield c
    assert engine.block_manager.num_used_blocks == 0


def body(url):
    return {"model": "default", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": url}}, {"type": "text", "text": "What happens?"}]}]}


async def test_video_by_data_url_and_by_upload(client, clip):
    r = await client.post("/v1/chat/completions", json=body("data:video/mp4;base64," + base64.b64encode(clip).decode()))
    assert r.status == 200, await r.text()
    by_data = await r.json()
    form = __import__("aiohttp").FormData()
    form.add_field("file", clip, filename="clip.mp4", content_type="video/mp4")
    up = await (await client.post("/v1/uploads", data=form)).json()
    r = await client.post("/v1/chat/completions", json=body(f"upload://{up['id']}"))
    assert r.status == 200, await r.text()
    by_upload = await r.json()
    assert by_upload["choices"][0]["message"]["content"] == by_data["choices"][0]["message"]["content"]
    assert by_upload["usage"]["prompt_tokens"] == by_data["usage"]["prompt_tokens"]


@pytest.mark.parametrize("payload", [b"", b"hello, I am text", wav_bytes()], ids=["zero", "text", "audio-only"])
async def test_bad_videos_are_400(client, clip, payload):
    r = await client.post("/v1/chat/completions", json=body("data:video/mp4;base64," + base64.b64encode(payload).decode()))
    assert r.status == 400
    assert (await r.json())["error"]["code"] == "invalid_media"
    truncated = clip[: len(clip) // 2]
    r = await client.post("/v1/chat/completions", json=body("data:video/mp4;base64," + base64.b64encode(truncated).decode()))
    assert r.status == 400
