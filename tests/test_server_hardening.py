"""The server against the web: cross-site requests, DNS rebinding, slow clients, malformed HTTP,
upload quotas, security headers, disconnect logging and SIGTERM draining (FakeEngine: these are
server mechanics). Raw-socket cases run against the same runner `serve` uses."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

import aiohttp
import pytest

from runtime.config import from_dict
from runtime.server import create_app
from runtime.server.app import serve_until
from tests.fake_engine import FakeEngine
from tests.test_server_api import make_client, parse_sse  # noqa: F401  (make_client: the same fixture)
from tests.waiting import wait_until


def chat(**kw):
    return {"model": "default", "messages": [{"role": "user", "content": "hi"}], **kw}


async def test_cross_site_requests_are_refused(make_client):
    client, engine = await make_client()
    own = f"http://{client.host}:{client.port}"
    # a "simple" request a foreign page can send without a preflight
    r = await client.post("/v1/chat/completions", data=json.dumps(chat()),
                          headers={"Content-Type": "text/plain"})
    assert r.status == 415 and (await r.json())["error"]["code"] == "unsupported_media_type"
    r = await client.post("/v1/chat/completions", data={"messages": "x"})     # a form post
    assert r.status == 415
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Origin": "https://evil.example"})
    assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_origin"
    r = await client.get("/v1/stats", headers={"Origin": "https://evil.example"})
    assert r.status == 403
    assert engine.requests == []
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Origin": own})
    assert r.status == 200
    assert "Access-Control-Allow-Origin" not in r.headers          # CORS is off by default
    r = await client.options("/v1/chat/completions", headers={"Origin": own})
    assert r.status == 405


async def test_origins_and_cors_are_configurable(make_client):
    client, _ = await make_client(server={"allowed_origins": "https://chat.example",
                                          "cors_origins": "https://app.example"})
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Origin": "https://chat.example"})
    assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers
    r = await client.options("/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST"})
    assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Origin": "https://app.example"})
    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example"
    r = await client.post("/v1/chat/completions", json=chat(), headers={"Origin": "https://other.example"})
    assert r.status == 403


@pytest.mark.parametrize("host,status", [("localhost:8080", 200), ("127.0.0.1", 200), ("[::1]:80", 200),
                                         ("evil.example", 421), ("evil.example:8080", 421),
                                         ("appliance-3.cluster", 200)])
async def test_foreign_host_headers_are_refused_on_loopback(make_client, host, status):
    client, _ = await make_client(server={"allowed_hosts": "appliance-3.cluster"})
    r = await client.get("/v1/models", headers={"Host": host})
    assert r.status == status
    if status != 200:
        assert (await r.json())["error"]["code"] == "misdirected_request"


async def test_security_headers_on_the_page_and_no_version_banner(make_client):
    client, _ = await make_client()
    r = await client.get("/")
    assert r.status == 200
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    for path in ("/", "/static/app.js", "/v1/models", "/no-such-page"):
        r = await client.get(path)
        assert r.headers["Server"] == "appliance" and "aiohttp" not in r.headers["Server"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_upload_quota_expires_the_oldest_first(make_client):
    client, _ = await make_client(limits={"max_stored_uploads": 2, "max_stored_upload_bytes": 2500})
    ids = []
    for i in range(3):
        r = await client.post("/v1/uploads", data={"file": io.BytesIO(bytes([i]) * 1000)})
        assert r.status == 200
        ids.append((await r.json())["id"])
    assert len(set(ids)) == 3 and all(len(i) >= 22 for i in ids)
    store = client.server.app[__import__("runtime.server.keys", fromlist=["UPLOADS"]).UPLOADS]
    assert len(store) == 2 and store.total_bytes <= 2500
    assert (await client.delete(f"/v1/uploads/{ids[0]}")).status == 404      # the oldest went
    assert (await client.delete(f"/v1/uploads/{ids[2]}")).status == 200


async def test_a_disconnect_is_an_info_line_not_a_traceback(make_client, caplog):
    engine = FakeEngine(script=tuple(f" t{i}" for i in range(500)), token_delay=0.01)
    client, _ = await make_client(engine)
    caplog.set_level(logging.INFO)
    for _ in range(3):
        r = await client.post("/v1/chat/completions", json=chat(stream=True, max_tokens=500))
        await r.content.readany()
        r.close()
    assert await wait_until(lambda: len(engine.cancelled) == 3)
    await asyncio.sleep(0.1)
    bad = [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert bad == [], [rec.getMessage() for rec in bad]
    metrics = await (await client.get("/metrics")).text()
    assert 'appliance_requests_total{outcome="cancelled"} 3.0' in metrics
    assert 'outcome="server_error"' not in metrics


# ---- raw sockets against the runner `serve` uses ---------------------------------------------

@contextlib.asynccontextmanager
async def running(engine: FakeEngine, **sections):
    cfg = from_dict({"server": {"port": 0, **sections.pop("server", {})}, **sections})
    app = create_app(cfg, engine)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_until(app, cfg, stop, on_started=started.set_result))
    runner = await started
    port = runner.addresses[0][1]
    try:
        yield port, app
    finally:
        stop.set()
        await task


async def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def status_and_json(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("request_bytes", [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
], ids=["negative-length", "length-and-chunked", "long-header"])
async def test_malformed_framing_is_json_without_tracebacks(request_bytes, caplog):
    caplog.set_level(logging.INFO)
    async with running(FakeEngine()) as (port, _):
        status, body = status_and_json(await raw(port, request_bytes))
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_declared_length_over_the_cap_is_refused_before_reading():
    async with running(FakeEngine(), limits={"max_body_bytes": 1000}) as (port, _):
        # the body never comes: the answer must not wait for it
        reply = await raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n")
        assert status_and_json(reply)[0] == 413
        reply = await raw(port, b"POST /v1/uploads HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Type: multipart/form-data; boundary=x\r\n"
                                b"Content-Length: 100000000000\r\n\r\n")
        assert status_and_json(reply)[0] == 413


async def test_slow_clients_time_out():
    async with running(FakeEngine(), server={"body_timeout_seconds": 0.5,
                                             "header_timeout_seconds": 0.5}) as (port, _):
        # a body that never finishes: 408
        reply = await raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                                b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mo")
        status, body = status_and_json(reply)
        assert status == 408 and body["error"]["code"] == "request_timeout"
        # headers that never end: the connection is closed
        reply = await raw(port, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1\r\n")
        assert reply == b""


async def test_sigterm_drains_ready_turns_503_and_streams_finish():
    engine = FakeEngine(script=tuple(f" t{i}" for i in range(40)), token_delay=0.02)
    cfg = from_dict({"server": {"port": 0, "shutdown_grace_seconds": 20}})
    app = create_app(cfg, engine)
    stop, started = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_until(app, cfg, stop, on_started=started.set_result))
    port = (await started).addresses[0][1]
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as s:
        assert await wait_until(lambda: engine.ready)
        r = await s.post(base + "/v1/chat/completions", json=chat(stream=True, max_tokens=40))
        assert r.status == 200
        await r.content.readany()
        stop.set()                                   # what the SIGTERM handler does
        assert await wait_until(lambda: app[__import__("runtime.server.keys", fromlist=["x"])
                                            .LIFECYCLE].shutting_down)
        ready = await s.get(base + "/ready")          # still listening during the grace period
        assert ready.status == 503
        refused = await s.post(base + "/v1/chat/completions", json=chat())
        assert refused.status == 503
        events = parse_sse(await r.text())            # the running stream finishes normally
        assert events[-1] == "[DONE]"
    await task
    assert engine.stopped
