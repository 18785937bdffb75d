"""Defences for a keyless server on localhost, which every page the user opens can reach.

- DNS rebinding: when bound to loopback, a request whose Host is not a loopback name
  (localhost, 127.0.0.1, [::1]) or one of `server.allowed_hosts` is refused (421). A reverse
  proxy such as nginx forwards the client's Host: list the names it serves under there. Bound to
  another address (an API key is required then), Host is checked only when allowed_hosts is set.
- Cross-site requests: a request to /v1 (or /tokenize, /detokenize: `is_api_path`) carrying an Origin that is neither this server's own
  (scheme://Host) nor in `server.allowed_origins` / `server.cors_origins` is refused (403). A
  JSON body sent as text/plain or as a form (the "simple" requests a foreign page can send
  without a CORS preflight) gets 415 on /v1 (uploads take multipart/form-data only).
- CORS is off unless `server.cors_origins` lists origins ("*" = any): then those get
  Access-Control-Allow-* headers and their preflight (OPTIONS) is answered.
- Every response: `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, no Server
  version banner; the page and its static files also carry a Content-Security-Policy that allows
  only the page's own scripts, and may not be framed (frame-ancestors, X-Frame-Options).
"""
from __future__ import annotations

from aiohttp import web

from runtime.api import AppError
from runtime.config import AppConfig, is_local_host, names
from runtime.server import keys

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
SERVER_NAME = "appliance"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data: blob:; media-src 'self' blob: data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SIMPLE_BODY_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
API_PATHS_OUTSIDE_V1 = ("/tokenize", "/detokenize")     # where llama.cpp and vLLM put them


def is_api_path(path: str) -> bool:
    """The API routes: /v1/... and the token-counting routes beside it. They share the key,
    Origin and Content-Type checks."""
    return path.startswith("/v1/") or path in API_PATHS_OUTSIDE_V1


class MisdirectedHost(AppError):
    status, code, type = 421, "misdirected_request", "invalid_request_error"


class ForbiddenOrigin(AppError):
    status, code, type = 403, "forbidden_origin", "invalid_request_error"


class UnsupportedMediaType(AppError):
    status, code, type = 415, "unsupported_media_type", "invalid_request_error"


def host_name(host: str) -> str:
    """'Example.com:8080' -> 'example.com'; '[::1]:8080' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _check_host(request: web.Request, cfg: AppConfig) -> None:
    extra = names(cfg.server.allowed_hosts)
    if not is_local_host(cfg.server.host) and not extra:
        return
    name = host_name(request.headers.get("Host", ""))
    if name not in LOOPBACK_NAMES and name not in extra:
        raise MisdirectedHost(f"this server does not answer for host {name[:100]!r} (add it to "
                              "server.allowed_hosts if a proxy forwards it)")


def _origin_allowed(origin: str, request: web.Request, cfg: AppConfig) -> bool:
    origin = origin.strip().lower().rstrip("/")
    own = f"{request.scheme}://{request.headers.get('Host', '')}".lower()
    cors = names(cfg.server.cors_origins)
    return origin == own or origin in names(cfg.server.allowed_origins) or origin in cors \
        or "*" in cors


def _check_body_type(request: web.Request) -> None:
    if request.method not in ("POST", "PUT", "PATCH") or not request.body_exists:
        return
    ctype = request.content_type.lower()
    if request.path == "/v1/uploads":
        if not ctype.startswith("multipart/form-data"):
            raise UnsupportedMediaType("send the file as multipart/form-data in a field named 'file'")
        return
    if ctype in SIMPLE_BODY_TYPES:
        raise UnsupportedMediaType(f"send JSON with Content-Type: application/json, not {ctype}")


def _cors_headers(request: web.Request, cfg: AppConfig) -> dict[str, str]:
    origin = request.headers.get("Origin")
    cors = names(cfg.server.cors_origins)
    if not origin or not cors or not ("*" in cors or origin.lower().rstrip("/") in cors):
        return {}
    return {"Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600"}


@web.middleware
async def security_middleware(request: web.Request, handler) -> web.StreamResponse:
    cfg = request.app[keys.CONFIG]
    _check_host(request, cfg)
    if is_api_path(request.path):
        origin = request.headers.get("Origin")
        if origin is not None and not _origin_allowed(origin, request, cfg):
            raise ForbiddenOrigin(f"requests from origin {origin[:100]!r} are not allowed "
                                  "(server.allowed_origins / server.cors_origins)")
        cors = _cors_headers(request, cfg)
        if request.method == "OPTIONS" and cors:
            return web.Response(status=204, headers=cors)
        if cors:
            request[CORS] = cors
    return await handler(request)


@web.middleware
async def body_type_middleware(request: web.Request, handler) -> web.StreamResponse:
    """415 for bodies a foreign page can send without a preflight (after the key check)."""
    if is_api_path(request.path):
        _check_body_type(request)
    return await handler(request)


CORS = "appliance_cors_headers"


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: every response, streamed ones and error pages included."""
    h = response.headers
    h["Server"] = SERVER_NAME
    h["X-Content-Type-Options"] = "nosniff"
    h["Referrer-Policy"] = "no-referrer"
    if not is_api_path(request.path) and request.path not in ("/metrics", "/health", "/ready"):
        h["Content-Security-Policy"] = CSP
        h["X-Frame-Options"] = "DENY"
    for k, v in request.get(CORS, {}).items():
        h[k] = v
