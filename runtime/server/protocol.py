"""The HTTP connection layer under the app: malformed requests answered in OpenAI's JSON error
shape (not aiohttp's text/plain) and logged as one INFO line (no traceback), and a deadline for
headers.

aiohttp answers framing errors (`Content-Length: -5`, both Content-Length and Transfer-Encoding,
an over-long header line) in `RequestHandler.handle_error` before any middleware runs, so this
overrides that one method. Headers that never end: aiohttp closes a connection that has not sent a
complete request within `keepalive_timeout` of connecting or of its last response, which is set
to `server.header_timeout_seconds`. (Bodies that never end are timed out where they are read:
routes_chat.read_json and the upload route.)
"""
from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from runtime.config import ServerConfig
from runtime.server.openai_format import error_body
from runtime.server.security import SERVER_NAME

log = logging.getLogger("runtime.server")


class _JSONErrorHandler(RequestHandler):
    def handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        reason = getattr(exc, "message", None) or message or type(exc).__name__
        if status >= 500:
            log.error("error handling a request from %s: %s", request.remote, reason)
        else:
            log.info("malformed request from %s: %s", request.remote, reason)
        if request.writer.output_size > 0:          # the answer had begun: just drop the line
            raise ConnectionError("response already started")
        code = "bad_request" if status < 500 else "internal_error"
        kind = "invalid_request_error" if status < 500 else "server_error"
        text = ("malformed HTTP request: " + str(reason)[:200]) if status < 500 else \
            "internal server error; see the server log"
        resp = web.Response(status=status, content_type="application/json",
                            text=json.dumps(error_body(message=text, type_=kind, code=code)),
                            headers={"Server": SERVER_NAME, "X-Content-Type-Options": "nosniff"})
        resp.force_close()
        return resp


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _JSONErrorHandler(self, loop=self._loop, **self._kwargs)


class ApplianceRunner(web.AppRunner):
    def __init__(self, app: web.Application, server: ServerConfig, **kwargs) -> None:
        # lingering_time bounds how long an unread body is drained after an early answer (413)
        super().__init__(app, keepalive_timeout=server.header_timeout_seconds,
                         lingering_time=1.0, **kwargs)

    async def _make_server(self) -> web.Server:
        srv = await super()._make_server()
        srv.__class__ = _Server                     # the same server, our connection handler
        return srv
