"""Every error the HTTP layer can answer is JSON `{"error": {"message", "type", "code"}}` with the
right status: validation (400), media (400), size limits (413), queue (429 + Retry-After), readiness
(503), authentication (401), unknown routes and methods (404/405), and engine failures (500 without
a traceback). Also the configuration rules (YAML keys, CLI flags, API key when exposed)."""
from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from runtime import config as cfgmod
from runtime.__main__ import build_parser
from runtime.api import AppError, MediaError, PromptTooLong, QueueFull
from runtime.config import ConfigError, from_dict
from runtime.server import create_app
from tests.fake_engine import FakeEngine
from tests.waiting import server_ready, wait_until
from tests.test_server_api import chat, parse_sse, png_data_url


@pytest.fixture
def make_client(aiohttp_client):
    async def make(engine: FakeEngine | None = None, wait_ready: bool = True, **sections):
        engine = engine or FakeEngine()
        client = await aiohttp_client(create_app(from_dict(sections), engine))
        if wait_ready:
            await wait_until(lambda: server_ready(client))
        return client, engine
    return make


async def engine_failed(client) -> bool:
    return (await client.get("/health")).status == 503


async def expect_error(resp, status: int, code: str) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    err = (await resp.json())["error"]
    assert set(err) >= {"message", "type", "code"} and err["message"]
    assert err["code"] == code, err
    assert "Traceback" not in err["message"]
    return err


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}]}


BAD_BODIES = [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ({"messages": [{"role": "user", "content": 42}]}, "content"),
    ({"messages": [{"role": "user", "content": ""}]}, "no text"),
    (user({"type": "audio_url", "audio_url": {"url": "data:,"}}), "audio_url"),
    (user({"type": "text"}), "text"),
    (user({"type": "image_url", "image_url": {}}), "url"),
    (user({"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}), "scheme"),
    (chat(temperature="hot"), "temperature"),
    (chat(temperature=3.5), "temperature"),
    (chat(top_p=0), "top_p"),
    (chat(max_tokens=0), "max_tokens"),
    (chat(max_tokens=True), "max_tokens"),
    (chat(max_tokens=2.5), "max_tokens"),
    (chat(stream="yes"), "stream"),
    (chat(stop=[1, 2]), "stop"),
    (chat(stop=[""]), "stop"),
    (chat(seed="x"), "seed"),
    (chat(n=9), "n must be >= 1 and <= 8"),
    (chat(n=0), "n must be"),
    (chat(stream=True, stream_options={"include_usage": "yes"}), "include_usage"),
    # as llama.cpp's and vLLM's servers refuse them
    (chat(stream_options={"include_usage": True}), "only allowed when stream is true"),
    (chat(stream=False, stream_options={"include_usage": True}), "only allowed when stream is true"),
    (user({"type": "image_url", "image_url": "data:image/png;base64,AAAA"}), "must be an object with a url"),
    (user({"type": "video_url", "video_url": "upload://x"}), "must be an object with a url"),
    (chat(seed=2**63), "seed"),
    (chat(seed=-(2**63) - 1), "seed"),
    (chat(model=7), "model must be a string"),
    # structured output and tools: a bad format or tool is named, never ignored
    (chat(response_format="json"), "response_format"),
    (chat(response_format={"type": "yaml"}), "response_format.type"),
    (chat(response_format={"type": "json_schema"}), "response_format.json_schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema is required"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}),
     "response_format.json_schema.schema must be a JSON Schema object"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}),
     "response_format.json_schema.schema"),
    (chat(response_format={"type": "json_schema", "json_schema": {"name": "no spaces", "schema": {}}}),
     "response_format.json_schema.name"),
    (chat(response_format={"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}}),
     "response_format.json_schema.strict"),
    (chat(tools={"type": "function"}), "tools must be a list"),
    (chat(tools=[{"type": "retrieval"}]), "tools[0].type"),
    (chat(tools=[{"type": "function", "function": {"description": "x"}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {"$ref": "#/nowhere"}}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}] * 2), "unique"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="always"), "tool_choice"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}],
          tool_choice={"type": "function", "function": {"name": "g"}}), "tool_choice.function.name"),
    (chat(tool_choice="required"), "tool_choice 'required' needs tools"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], parallel_tool_calls="no"),
     "parallel_tool_calls"),
    (chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="required",
          response_format={"type": "json_object"}), "cannot both constrain"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": None, "tool_calls": [{"type": "function"}]}]},
     "messages[1].tool_calls[0]"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                   "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": 3}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "messages[0].tool_call_id"),
    (chat(top_logprobs=3), "top_logprobs needs logprobs: true"),
    (chat(logprobs=True, top_logprobs=21), "top_logprobs must be"),
    (chat(logprobs=True, top_logprobs=-1), "top_logprobs must be"),
    (chat(logprobs="yes"), "logprobs must be a boolean"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}]}, {"role": "user", "content": "x"}]},
     "user messages"),
]


@pytest.mark.parametrize("body,needle", BAD_BODIES)
async def test_invalid_requests_are_400(make_client, body, needle):
    client, engine = await make_client()
    err = await expect_error(await client.post("/v1/chat/completions", json=body), 400, "invalid_request")
    assert needle in err["message"]
    assert err["type"] == "invalid_request_error"
    assert engine.requests == []


async def test_an_unknown_model_is_404_and_the_served_names_work(make_client):
    client, engine = await make_client(server={"model_aliases": "qwen3-vl, gpt-4o"})
    err = await expect_error(await client.post("/v1/chat/completions", json=chat(model="llama-70b")),
                             404, "model_not_found")
    assert "llama-70b" in err["message"] and engine.model_name in err["message"]
    assert engine.requests == []
    for name in (engine.model_name, "default", "qwen3-vl", "gpt-4o"):
        r = await client.post("/v1/chat/completions", json=chat(model=name))
        assert r.status == 200, (name, await r.text())
    r = await client.post("/v1/chat/completions", json={k: v for k, v in chat().items() if k != "model"})
    assert r.status == 200                       # absent: accepted, as llama.cpp's server does
    inert = chat(response_format={"type": "text"}, tools=[], logprobs=False, top_logprobs=0,
                 stream_options=None)
    r = await client.post("/v1/chat/completions", json=inert)
    assert r.status == 200, await r.text()
    named_off = chat(tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="none")
    assert (await client.post("/v1/chat/completions", json=named_off)).status == 200


async def test_invalid_json_and_non_object(make_client):
    client, _ = await make_client()
    for raw in (b"{not json", b"[1, 2]", b"", b"\xff\xfe"):
        r = await client.post("/v1/chat/completions", data=raw, headers={"Content-Type": "application/json"})
        await expect_error(r, 400, "invalid_request")


async def test_remote_urls_refused_unless_enabled(make_client):
    client, engine = await make_client()
    body = user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}})
    err = await expect_error(await client.post("/v1/chat/completions", json=body), 400, "remote_urls_disabled")
    assert "allow_remote_urls" in err["message"]
    body = user({"type": "video_url", "video_url": {"url": "http://example.com/v.mp4"}})
    await expect_error(await client.post("/v1/chat/completions", json=body), 400, "remote_urls_disabled")
    assert engine.requests == []


async def test_media_errors(make_client):
    client, engine = await make_client(limits={"max_image_pixels": 100 * 100})
    cases = [
        ("image_url", "data:image/png;base64,!!!notbase64", "base64"),
        ("image_url", "data:image/png,rawbytes", "base64"),
        ("image_url", "data:image/png;base64," + base64.b64encode(b"this is not a PNG").decode(), "supported image"),
        ("image_url", png_data_url(200, 100), "limits.max_image_pixels"),
        ("video_url", "data:video/mp4;base64," + base64.b64encode(b"corrupt video bytes").decode(), "fake engine"),
    ]
    for kind, url, needle in cases:
        r = await client.post("/v1/chat/completions", json=user({"type": kind, kind: {"url": url}}))
        err = await expect_error(r, 400, "invalid_media")
        assert needle in err["message"], err
    # the error names the part at fault
    r = await client.post("/v1/chat/completions", json=user({"type": "text", "text": "a"},
                                                           {"type": "image_url", "image_url": {"url": cases[0][1]}}))
    assert "messages[0].content[1]" in (await r.json())["error"]["message"]
    assert engine.stats().kv_blocks_used == 0


async def test_unknown_upload_reference(make_client):
    client, _ = await make_client()
    for ref in ("upload://AAAAAAAAAAAAAAAAAAAAAA", "upload://../../etc/passwd"):
        r = await client.post("/v1/chat/completions", json=user({"type": "video_url", "video_url": {"url": ref}}))
        await expect_error(r, 400, "invalid_request")


async def test_too_many_images(make_client):
    client, engine = await make_client(limits={"max_images_per_request": 2})
    url = png_data_url(8, 8)
    r = await client.post("/v1/chat/completions", json=user(*[{"type": "image_url", "image_url": {"url": url}}] * 3))
    await expect_error(r, 400, "too_many_images")
    r = await client.post("/v1/chat/completions", json=user(*[{"type": "image_url", "image_url": {"url": url}}] * 2))
    assert r.status == 200 and len(engine.requests) == 1


async def test_body_over_limit_is_413(make_client):
    client, engine = await make_client(limits={"max_body_bytes": 4096})
    big = png_data_url() + "A" * 8000
    r = await client.post("/v1/chat/completions", json=user({"type": "image_url", "image_url": {"url": big}}))
    err = await expect_error(r, 413, "payload_too_large")
    assert "max_body_bytes" in err["message"]
    assert engine.requests == []
    # uploads stream past client_max_size: only limits.max_upload_bytes applies to them
    r = await client.post("/v1/uploads", data={"file": io.BytesIO(b"v" * 50_000)})
    assert r.status == 200 and (await r.json())["bytes"] == 50_000


async def test_upload_errors(make_client):
    client, _ = await make_client(limits={"max_upload_bytes": 1000})
    r = await client.post("/v1/uploads", data=b"x" * 10, headers={"Content-Type": "application/octet-stream"})
    await expect_error(r, 415, "unsupported_media_type")
    r = await client.post("/v1/uploads", data={"file": io.BytesIO(b"x" * 5000)})
    await expect_error(r, 413, "payload_too_large")
    r = await client.post("/v1/uploads", data={"other": "value"})     # a form, not multipart
    await expect_error(r, 415, "unsupported_media_type")


async def test_queue_full_is_429_with_retry_after(make_client):
    engine = FakeEngine(script=tuple(f" t{i}" for i in range(200)), token_delay=0.02,
                        max_running=1, max_queue=0, retry_after=2.5)
    client, _ = await make_client(engine)
    first = await client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=200))
    assert first.status == 200
    await first.content.readany()
    r = await client.post("/v1/chat/completions", json=chat())
    err = await expect_error(r, 429, "queue_full")
    assert r.headers["Retry-After"] == "3" and err["type"] == "rate_limit_error"
    first.close()
    # the engine's own QueueFull maps the same way
    for _ in range(200):
        if not engine.stats().requests_running:
            break
        await asyncio.sleep(0.01)
    engine.fail_with = QueueFull("KV cache full", retry_after=7)
    r = await client.post("/v1/chat/completions", json=chat())
    await expect_error(r, 429, "queue_full")
    assert r.headers["Retry-After"] == "7"
    assert 'appliance_requests_total{outcome="rejected"} 2.0' in await (await client.get("/metrics")).text()


async def test_engine_errors_map_to_status(make_client):
    client, engine = await make_client()
    engine.fail_with = PromptTooLong("prompt is 9000 tokens; the context holds 4096")
    await expect_error(await client.post("/v1/chat/completions", json=chat()), 400, "context_length_exceeded")
    engine.fail_with = MediaError("bad frame")
    await expect_error(await client.post("/v1/chat/completions", json=chat(stream=True)), 400, "invalid_media")
    engine.fail_with = RuntimeError("secret internal detail at /opt/x.py line 3")
    r = await client.post("/v1/chat/completions", json=chat())
    err = await expect_error(r, 500, "internal_error")
    assert "secret" not in err["message"]


async def test_error_mid_stream_becomes_an_sse_error_event(make_client):
    class Failing(FakeEngine):
        async def generate(self, request):
            inner = super().generate(request)
            yield await inner.__anext__()
            await inner.aclose()
            raise AppError("decoder step failed")
    client, engine = await make_client(Failing())
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status == 200
    text = await r.text()
    events = parse_sse(text)
    assert "[DONE]" not in events and "event: error\n" in text
    assert events[-1]["error"]["code"] == "internal_error"
    assert events[1]["choices"][0]["delta"]["content"] == "I"
    assert engine.stats().kv_blocks_used == 0


async def test_not_ready_is_503(make_client):
    engine = FakeEngine()
    engine.start_gate = asyncio.Event()
    client, _ = await make_client(engine, wait_ready=False)
    await expect_error(await client.get("/ready"), 503, "not_ready")
    await expect_error(await client.post("/v1/chat/completions", json=chat()), 503, "not_ready")
    assert (await client.get("/health")).status == 200           # alive while loading
    engine.start_gate.set()
    await wait_until(lambda: server_ready(client))
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


async def test_engine_start_failure_fails_health(make_client):
    class Broken(FakeEngine):
        async def start(self):
            raise RuntimeError("CUDA out of memory")
    client, _ = await make_client(Broken(), wait_ready=False)
    await wait_until(lambda: engine_failed(client))
    err = await expect_error(await client.get("/health"), 503, "not_ready")
    assert "CUDA out of memory" in err["message"]
    await expect_error(await client.get("/ready"), 503, "not_ready")


async def test_api_key(make_client):
    client, _ = await make_client(server={"api_key": "s3cret"})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                    {"Authorization": "s3cret"}):
        for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/stats"), ("POST", "/v1/uploads")):
            r = await client.request(method, path, json=chat(), headers=headers)
            err = await expect_error(r, 401, "invalid_api_key")
            assert err["type"] == "authentication_error"
    ok = {"Authorization": "Bearer s3cret"}
    assert (await client.post("/v1/chat/completions", json=chat(), headers=ok)).status == 200
    assert (await client.get("/v1/models", headers=ok)).status == 200
    for path in ("/health", "/ready", "/metrics", "/"):      # probes and the page stay open
        assert (await client.get(path)).status == 200, path


async def test_404_and_405_are_json(make_client):
    client, _ = await make_client()
    await expect_error(await client.get("/v1/nothing"), 404, "not_found")
    await expect_error(await client.get("/v1/models/other-model"), 404, "not_found")
    r = await client.get("/v1/chat/completions")
    await expect_error(r, 405, "method_not_allowed")
    assert "POST" in r.headers["Allow"]


# ---- configuration --------------------------------------------------------------------------

def test_config_yaml_keys_and_cli_overrides(tmp_path):
    path = tmp_path / "appliance.yaml"
    path.write_text("engine: build/engines/x\n"
                    "server: {port: 9000}\n"
                    "inference: {kv_cache_quantization: fp16, max_context_length: 8192, page_size: 32}\n"
                    "limits: {max_body_bytes: 2MiB, max_queue: 0}\n"
                    "media: {max_side: 768, video_fps: 1, allow_remote_urls: true}\n")
    cfg = cfgmod.load(path)
    assert cfg.engine == "build/engines/x" and cfg.server.port == 9000
    assert (cfg.inference.kv_cache_quantization, cfg.inference.max_context_length, cfg.inference.page_size) \
        == ("fp16", 8192, 32)
    assert cfg.limits.max_body_bytes == 2 * 2**20 and cfg.limits.max_queue == 0
    assert (cfg.media.max_side, cfg.media.video_fps, cfg.media.allow_remote_urls) == (768, 1.0, True)
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9100", "--page-size", "auto",
                                      "--kv-cache-quantization", "int8", "--no-allow-remote-urls",
                                      "--max-upload-bytes", "1GiB", "--engine", "build/engines/y"])
    cfg = cfgmod.load(args.config, cfgmod.cli_overrides(vars(args)), engine=args.engine)
    assert cfg.engine == "build/engines/y" and cfg.server.port == 9100 and cfg.inference.page_size is None
    assert cfg.inference.kv_cache_quantization == "int8" and cfg.media.allow_remote_urls is False
    assert cfg.limits.max_upload_bytes == 2**30 and cfg.limits.max_body_bytes == 2 * 2**20


def test_every_config_key_has_a_cli_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for section, f in cfgmod.keys():
        assert cfgmod.flag_name(f.name) in help_text, f"{section}.{f.name}"


@pytest.mark.parametrize("raw,needle", [
    ({"inference": {"kv_cache_quantization": "int4"}}, "kv_cache_quantization"),
    ({"inference": {"kv_cache_quantisation": "int8"}}, "unknown key"),
    ({"limits": {"max_concurrency": 0}}, "max_concurrency"),
    ({"limits": {"max_body_bytes": "lots"}}, "not a size"),
    ({"server": {"port": "http"}}, "server.port"),
    ({"media": {"allow_remote_urls": "maybe"}}, "allow_remote_urls"),
    ({"cache": {}}, "unknown config section"),
])
def test_config_errors_name_the_key(raw, needle):
    with pytest.raises(ConfigError, match=needle):
        from_dict(raw)


def test_exposed_host_requires_api_key(monkeypatch):
    monkeypatch.delenv(cfgmod.API_KEY_ENV, raising=False)
    for host in ("127.0.0.1", "localhost", "::1"):
        cfgmod.check_exposure(from_dict({"server": {"host": host}}))
    with pytest.raises(ConfigError, match="api_key"):
        cfgmod.check_exposure(from_dict({"server": {"host": "0.0.0.0"}}))
    cfgmod.check_exposure(from_dict({"server": {"host": "0.0.0.0", "api_key": "k"}}))
    monkeypatch.setenv(cfgmod.API_KEY_ENV, "from-env")
    cfg = from_dict({"server": {"host": "0.0.0.0"}})
    assert cfg.server.api_key == "from-env"
    cfgmod.check_exposure(cfg)


def test_cli_refuses_exposed_host_without_key(monkeypatch, capsys):
    from runtime.__main__ import main
    monkeypatch.delenv(cfgmod.API_KEY_ENV, raising=False)
    assert main(["serve", "--host", "0.0.0.0", "--engine", "/nonexistent"]) == 2
    assert "api_key" in capsys.readouterr().err


def test_image_helper_is_valid():
    data = base64.b64decode(png_data_url(10, 20).split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (10, 20)


def test_example_yaml_documents_the_defaults():
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    assert cfgmod.load(root / "build" / "appliance.example.yaml") == cfgmod.AppConfig()
