"""POST /tokenize and POST /detokenize in both llama.cpp's and vLLM's request shapes, for tools
that count tokens. Answers carry the union of both servers' fields, so either kind of client works.

  /tokenize   {"content": str, "add_special": bool, "with_pieces": bool}        (llama.cpp)
              {"prompt": str, "add_special_tokens": bool}                       (vLLM)
              {"messages": [...], "add_generation_prompt": bool}                (vLLM, chat template)
           -> {"tokens": [ids] (with_pieces: [{"id", "piece"}]), "count", "max_model_len"}
  /detokenize {"tokens": [ids]} -> {"content": str (llama.cpp), "prompt": str (vLLM)}

They sit outside /v1 (where both peers put them) but pass the same API-key, Origin and
Content-Type checks (runtime.server.security.is_api_path).
"""
from __future__ import annotations

from aiohttp import web

from runtime.api import ChatMessage, InvalidRequest, TextPart
from runtime.server import keys
from runtime.server.openai_format import parse_chat_request, served_names
from runtime.server.routes_chat import check_ready, read_json


def _flag(body: dict, key: str, default: bool) -> bool:
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise InvalidRequest(f"{key} must be a boolean")
    return v


async def tokenize(request: web.Request) -> web.Response:
    app = request.app
    check_ready(app)
    engine, cfg = app[keys.ENGINE], app[keys.CONFIG]
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    with_pieces = _flag(body, "with_pieces", False)
    if "messages" in body:
        parsed = parse_chat_request({"messages": body["messages"], "model": body.get("model")},
                                    cfg, served_names(engine.model_name, cfg))
        messages = []
        for i, m in enumerate(parsed.messages):
            for j, part in enumerate(m.parts):
                if not isinstance(part, TextPart):
                    raise InvalidRequest(f"messages[{i}].content[{j}]: only text can be tokenized "
                                         "here (images and videos are not)")
            messages.append(ChatMessage(m.role, m.parts))
        result = await engine.tokenize(
            messages=tuple(messages),
            add_special=_flag(body, "add_special_tokens", False),
            add_generation_prompt=_flag(body, "add_generation_prompt", True))
    else:
        key = "content" if "content" in body else "prompt"
        text = body.get(key)
        if not isinstance(text, str):
            raise InvalidRequest("send content (llama.cpp) or prompt (vLLM) as a string, or "
                                 "messages (a chat)")
        add = _flag(body, "add_special", False) if key == "content" else \
            _flag(body, "add_special_tokens", True)
        result = await engine.tokenize(text, add_special=add)
    ids = list(result.token_ids)
    tokens = ([{"id": t, "piece": p} for t, p in zip(ids, result.pieces)] if with_pieces else ids)
    return web.json_response({"tokens": tokens, "count": len(ids),
                              "max_model_len": engine.max_context})


async def detokenize(request: web.Request) -> web.Response:
    app = request.app
    check_ready(app)
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            for t in ids):
        raise InvalidRequest("tokens must be a list of integer token ids")
    text = await app[keys.ENGINE].detokenize(tuple(ids))
    return web.json_response({"content": text, "prompt": text})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
