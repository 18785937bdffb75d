"""POST /v1/chat/completions: parse, resolve media off the loop, admit, stream from the engine.

The engine's async iterator is always closed (`aclose`) when the handler leaves, whether the answer
finished, the client disconnected (the write fails or aiohttp cancels the handler), or the server
is shutting down: closing it is what cancels the request and frees its KV blocks.

Errors raised before the first token (bad media, prompt too long, queue full) are ordinary HTTP
errors, because the response is prepared only once the first delta has arrived; an error after
that is sent as a final SSE event `data: {"error": {...}}` followed by `data: [DONE]`.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import AsyncIterator

from aiohttp import web

from runtime.api import AppError, GenerationRequest, InvalidRequest, NotReady, TokenDelta
from runtime.server import keys
from runtime.server.media_refs import resolve_messages
from runtime.server.openai_format import ChunkShaper, ChatParams, completion, error_body, parse_chat_request

log = logging.getLogger("runtime.server.chat")
JSON_ON_LOOP_LIMIT = 1 << 20          # bigger bodies are parsed in the executor


def check_ready(app: web.Application) -> None:
    life, engine = app[keys.LIFECYCLE], app[keys.ENGINE]
    if life.shutting_down:
        raise NotReady("the server is shutting down")
    if life.start_error:
        raise NotReady(f"the engine failed to start: {life.start_error}")
    if (life.start_task is not None and not life.start_task.done()) or not getattr(engine, "ready", True):
        raise NotReady("the engine is still loading; retry shortly (see GET /ready)")


async def read_json(request: web.Request) -> object:
    raw = await request.read()          # over client_max_size -> HTTPRequestEntityTooLarge -> 413
    if not raw:
        raise InvalidRequest("empty request body; send a JSON object")
    try:
        if len(raw) <= JSON_ON_LOOP_LIMIT:
            return json.loads(raw)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(request.app[keys.EXECUTOR], json.loads, raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"invalid JSON body: {e}") from None


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    t0 = time.monotonic()
    app = request.app
    cfg, engine, metrics = app[keys.CONFIG], app[keys.ENGINE], app[keys.METRICS]
    outcome = "client_error"
    try:
        check_ready(app)
        params = parse_chat_request(await read_json(request), cfg)
        messages = await resolve_messages(params, cfg, app[keys.UPLOADS], app[keys.EXECUTOR])
        rid = uuid.uuid4().hex
        gen_request = GenerationRequest(messages, params.sampling, request_id=rid)
        outcome = "rejected"
        async with app[keys.ADMISSION].slot():
            outcome = "client_error"
            task = asyncio.current_task()
            app[keys.STREAMS].add(task)
            agen = engine.generate(gen_request)
            try:
                first = await _first(agen)
                metrics.observe_ttft(time.monotonic() - t0)
                outcome = "cancelled"
                if params.stream:
                    resp = await _stream(request, params, agen, first, engine.model_name, rid)
                else:
                    resp = await _collect(agen, first, engine.model_name, rid)
                outcome = "ok"
                return resp
            finally:
                app[keys.STREAMS].discard(task)
                await _close(agen)
    except AppError as e:
        outcome = ("server_error" if e.status >= 500 else "rejected" if e.status == 429
                   else "client_error")
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        outcome = "cancelled"
        raise
    except Exception:
        outcome = "server_error"
        raise
    finally:
        metrics.count(outcome)


async def _first(agen: AsyncIterator[TokenDelta]) -> TokenDelta:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise AppError("the engine ended the request without output") from None


async def _close(agen: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing the engine's stream failed")


async def _collect(agen: AsyncIterator[TokenDelta], first: TokenDelta, model: str, rid: str) -> web.Response:
    texts, delta = [first.text], first
    while delta.finish_reason is None:
        try:
            delta = await agen.__anext__()
        except StopAsyncIteration:
            break
        texts.append(delta.text)
    return web.json_response(completion(model, "".join(texts), delta.finish_reason, delta.usage),
                             headers={"X-Request-Id": rid})


async def _stream(request: web.Request, params: ChatParams, agen: AsyncIterator[TokenDelta],
                  first: TokenDelta, model: str, rid: str) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                       "X-Request-Id": rid})
    await resp.prepare(request)
    try:
        return await _stream_body(resp, params, agen, first, model, rid)
    except asyncio.CancelledError:
        # shutdown cancelled us: tell the client why before the connection goes (a client that
        # left would not read it, and writing to it fails quietly)
        if request.app[keys.LIFECYCLE].shutting_down:
            with contextlib.suppress(Exception):
                await _stream_error(resp, error_body(NotReady("the server is shutting down; "
                                                              "the answer was cut short")))
        raise


async def _stream_body(resp: web.StreamResponse, params: ChatParams, agen: AsyncIterator[TokenDelta],
                       first: TokenDelta, model: str, rid: str) -> web.StreamResponse:
    shaper = ChunkShaper(model, params.include_usage)
    await resp.write(_sse(shaper.role()))
    delta: TokenDelta | None = first
    while delta is not None:
        if delta.text:
            await resp.write(_sse(shaper.content(delta.text)))
        if delta.finish_reason is not None:
            break
        try:
            delta = await agen.__anext__()
        except StopAsyncIteration:
            delta = None
        except AppError as e:
            await _stream_error(resp, error_body(e))
            return resp
        except Exception:
            log.exception("engine failed mid-stream (request %s)", rid)
            await _stream_error(resp, error_body(message="internal server error; see the server log",
                                                 type_="server_error", code="internal_error"))
            return resp
    await resp.write(_sse(shaper.finish(delta.finish_reason if delta else None)))
    if params.include_usage:
        await resp.write(_sse(shaper.usage(delta.usage if delta else None)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def _stream_error(resp: web.StreamResponse, body: dict) -> None:
    await resp.write(_sse(body))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
