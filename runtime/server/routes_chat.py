"""POST /v1/chat/completions: parse, resolve media off the loop, admit, stream from the engine.

The engine's async iterator is always closed (`aclose`) when the handler leaves, whether the answer
finished, the client disconnected (the write fails or aiohttp cancels the handler), or the server
is shutting down: closing it is what cancels the request and frees its KV blocks.

Errors raised before the first token (bad media, prompt too long, queue full, an engine failure)
are ordinary HTTP errors (a 500 is JSON too), because the response is prepared only once the first
delta has arrived; an error after that is sent as a final SSE `error` event carrying OpenAI's
`{"error": {...}}` and the stream ends there, with no `[DONE]` (which would read as success).
Every request is counted once by outcome (ok, cancelled, client_error, rejected, server_error),
server_error exactly when the client was sent a 500 (before or mid-stream). A client that leaves
is an INFO line, not a traceback.
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

from runtime.api import AppError, GenerationRequest, InvalidRequest, NotReady, PayloadTooLarge, TokenDelta
from runtime.server import keys
from runtime.server.media_refs import resolve_messages
from runtime.server.openai_format import (ChunkShaper, ChatParams, chat_choice, completion,
                                          error_body, parse_chat_request, served_names)
from runtime.server.tool_calls import ToolCallParser, collect as collect_tool_calls, delta_json

log = logging.getLogger("runtime.server.chat")
JSON_ON_LOOP_LIMIT = 1 << 20          # bigger bodies are parsed in the executor


def check_ready(app: web.Application) -> None:
    life, engine = app[keys.LIFECYCLE], app[keys.ENGINE]
    if life.shutting_down:
        raise NotReady("the server is shutting down")
    if life.start_error:
        raise NotReady(f"the engine failed to start: {life.start_error}")
    if (life.start_task is not None and not life.start_task.done()) or not engine.ready:
        raise NotReady("the engine is still loading; retry shortly (see GET /ready)")


class RequestTimeout(AppError):
    status, code, type = 408, "request_timeout", "invalid_request_error"


def check_declared_length(request: web.Request, limit: int, what: str) -> None:
    """Refuse a declared Content-Length over the cap before reading a byte of the body."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"{what} is {request.content_length} bytes; at most {limit} are "
                              "accepted")


async def read_body(request: web.Request) -> bytes:
    """The whole body, within limits.max_body_bytes and server.body_timeout_seconds."""
    cfg = request.app[keys.CONFIG]
    check_declared_length(request, cfg.limits.max_body_bytes,
                          "the request body (limits.max_body_bytes)")
    try:
        async with asyncio.timeout(cfg.server.body_timeout_seconds):
            return await request.read()   # over client_max_size -> 413
    except TimeoutError:
        raise RequestTimeout(f"the request body did not arrive within "
                             f"{cfg.server.body_timeout_seconds:g} s") from None


def _loads(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except RecursionError:
        raise InvalidRequest("invalid JSON body: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"invalid JSON body: {e}") from None


async def read_json(request: web.Request) -> object:
    raw = await read_body(request)
    if not raw:
        raise InvalidRequest("empty request body; send a JSON object")
    if len(raw) <= JSON_ON_LOOP_LIMIT:
        return _loads(raw)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app[keys.ENGINE].executor, _loads, raw)


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    t0 = time.monotonic()
    app = request.app
    cfg, engine, metrics = app[keys.CONFIG], app[keys.ENGINE], app[keys.METRICS]
    outcome = "client_error"
    try:
        check_ready(app)
        params = parse_chat_request(await read_json(request), cfg, served_names(engine.model_name, cfg))
        messages = await resolve_messages(params, cfg, app[keys.UPLOADS], engine.executor)
        rid = uuid.uuid4().hex
        gen_request = GenerationRequest(messages, params.sampling, request_id=rid,
                                        tools=params.tools.tools)
        task = asyncio.current_task()
        app[keys.STREAMS].add(task)
        agen = engine.generate(gen_request)
        try:
            first = await _first(agen)
            metrics.observe_ttft(time.monotonic() - t0)
            if params.stream:
                resp, outcome = await _stream(request, params, agen, first, engine.model_name, rid)
            else:
                resp = await _collect(agen, first, engine.model_name, rid, params.sampling.n,
                                      params.tools.parse)
                outcome = "ok"
            return resp
        finally:
            app[keys.STREAMS].discard(task)
            await _close(agen)
    except AppError as e:
        outcome = _outcome(e.status)
        raise
    except (asyncio.CancelledError, ConnectionError):
        outcome = "cancelled"
        log.info("%s before the answer was complete (%s %s)",
                 "shutdown cancelled a request" if app[keys.LIFECYCLE].shutting_down
                 else "client left", request.method, request.path)
        raise
    except Exception:
        outcome = "server_error"         # error_middleware answers 500
        raise
    finally:
        metrics.count(outcome)


def _outcome(status: int) -> str:
    """server_error: a 500 was sent; rejected: refused for now (429 queue full, 503 loading or
    shutting down), retry later; client_error: any 4xx."""
    return ("rejected" if status in (429, 503) else "server_error" if status >= 500
            else "client_error")


async def _first(agen: AsyncIterator[TokenDelta]) -> TokenDelta:
    try:
        return await agen.__anext__()
    except StopAsyncIteration:
        raise AppError("the engine ended the request without output") from None


async def _close(agen: AsyncIterator[TokenDelta]) -> None:
    try:
        await agen.aclose()
    except Exception:
        log.exception("closing the engine's stream failed")


class Answer:
    """One of a request's n answers, as its deltas arrive."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.logprobs: list | None = None
        self.finish_reason: str | None = None
        self.done = False

    def add(self, delta: TokenDelta) -> None:
        self.texts.append(delta.text)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.done = delta.finish_reason, True

    @property
    def text(self) -> str:
        return "".join(self.texts)


async def collect(agen: AsyncIterator[TokenDelta], first: TokenDelta, n: int
                  ) -> tuple[list[Answer], TokenDelta]:
    """Every answer whole, and the last delta (its usage counts all of them)."""
    answers = [Answer() for _ in range(n)]
    delta = first
    while True:
        answers[delta.index].add(delta)
        if all(a.done for a in answers):
            break
        try:
            delta = await agen.__anext__()
        except StopAsyncIteration:
            break
    return answers, delta


async def _collect(agen: AsyncIterator[TokenDelta], first: TokenDelta, model: str, rid: str,
                   n: int = 1, parse_tool_calls: bool = False) -> web.Response:
    answers, last = await collect(agen, first, n)
    choices = []
    for i, a in enumerate(answers):
        text, calls = collect_tool_calls(a.text) if parse_tool_calls else (a.text, [])
        choices.append(chat_choice(i, text, a.finish_reason, a.logprobs, calls))
    return web.json_response(completion(model, choices, last.usage),
                             headers={"X-Request-Id": rid})


async def _stream(request: web.Request, params: ChatParams, agen: AsyncIterator[TokenDelta],
                  first: TokenDelta, model: str, rid: str) -> tuple[web.StreamResponse, str]:
    """The SSE answer and its outcome ("ok", or the error event's: "server_error", ...)."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                       "X-Request-Id": rid})
    try:
        await resp.prepare(request)
        return await _stream_body(resp, params, agen, first, model, rid)
    except asyncio.CancelledError:
        # shutdown cancelled us: tell the client why before the connection goes (a client that
        # left would not read it, and writing to it fails quietly)
        if request.app[keys.LIFECYCLE].shutting_down:
            with contextlib.suppress(Exception):
                await _stream_error(resp, error_body(NotReady("the server is shutting down; "
                                                              "the answer was cut short")))
        raise
    except ConnectionError:                  # the client left mid-write: not a server error
        log.info("client left mid-stream (request %s)", rid)
        return resp, "cancelled"


async def _stream_body(resp: web.StreamResponse, params: ChatParams, agen: AsyncIterator[TokenDelta],
                       first: TokenDelta, model: str, rid: str) -> tuple[web.StreamResponse, str]:
    shaper = ChunkShaper(model, params.include_usage)
    n = params.sampling.n
    for i in range(n):
        await resp.write(_sse(shaper.role(i)))
    parsers = [ToolCallParser() for _ in range(n)] if params.tools.parse else None

    async def write(events: list, index: int, logprobs=None) -> None:
        """Content and tool-call events of answer `index`; the delta's log-probabilities ride on
        its first content event (or an empty content chunk when the parser held all text back)."""
        for kind, value in events:
            if kind == "content":
                await resp.write(_sse(shaper.content(value, index, logprobs)))
                logprobs = None
            else:
                await resp.write(_sse(shaper.tool_call(delta_json(value), index)))
        if logprobs:
            await resp.write(_sse(shaper.content("", index, logprobs)))

    async def finish(index: int, reason: str | None) -> None:
        if parsers is not None:                      # what the parser still holds, then the end
            await write(parsers[index].finish(), index)
        await resp.write(_sse(shaper.finish(reason, index, bool(parsers and parsers[index].calls))))

    delta: TokenDelta | None = first
    open_ = set(range(n))
    while delta is not None:
        if delta.text or delta.logprobs:
            events = ([] if not delta.text else parsers[delta.index].feed(delta.text) if parsers
                      else [("content", delta.text)])
            await write(events, delta.index, delta.logprobs)
        if delta.finish_reason is not None:
            open_.discard(delta.index)
            if not open_:
                break
            await finish(delta.index, delta.finish_reason)
        try:
            delta = await agen.__anext__()
        except StopAsyncIteration:
            delta = None
        except AppError as e:
            if e.status >= 500:
                log.warning("request %s failed mid-stream: %d %s: %s", rid, e.status, e.code, e)
            await _stream_error(resp, error_body(e))
            return resp, _outcome(e.status)
        except Exception:
            log.exception("engine failed mid-stream (request %s)", rid)
            await _stream_error(resp, error_body(message="internal server error; see the server log",
                                                 type_="server_error", code="internal_error"))
            return resp, "server_error"
    await finish(delta.index if delta else 0, delta.finish_reason if delta else None)
    if params.include_usage:
        await resp.write(_sse(shaper.usage(delta.usage if delta else None)))
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp, "ok"


async def _stream_error(resp: web.StreamResponse, body: dict) -> None:
    """OpenAI's error event; the stream ends here (no [DONE]: that would read as success)."""
    await resp.write(b"event: error\n" + _sse(body))
    await resp.write_eof()


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/chat/completions", chat_completions)
