"""Middlewares: every error becomes `{"error": {"message", "type", "code"}}` JSON (tracebacks stay
in the server log), and /v1 routes check `Authorization: Bearer <server.api_key>` when a key is set.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import math

from aiohttp import web

from runtime.api import AppError, NotReady, QueueFull
from runtime.server import keys
from runtime.server.openai_format import error_body
from runtime.server.security import is_api_path

log = logging.getLogger("runtime.server")

_HTTP_CODES = {400: ("bad_request", "invalid_request_error"),
               401: ("invalid_api_key", "authentication_error"),
               403: ("forbidden", "invalid_request_error"),
               404: ("not_found", "invalid_request_error"),
               405: ("method_not_allowed", "invalid_request_error"),
               413: ("payload_too_large", "invalid_request_error"),
               415: ("unsupported_media_type", "invalid_request_error"),
               429: ("rate_limited", "rate_limit_error")}


class Unauthorized(AppError):
    status, code, type = 401, "invalid_api_key", "authentication_error"


def app_error_response(err: AppError) -> web.Response:
    headers = {}
    if isinstance(err, QueueFull):
        headers["Retry-After"] = str(max(1, math.ceil(err.retry_after)))
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    resp = web.json_response(error_body(err), status=err.status, headers=headers)
    if err.status in (408, 413):      # the body was not read (or not all of it): end the line
        resp.force_close()
    return resp


def _http_error_response(exc: web.HTTPException, request: web.Request) -> web.Response:
    code, type_ = _HTTP_CODES.get(exc.status, ("http_error", "invalid_request_error"))
    message = exc.reason
    if exc.status == 404:
        message = f"no route for {request.path}"
    elif exc.status == 405:
        message = f"method {request.method} is not allowed on {request.path}"
    elif exc.status == 413:
        limit = request.app[keys.CONFIG].limits.max_body_bytes
        message = f"request body exceeds limits.max_body_bytes ({limit} bytes)"
    headers = {k: v for k, v in exc.headers.items() if k in ("Allow", "Retry-After")}
    return web.json_response(error_body(message=message, type_=type_, code=code),
                             status=exc.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except AppError as e:
        if isinstance(e, NotReady):          # /ready polled while loading or draining: expected
            log.debug("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e)
        elif e.status >= 500:
            log.warning("%s %s -> %d %s: %s", request.method, request.path, e.status, e.code, e)
        return app_error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _http_error_response(e, request)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response(error_body(message="internal server error; see the server log",
                                            type_="server_error", code="internal_error"), status=500)


@web.middleware
async def auth_middleware(request: web.Request, handler) -> web.StreamResponse:
    key = request.app[keys.CONFIG].server.api_key
    if key and is_api_path(request.path):
        auth = request.headers.get("Authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise Unauthorized("missing or invalid API key (send Authorization: Bearer <key>)")
    return await handler(request)
