"""The official `openai` client against the app on a real TCP port (aiohttp test server, FakeEngine):
non-streamed and streamed chat with an image data URL, usage, and typed client errors; and against
the real default engine: `parse` with a pydantic response_format, and tool calls (plain, parsed,
streamed)."""
from __future__ import annotations

import asyncio
from typing import Literal

import openai
import pydantic
import pytest

from runtime.api import ImagePart
from runtime.config import from_dict
from runtime.server import create_app
from tests.fake_engine import SCRIPT, FakeEngine
from tests.test_server_api import png_data_url

KEY = "test-key-123"


@pytest.fixture
async def served(aiohttp_server):
    engine = FakeEngine(token_delay=0.001)
    server = await aiohttp_server(create_app(from_dict({"server": {"api_key": KEY}}), engine))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=KEY, max_retries=0, timeout=20)
    for _ in range(100):
        if engine.ready:
            break
        await asyncio.sleep(0.01)
    yield client, engine
    await client.close()


def messages(url: str) -> list:
    return [{"role": "system", "content": "You describe images."},
            {"role": "user", "content": [{"type": "text", "text": "What is in this image?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


async def test_models_and_non_streamed_chat_with_image(served):
    client, engine = served
    models = await client.models.list()
    assert [m.id for m in models.data] == [engine.model_name]
    url = png_data_url(120, 80)
    resp = await client.chat.completions.create(model=engine.model_name, messages=messages(url),
                                                max_tokens=10, temperature=0)
    assert resp.object == "chat.completion" and resp.model == engine.model_name
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "".join(SCRIPT[:10])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 10
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 10
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    image = engine.requests[-1].messages[1].parts[1]
    assert isinstance(image, ImagePart) and image.data[:8] == b"\x89PNG\r\n\x1a\n"


async def test_streamed_chat_matches_non_streamed(served):
    client, engine = served
    url = png_data_url(64, 64, (10, 200, 10))
    plain = await client.chat.completions.create(model=engine.model_name, messages=messages(url),
                                                 stop=["white"])
    stream = await client.chat.completions.create(model=engine.model_name, messages=messages(url),
                                                  stop=["white"], stream=True,
                                                  stream_options={"include_usage": True})
    pieces, finish, usage, roles = [], None, None, []
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.append(choice.delta.role)
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert roles == ["assistant"]
    assert "".join(pieces) == plain.choices[0].message.content == "I see a red square on a "
    assert finish == plain.choices[0].finish_reason == "stop"
    assert usage.completion_tokens == plain.usage.completion_tokens == len(pieces)
    assert usage.prompt_tokens == plain.usage.prompt_tokens
    # the second identical conversation reuses the cached prefix (as the engine reports it)
    assert usage.prompt_tokens_details.cached_tokens > 0
    assert engine.stats().kv_blocks_used == 0


async def test_client_sees_typed_errors(served):
    client, engine = served
    with pytest.raises(openai.BadRequestError) as e:
        await client.chat.completions.create(model=engine.model_name, n=9,
                                             messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "n must be" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="remote_urls_disabled|allow_remote_urls"):
        await client.chat.completions.create(model=engine.model_name,
                                             messages=messages("https://example.com/a.png"))
    bad = openai.AsyncOpenAI(base_url=str(client.base_url), api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model=engine.model_name, messages=[{"role": "user", "content": "hi"}])
    await bad.close()


# --- structured output and tools, against the REAL default engine ---------------------------

class ShapeAnswer(pydantic.BaseModel):
    shape: Literal["circle", "square", "triangle", "star", "diamond", "cross"]
    colour: Literal["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


class ZoomIn(pydantic.BaseModel):
    """Zoom into one quadrant of the picture."""
    quadrant: Literal["top left", "top right", "bottom left", "bottom right"]


@pytest.fixture
async def real(aiohttp_server, default_engine_dir):
    from runtime.engine import Engine
    from runtime.engine_config import EngineConfig
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=1024))
    server = await aiohttp_server(create_app(from_dict({"server": {"api_key": KEY}}), engine))
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key=KEY, max_retries=0,
                                timeout=60)
    for _ in range(500):
        if engine.ready:
            break
        await asyncio.sleep(0.01)
    yield client, engine
    await client.close()
    assert engine.block_manager.num_used_blocks == 0


def picture(url: str) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What shape is this, what colour?"}]}]


async def test_parse_with_a_pydantic_model_gives_the_model_back(real):
    client, engine = real
    resp = await client.chat.completions.parse(model=engine.model_name, messages=picture(png_data_url()),
                                               response_format=ShapeAnswer, max_tokens=60)
    msg = resp.choices[0].message
    assert isinstance(msg.parsed, ShapeAnswer), msg.content
    assert resp.choices[0].finish_reason == "stop"
    assert ShapeAnswer.model_validate_json(msg.content) == msg.parsed


async def test_tools_with_the_client_plain_parsed_and_streamed(real):
    client, engine = real
    tool = openai.pydantic_function_tool(ZoomIn)                       # strict, with a schema
    kw = dict(model=engine.model_name, messages=picture(png_data_url()), tools=[tool],
              tool_choice="required", max_tokens=150, parallel_tool_calls=False)
    resp = await client.chat.completions.create(**kw)
    assert resp.choices[0].finish_reason == "tool_calls"
    [call] = resp.choices[0].message.tool_calls
    assert call.function.name == "ZoomIn" and call.id
    ZoomIn.model_validate_json(call.function.arguments)
    parsed = await client.chat.completions.parse(**kw)
    assert isinstance(parsed.choices[0].message.tool_calls[0].function.parsed_arguments, ZoomIn)

    names, args, finish = [], "", None
    async for chunk in await client.chat.completions.create(**kw, stream=True):
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                assert tc.index == 0
                if tc.function.name:
                    names.append(tc.function.name)
                args += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    assert names == ["ZoomIn"] and args == call.function.arguments and finish == "tool_calls"
