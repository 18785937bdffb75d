"""POST /v1/completions: OpenAI's legacy text completions (a raw prompt, no chat template, no
media), for tools written against it. Same engine path, errors and outcome counting as chat.

Supported: prompt (a string, or a list of one string), max_tokens (default 16, as OpenAI),
temperature, top_p, top_k, seed, stop, n, stream (+ stream_options.include_usage), ignore_eos,
and logprobs as an integer 0..5 in the legacy shape {tokens, token_logprobs, top_logprobs,
text_offset} (top_logprobs: the k most likely tokens plus the sampled one, as OpenAI documents).
Refused by name: echo, suffix, best_of other than n, a list of several prompts, token-id prompts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any, AsyncIterator

from aiohttp import web

from runtime.api import AppError, GenerationRequest, InvalidRequest, SamplingParams, TokenDelta, TokenLogprob
from runtime.config import AppConfig
from runtime.server import keys
from runtime.server.openai_format import (MAX_N, _check_model, _integer, error_body, finish_reason,
                                          sampling_fields, served_names, stream_fields, usage_json)
from runtime.server.routes_chat import (_close, _first, _outcome, _sse, _stream_error, check_ready,
                                        collect, read_json)

log = logging.getLogger("runtime.server.completions")
DEFAULT_MAX_TOKENS = 16              # OpenAI's default for this endpoint
MAX_LOGPROBS = 5


@dataclasses.dataclass(frozen=True)
class CompletionParams:
    prompt: str
    sampling: SamplingParams
    stream: bool
    include_usage: bool


def parse_completion_request(body: Any, cfg: AppConfig, served: frozenset[str] = frozenset()
                             ) -> CompletionParams:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidRequest("prompt must be a string (or a list of one string); several prompts "
                             "and token-id prompts are not supported")
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    if body.get("echo") not in (None, False):
        raise InvalidRequest("echo is not supported by this server")
    if body.get("suffix") not in (None, ""):
        raise InvalidRequest("suffix is not supported by this server")
    n = _integer(body, "n", 1, MAX_N) or 1
    best_of = _integer(body, "best_of", 1)
    if best_of not in (None, n):
        raise InvalidRequest("best_of is not supported by this server (only best_of equal to n)")
    logprobs = _integer(body, "logprobs", 0, MAX_LOGPROBS)
    max_tokens = _integer(body, "max_tokens", 1)
    stream, include_usage = stream_fields(body)
    sampling = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else DEFAULT_MAX_TOKENS, n=n,
        logprobs=logprobs is not None, top_logprobs=logprobs or 0, **sampling_fields(body))
    return CompletionParams(prompt, sampling, stream, include_usage)


# ---- responses --------------------------------------------------------------------------------

def legacy_logprobs(entries: list[TokenLogprob] | None, k: int, offset: int = 0) -> dict | None:
    """{tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset} from `offset`."""
    if entries is None:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{**{t.token: t.logprob for t in e.top[:k]}, e.token: e.logprob}
                             for e in entries],
            "text_offset": offsets}


class _Shaper:
    def __init__(self, model: str, k: int):
        self.id, self.created, self.model, self.k = f"cmpl-{uuid.uuid4().hex}", int(time.time()), model, k
        self.offsets: dict[int, int] = {}

    def body(self, choices: list[dict], usage: dict | None = None, with_usage: bool = True) -> dict:
        out = {"id": self.id, "object": "text_completion", "created": self.created,
               "model": self.model, "system_fingerprint": None, "choices": choices}
        if with_usage:
            out["usage"] = usage
        return out

    def choice(self, index: int, text: str, reason: str | None, entries, final: bool) -> dict:
        start = self.offsets.get(index, 0)
        lp = legacy_logprobs(entries, self.k, start)
        if lp is not None:
            self.offsets[index] = start + sum(len(e.token) for e in entries)
        return {"text": text, "index": index, "logprobs": lp,
                "finish_reason": finish_reason(reason) if final else None}


async def completions(request: web.Request) -> web.StreamResponse:
    app = request.app
    cfg, engine, metrics = app[keys.CONFIG], app[keys.ENGINE], app[keys.METRICS]
    outcome, t0 = "client_error", time.monotonic()
    try:
        check_ready(app)
        params = parse_completion_request(await read_json(request), cfg,
                                          served_names(engine.model_name, cfg))
        rid = uuid.uuid4().hex
        task = asyncio.current_task()
        app[keys.STREAMS].add(task)
        agen = engine.generate(GenerationRequest((), params.sampling, request_id=rid,
                                                 prompt=params.prompt))
        try:
            first = await _first(agen)
            metrics.observe_ttft(time.monotonic() - t0)
            shaper = _Shaper(engine.model_name, params.sampling.top_logprobs)
            if params.stream:
                resp, outcome = await _stream(request, params, agen, first, shaper, rid)
                return resp
            answers, last = await collect(agen, first, params.sampling.n)
            choices = [shaper.choice(i, a.text, a.finish_reason, a.logprobs, True)
                       for i, a in enumerate(answers)]
            outcome = "ok"
            return web.json_response(shaper.body(choices, usage_json(last.usage)),
                                     headers={"X-Request-Id": rid})
        finally:
            app[keys.STREAMS].discard(task)
            await _close(agen)
    except AppError as e:
        outcome = _outcome(e.status)
        raise
    except (asyncio.CancelledError, ConnectionError):
        outcome = "cancelled"
        log.info("client left before the completion was complete")
        raise
    except Exception:
        outcome = "server_error"
        raise
    finally:
        metrics.count(outcome)


async def _stream(request: web.Request, params: CompletionParams, agen: AsyncIterator[TokenDelta],
                  first: TokenDelta, shaper: _Shaper, rid: str) -> tuple[web.StreamResponse, str]:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                       "X-Request-Id": rid})
    await resp.prepare(request)
    usage_too = params.include_usage
    open_ = set(range(params.sampling.n))
    delta = first
    try:
        while True:
            final = delta.finish_reason is not None
            if delta.text or delta.logprobs or final:
                choice = shaper.choice(delta.index, delta.text, delta.finish_reason,
                                       delta.logprobs, final)
                await resp.write(_sse(shaper.body([choice], None, usage_too)))
            if final:
                open_.discard(delta.index)
                if not open_:
                    break
            try:
                delta = await agen.__anext__()
            except StopAsyncIteration:
                break
            except AppError as e:
                await _stream_error(resp, error_body(e))
                return resp, _outcome(e.status)
        if usage_too:
            await resp.write(_sse(shaper.body([], usage_json(delta.usage))))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp, "ok"
    except ConnectionError:
        log.info("client left mid-stream (request %s)", rid)
        return resp, "cancelled"


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
