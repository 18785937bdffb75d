"""OpenAI chat-completions wire format: request validation into engine types, response shaping.

Parsing is pure and cheap (no base64 decoding): media parts come out as `MediaRef`s that the
route resolves off the event loop (`runtime.server.media_refs`). Every validation failure is an
`InvalidRequest` whose message names the offending field, e.g. `messages[1].content[0].type`.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any

from runtime.api import (MAX_TOP_LOGPROBS, AppError, Grammar, InvalidRequest, ModelNotFound,
                         SamplingParams, TextPart, TokenLogprob, ToolCall, Usage)
from runtime.config import AppConfig
from runtime.constrained import json_object_grammar, json_schema_grammar
from runtime.server.tool_calls import NAME_RE, ToolPlan, parse_tools

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}
MAX_STOP_SEQUENCES = 16
MAX_N = 8                    # answers per request (each takes a batch slot; the engine caps at max_batch)


class RemoteUrlsDisabled(InvalidRequest):
    code = "remote_urls_disabled"


class TooManyImages(InvalidRequest):
    code = "too_many_images"


@dataclasses.dataclass(frozen=True)
class MediaRef:
    """An image or video not yet loaded: a data URL, `upload://<id>`, or an http(s) URL."""
    kind: str                        # "image" or "video"
    url: str
    where: str                       # the JSON path, for error messages


@dataclasses.dataclass(frozen=True)
class ParsedMessage:
    role: str
    parts: tuple[TextPart | MediaRef, ...]
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None


@dataclasses.dataclass(frozen=True)
class ChatParams:
    messages: tuple[ParsedMessage, ...]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    tools: ToolPlan = ToolPlan()


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise InvalidRequest(f"{key} must be a number")
    if not lo <= v <= hi:
        raise InvalidRequest(f"{key} must be between {lo:g} and {hi:g}, got {v}")
    return float(v)


def _integer(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidRequest(f"{key} must be an integer")
    if v < lo or (hi is not None and v > hi):
        raise InvalidRequest(f"{key} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                             + f", got {v}")
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise InvalidRequest("stop must be a non-empty string or a list of non-empty strings")
    if len(items) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop accepts at most {MAX_STOP_SEQUENCES} sequences")
    return tuple(items)


def _media_url(part: dict, key: str, where: str) -> str:
    v = part.get(key)
    if not isinstance(v, dict):              # OpenAI's shape: {"url": ...}; a bare string is not it
        raise InvalidRequest(f"{where}.{key} must be an object with a url, e.g. "
                             f'{{"{key}": {{"url": "data:..."}}}}')
    v = v.get("url")
    if not isinstance(v, str) or not v:
        raise InvalidRequest(f"{where}.{key}.url must be a non-empty string")
    return v


def _check_scheme(url: str, where: str, cfg: AppConfig) -> None:
    lower = url[:16].lower()
    if lower.startswith("data:") or lower.startswith("upload://"):
        return
    if lower.startswith("http://") or lower.startswith("https://"):
        if not cfg.media.allow_remote_urls:
            raise RemoteUrlsDisabled(f"{where}: remote URLs are disabled on this server "
                                     "(media.allow_remote_urls); send a data: URL or upload the file "
                                     "to /v1/uploads and use upload://<id>")
        return
    raise InvalidRequest(f"{where}: unsupported URL scheme (use data:, upload:// or http(s)://)")


def _parts(content: Any, role: str, where: str, cfg: AppConfig) -> tuple[TextPart | MediaRef, ...]:
    if content is None and role in ("assistant", "tool"):
        return ()
    if isinstance(content, str):
        return (TextPart(content),)
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content must be a string or a list of content parts")
    out: list[TextPart | MediaRef] = []
    for j, part in enumerate(content):
        pw = f"{where}.content[{j}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise InvalidRequest(f"{pw} must be an object with a string 'type'")
        kind = part["type"]
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise InvalidRequest(f"{pw}.text must be a string")
            out.append(TextPart(part["text"]))
        elif kind in ("image_url", "video_url"):
            if role not in ("user", "tool"):
                raise InvalidRequest(f"{pw}: images and videos are only accepted in user messages "
                                     "(and tool results)")
            url = _media_url(part, kind, pw)
            _check_scheme(url, pw, cfg)
            out.append(MediaRef("image" if kind == "image_url" else "video", url, pw))
        else:
            raise InvalidRequest(f"{pw}.type {kind!r} is not supported "
                                 "(supported: text, image_url, video_url)")
    return tuple(out)


def served_names(model_name: str, cfg: AppConfig) -> frozenset[str]:
    """The names a request's `model` may use: the served id, "default" and the configured aliases."""
    aliases = {a.strip() for a in cfg.server.model_aliases.split(",") if a.strip()}
    return frozenset({model_name, "default"} | aliases)


def _check_model(body: dict, served: frozenset[str]) -> None:
    model = body.get("model")
    if model is None:
        return                                # llama.cpp's and vLLM's servers accept its absence
    if not isinstance(model, str):
        raise InvalidRequest("model must be a string")
    if served and model not in served:
        raise ModelNotFound(f"the model {model!r} does not exist on this server; it serves "
                            + ", ".join(repr(n) for n in sorted(served)))


def response_format(body: dict) -> Grammar | None:
    """OpenAI's response_format: text (nothing to enforce), json_object, or json_schema
    {"name", "schema", "strict"}; the grammar is checked by llguidance (errors name the field)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise InvalidRequest("response_format must be an object with a string type")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_grammar()
    if kind != "json_schema":
        raise InvalidRequest(f"response_format.type {kind!r} is not supported (supported: text, "
                             "json_object, json_schema)")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequest("response_format.json_schema must be an object with a schema")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not NAME_RE.match(name)):
        raise InvalidRequest("response_format.json_schema.name must be 1-64 letters, digits, _ or -")
    if spec.get("strict") is not None and not isinstance(spec["strict"], bool):
        raise InvalidRequest("response_format.json_schema.strict must be a boolean")
    if "schema" not in spec:
        raise InvalidRequest("response_format.json_schema.schema is required")
    return json_schema_grammar(spec["schema"], "response_format.json_schema.schema", name or "")


def _tool_calls(m: dict, where: str) -> tuple[ToolCall, ...]:
    calls = m.get("tool_calls")
    if calls is None:
        return ()
    if m.get("role") != "assistant":
        raise InvalidRequest(f"{where}.tool_calls: only assistant messages carry tool calls")
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where}.tool_calls must be a list")
    out = []
    for k, c in enumerate(calls):
        cw = f"{where}.tool_calls[{k}]"
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or c.get("type", "function") != "function":
            raise InvalidRequest(f"{cw} must be an object with type 'function' and a function "
                                 "{name, arguments}")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise InvalidRequest(f"{cw}.function.name must be a non-empty string")
        args = f.get("arguments", "{}")
        if isinstance(args, dict):
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise InvalidRequest(f"{cw}.function.arguments must be a JSON string")
        cid = c.get("id", "")
        if not isinstance(cid, str):
            raise InvalidRequest(f"{cw}.id must be a string")
        out.append(ToolCall(cid, f["name"], args))
    return tuple(out)


def parse_chat_request(body: Any, cfg: AppConfig, served: frozenset[str] = frozenset()) -> ChatParams:
    """Validate an OpenAI chat-completions body. Unknown top-level fields are ignored, as OpenAI
    clients send many optional ones; known fields are checked strictly. `served`: the model names
    accepted (empty: any)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    _check_model(body, served)
    grammar = response_format(body)
    tools = parse_tools(body)
    if grammar is not None and tools.grammar is not None:
        raise InvalidRequest("response_format and tool_choice cannot both constrain the answer "
                             "(send tool_choice 'auto' or 'none' with a response_format)")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InvalidRequest("messages must be a non-empty list")
    messages: list[ParsedMessage] = []
    images = 0
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(f"{where} must be an object")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of system, developer, user, assistant, "
                                 "tool")
        parts = _parts(m.get("content"), role, where, cfg)
        images += sum(1 for p in parts if isinstance(p, MediaRef) and p.kind == "image")
        call_id = m.get("tool_call_id") if role == "tool" else None
        if call_id is not None and not isinstance(call_id, str):
            raise InvalidRequest(f"{where}.tool_call_id must be a string")
        messages.append(ParsedMessage(ROLES[role], parts, _tool_calls(m, where), call_id))
    if images > cfg.limits.max_images_per_request:
        raise TooManyImages(f"{images} images in one request; at most "
                            f"{cfg.limits.max_images_per_request} are accepted")
    if not any(not isinstance(p, TextPart) or p.text.strip() for m in messages for p in m.parts) \
            and not any(m.tool_calls for m in messages):
        raise InvalidRequest("messages contain no text, image or video")

    n = _integer(body, "n", 1, MAX_N) or 1
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stream, include_usage = stream_fields(body)
    sampling = SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else cfg.inference.default_max_tokens,
        n=n, **sampling_fields(body), **_chat_logprobs(body),
        grammar=grammar if grammar is not None else tools.grammar)
    return ChatParams(tuple(messages), sampling, stream, include_usage, tools)


def stream_fields(body: dict) -> tuple[bool, bool]:
    """stream, and stream_options.include_usage (only allowed with stream: true)."""
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("stream must be a boolean")
    opts = body.get("stream_options")
    if opts is not None and not stream:
        raise InvalidRequest("stream_options is only allowed when stream is true")
    opts = opts or {}
    if not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool):
        raise InvalidRequest("stream_options must be an object with a boolean include_usage")
    return stream, bool(opts.get("include_usage")) and stream


def sampling_fields(body: dict) -> dict:
    """The SamplingParams fields chat and legacy completions read alike: temperature, top_p,
    top_k, seed (int64, as peers take it), stop, ignore_eos (vLLM's), penalties and logit_bias."""
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p <= 0.0:
        raise InvalidRequest("top_p must be greater than 0")
    top_k = _integer(body, "top_k", -1)
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise InvalidRequest("ignore_eos must be a boolean")
    return {"temperature": temperature if temperature is not None else 0.0,
            "top_p": top_p if top_p is not None else 1.0, "top_k": max(top_k or 0, 0),
            "seed": _integer(body, "seed", -(2**63), 2**63 - 1), "stop": _stop(body),
            "ignore_eos": ignore_eos, **penalties(body)}


def penalties(body: dict) -> dict:
    """frequency_penalty and presence_penalty (-2..2, OpenAI's range) and logit_bias ({"token id":
    bias -100..100}), as SamplingParams fields; the engine checks the ids against its vocabulary."""
    out: dict = {}
    for key in ("frequency_penalty", "presence_penalty"):
        v = _number(body, key, -2.0, 2.0)
        if v:
            out[key] = v
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise InvalidRequest('logit_bias must be an object of token ids to biases, e.g. {"42": -100}')
        if len(bias) > 300:
            raise InvalidRequest("logit_bias accepts at most 300 tokens")
        pairs = []
        for k, v in bias.items():
            try:
                token = int(k)
            except ValueError:
                raise InvalidRequest(f"logit_bias: {k!r} is not a token id") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                raise InvalidRequest(f"logit_bias[{k!r}] must be a number between -100 and 100")
            pairs.append((token, float(v)))
        if pairs:
            out["logit_bias"] = tuple(sorted(pairs))
    return out


def _chat_logprobs(body: dict) -> dict:
    """logprobs (a boolean) and top_logprobs (0..20, only with logprobs true), as OpenAI takes them."""
    logprobs = body.get("logprobs")
    if logprobs is None:
        logprobs = False
    if not isinstance(logprobs, bool):
        raise InvalidRequest("logprobs must be a boolean")
    top = _integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS) or 0
    if top and not logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true")
    return {"logprobs": logprobs, "top_logprobs": top}


# ---- responses --------------------------------------------------------------------------------

def new_completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def logprobs_json(entries: list[TokenLogprob] | tuple[TokenLogprob, ...] | None) -> dict | None:
    """OpenAI's choices[].logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    return {"content": [{"token": e.token, "logprob": e.logprob, "bytes": list(e.bytes),
                         "top_logprobs": [{"token": t.token, "logprob": t.logprob,
                                           "bytes": list(t.bytes)} for t in e.top]}
                        for e in entries],
            "refusal": None}


def usage_json(u: Usage | None) -> dict:
    prompt, completion, cached = (u.prompt_tokens, u.completion_tokens, u.cached_tokens) if u else (0, 0, 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(reason: str | None, tool_calls: bool = False) -> str:
    """OpenAI knows stop/length/tool_calls; a cancelled request ends as 'stop' (its client is gone
    anyway). An answer that called tools and ended on its own ends as 'tool_calls'."""
    if reason == "length":
        return "length"
    return "tool_calls" if tool_calls else "stop"


class ChunkShaper:
    """Builds the chat.completion.chunk objects of one streamed answer (same id and created)."""

    def __init__(self, model: str, include_usage: bool):
        self.id, self.created, self.model = new_completion_id(), int(time.time()), model
        self.include_usage = include_usage

    def _chunk(self, choices: list, usage: Any = None) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = usage
        return c

    def role(self, index: int = 0) -> dict:
        return self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def content(self, text: str, index: int = 0,
                logprobs: tuple[TokenLogprob, ...] | None = None) -> dict:
        return self._chunk([{"index": index, "delta": {"content": text},
                             "logprobs": logprobs_json(logprobs), "finish_reason": None}])

    def tool_call(self, delta: dict, index: int = 0) -> dict:
        """One `delta.tool_calls` entry (runtime.server.tool_calls.delta_json's shape)."""
        return self._chunk([{"index": index, "delta": {"tool_calls": [delta]}, "logprobs": None,
                             "finish_reason": None}])

    def finish(self, reason: str | None, index: int = 0, tool_calls: bool = False) -> dict:
        return self._chunk([{"index": index, "delta": {}, "logprobs": None,
                             "finish_reason": finish_reason(reason, tool_calls)}])

    def usage(self, u: Usage | None) -> dict:
        return self._chunk([], usage_json(u))


def chat_choice(index: int, text: str, reason: str | None,
                logprobs: list[TokenLogprob] | None = None,
                tool_calls: list[dict] | None = None) -> dict:
    """One choice; with tool calls, `content` is None unless text came besides them."""
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["content"] = text if text.strip() else None
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs_json(logprobs),
            "finish_reason": finish_reason(reason, bool(tool_calls))}


def completion(model: str, choices: list[dict], u: Usage | None) -> dict:
    """One chat.completion of `choices` (from chat_choice)."""
    return {"id": new_completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None, "choices": choices, "usage": usage_json(u)}


def error_body(err: AppError | None = None, *, message: str = "", type_: str = "",
               code: str = "") -> dict:
    """{"error": {"message", "type", "code"}}; `param` is included for OpenAI clients (always null)."""
    if err is not None:
        message, type_, code = str(err) or err.code, err.type, err.code
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}
