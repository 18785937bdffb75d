"""Structured output and tool calls through the REAL default engine: `response_format`
(json_schema, json_object) and `tool_choice` "required" / a named function are enforced while
decoding (runtime.constrained, llguidance), streamed and not; tool calls come back as OpenAI's
`tool_calls`; a matcher that fails ends its request as a clear error with its KV blocks freed.

The tiny default model knows nothing of JSON or tools: left alone it never writes either (each
test checks that too), so whatever parses here was made by the grammar."""
from __future__ import annotations

import base64
import io
import json

import pytest

from exporter.world.scenes import COLOURS, SHAPES, Poster, render_poster
from runtime import constrained
from runtime.config import from_dict
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.server import create_app
from tests.test_server_api import parse_sse
from tests.waiting import wait_ready

SHAPE_SCHEMA = {"type": "object",
                "properties": {"shape": {"enum": list(SHAPES)}, "colour": {"enum": sorted(COLOURS)}},
                "required": ["shape", "colour"], "additionalProperties": False}
ZOOM = {"type": "function", "function": {
    "name": "zoom_in", "description": "Zoom into one quadrant of the picture",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["quadrant", "factor"],
                   "properties": {"quadrant": {"enum": ["top left", "top right", "bottom left",
                                                        "bottom right"]},
                                  "factor": {"enum": [2, 4]}}}}}
CLICK = {"type": "function", "function": {
    "name": "click", "parameters": {"type": "object", "additionalProperties": False,
                                    "required": ["target"],
                                    "properties": {"target": {"enum": ["ok", "cancel"]}}}}}


@pytest.fixture
async def served(aiohttp_client, default_engine_dir):
    engine = Engine.load(default_engine_dir, EngineConfig(max_context=1024))
    client = await aiohttp_client(create_app(from_dict({}), engine))
    await wait_ready(client)
    yield client, engine
    assert engine.block_manager.num_used_blocks == 0
    engine.block_manager.check_integrity()


def poster_url(kind="triangle", colour="red") -> str:
    buf = io.BytesIO()
    render_poster(Poster(kind, colour, "white" if colour != "white" else "black", 160, 160,
                         0.5, 0.5, 0.35)).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def picture_question(**kw) -> dict:
    return {"model": "default", "max_tokens": 60, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": poster_url()}},
        {"type": "text", "text": "What shape is in the picture, and what colour is it?"}]}], **kw}


def shape_format() -> dict:
    return {"type": "json_schema", "json_schema": {"name": "shape", "schema": SHAPE_SCHEMA, "strict": True}}


def check_shape(obj) -> None:
    """SHAPE_SCHEMA by hand (jsonschema is not installed)."""
    assert isinstance(obj, dict) and set(obj) == {"shape", "colour"}, obj
    assert obj["shape"] in SHAPES and obj["colour"] in COLOURS, obj


def check_args(tool: dict, arguments: str) -> None:
    """The tool's parameters schema by hand: an object, exactly the required keys, enum values."""
    params = tool["function"]["parameters"]
    args = json.loads(arguments)
    assert isinstance(args, dict) and set(args) == set(params["required"]), args
    for key, value in args.items():
        assert value in params["properties"][key]["enum"], (key, value)


def streamed(events: list) -> tuple[str, dict, list]:
    """(content, tool calls by index {id, name, arguments}, finish reasons) of an SSE answer."""
    content, calls, reasons = [], {}, []
    for e in events:
        if e == "[DONE]" or not e.get("choices"):
            continue
        choice = e["choices"][0]
        delta = choice["delta"]
        content.append(delta.get("content") or "")
        for tc in delta.get("tool_calls") or []:
            call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
            if "id" in tc:
                assert call["id"] is None and tc["type"] == "function"
                call["id"], call["name"] = tc["id"], tc["function"]["name"]
            call["arguments"] += tc["function"].get("arguments", "")
        if choice["finish_reason"]:
            reasons.append(choice["finish_reason"])
    return "".join(content), calls, reasons


async def post(client, body) -> dict:
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 200, await r.text()
    return await r.json()


async def post_stream(client, body) -> list:
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    assert r.status == 200, await r.text()
    events = parse_sse(await r.text())
    assert events[-1] == "[DONE]"
    return events


async def test_a_json_schema_answer_about_a_picture_parses_and_validates(served):
    client, _ = served
    plain = await post(client, picture_question())
    with pytest.raises(ValueError):          # the model alone writes no JSON
        json.loads(plain["choices"][0]["message"]["content"])

    full = await post(client, picture_question(response_format=shape_format()))
    choice = full["choices"][0]
    check_shape(json.loads(choice["message"]["content"]))
    # the grammar ended the answer when the object was complete, long before max_tokens
    assert choice["finish_reason"] == "stop" and full["usage"]["completion_tokens"] < 60

    content, calls, reasons = streamed(await post_stream(client, picture_question(
        response_format=shape_format())))
    assert content == choice["message"]["content"] and not calls and reasons == ["stop"]

    sampled = await post(client, picture_question(response_format=shape_format(), temperature=1.0,
                                                  seed=7))
    check_shape(json.loads(sampled["choices"][0]["message"]["content"]))


async def test_json_object_answers_are_json_objects(served):
    """Any object: the tiny model babbles inside strings, so some sampled answers run to
    max_tokens; every one that ended is an object, and one of the seeds ends."""
    client, _ = served
    ended = 0
    for seed in range(6):
        body = picture_question(response_format={"type": "json_object"}, temperature=1.0, seed=seed,
                                max_tokens=40)
        choice = (await post(client, body))["choices"][0]
        text = choice["message"]["content"]
        assert text.startswith("{"), text
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict), text
            ended += 1
    assert ended >= 1


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "click"}}],
                         ids=["required", "named"])
async def test_forced_tool_calls_are_valid_calls_streamed_and_not(served, choice):
    client, _ = served
    tools = [ZOOM, CLICK]
    body = picture_question(tools=tools, tool_choice=choice, parallel_tool_calls=False, max_tokens=150)
    plain = await post(client, picture_question(tools=tools))       # "auto": the model's own text
    assert "tool_calls" not in plain["choices"][0]["message"]
    assert plain["choices"][0]["finish_reason"] != "tool_calls"

    full = await post(client, body)
    ch = full["choices"][0]
    assert ch["finish_reason"] == "tool_calls", ch
    assert ch["message"]["content"] is None
    [call] = ch["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    names = {t["function"]["name"]: t for t in tools}
    if isinstance(choice, dict):
        assert call["function"]["name"] == "click"
    check_args(names[call["function"]["name"]], call["function"]["arguments"])

    content, calls, reasons = streamed(await post_stream(client, body))
    assert content == "" and reasons == ["tool_calls"]
    assert list(calls) == [0]
    assert calls[0]["name"] == call["function"]["name"]
    assert calls[0]["arguments"] == call["function"]["arguments"]      # greedy: the same answer


async def test_a_conversation_with_tool_results_is_served(served):
    """An assistant turn with tool_calls and content null, then the tool's answer: rendered
    by the template (the prompt grows by the rendered call and response) and answered."""
    client, _ = served
    first = picture_question(tools=[ZOOM], tool_choice="required", max_tokens=150)
    call = (await post(client, first))["choices"][0]["message"]["tool_calls"][0]
    follow = {**first, "tool_choice": "auto", "messages": first["messages"] + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "The quadrant shows a red triangle."}]}
    answer = await post(client, follow)
    assert answer["choices"][0]["message"]["content"] is not None
    before = (await post(client, {**first, "tool_choice": "auto"}))["usage"]["prompt_tokens"]
    assert answer["usage"]["prompt_tokens"] > before + 20


@pytest.mark.parametrize("field,value,needle", [
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("response_format", {"type": "json_schema"}, "response_format.json_schema"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}},
     "response_format.json_schema.schema"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
     "response_format.json_schema.schema"),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}},
     "response_format.json_schema.schema"),
    ("tools", [{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                             "properties": {"a": {"type": "frob"}}}}}],
     "tools[0].function.parameters"),
    ("tool_choice", {"type": "function", "function": {"name": "missing"}}, "tool_choice"),
])
async def test_bad_formats_and_tools_are_400_by_the_real_server(served, field, value, needle):
    client, _ = served
    body = picture_question(**{field: value})
    if field == "tool_choice":
        body["tools"] = [ZOOM]
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 400, await r.text()
    assert needle in (await r.json())["error"]["message"]


async def test_a_failing_matcher_ends_its_request_as_an_error_and_frees_its_blocks(served, monkeypatch):
    client, engine = served
    real = constrained.Matcher.consume
    counts = {}

    def consume(self, token):
        counts[id(self)] = counts.get(id(self), 0) + 1
        real(self, token)
        if counts[id(self)] == 3:
            self.error = "simulated parser failure"

    monkeypatch.setattr(constrained.Matcher, "consume", consume)
    body = picture_question(response_format=shape_format())
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status == 500
    assert "constrained decoding failed: simulated parser failure" in (await r.json())["error"]["message"]
    r = await client.post("/v1/chat/completions", json={**body, "stream": True})
    events = parse_sse(await r.text())
    assert "[DONE]" not in events and "simulated parser failure" in events[-1]["error"]["message"]
    assert engine.block_manager.num_used_blocks == 0
    monkeypatch.setattr(constrained.Matcher, "consume", real)
    check_shape(json.loads((await post(client, body))["choices"][0]["message"]["content"]))


# --- the features together: n answers, each under the grammar, with log-probabilities -------------

async def test_n_answers_each_follow_the_schema_with_logprobs(served):
    """n=3 sampled answers share one prefill and each follows the schema under its own matcher;
    every generated token has its log-probability."""
    client, _ = served
    r = await client.post("/v1/chat/completions", json=picture_question(
        n=3, temperature=1.0, seed=11, logprobs=True, top_logprobs=2,
        response_format=shape_format()))
    assert r.status == 200, await r.text()
    body = await r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    completion_tokens = 0
    for c in body["choices"]:
        check_shape(json.loads(c["message"]["content"]))
        entries = c["logprobs"]["content"]
        assert entries and all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in entries)
        assert "".join(e["token"] for e in entries).startswith(c["message"]["content"][:5])
        completion_tokens += len(entries)
    assert body["usage"]["completion_tokens"] == completion_tokens


async def test_streamed_tool_calls_for_two_answers(served):
    """Streaming with n=2 and a forced tool: each choice index gets its own tool-call deltas and
    its own finish chunk with finish_reason tool_calls."""
    client, _ = served
    r = await client.post("/v1/chat/completions", json=picture_question(
        n=2, temperature=0.8, seed=5, stream=True, tools=[ZOOM], tool_choice="required", max_tokens=150,
        parallel_tool_calls=False))
    assert r.status == 200, await r.text()
    chunks = parse_sse(await r.text())
    assert chunks[-1] == "[DONE]"
    chunks = chunks[:-1]
    args = {0: "", 1: ""}
    finishes = {}
    for ch in chunks:
        for c in ch["choices"]:
            for tc in c["delta"].get("tool_calls") or []:
                if tc.get("function", {}).get("name"):
                    assert tc["function"]["name"] == "zoom_in"
                args[c["index"]] += tc.get("function", {}).get("arguments") or ""
            if c["finish_reason"]:
                finishes[c["index"]] = c["finish_reason"]
    assert finishes == {0: "tool_calls", 1: "tool_calls"}
    for i in (0, 1):
        check_args(ZOOM, args[i])
