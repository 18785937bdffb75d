"""Which replica answered: every response carries `X-Replica`, so chat affinity behind a load
balancer is observable (README, "Scaling past one GPU").

The affinity key itself is the client's: the page sends `X-Conversation-Id` (a new id per chat)
with every request of a chat, and a load balancer hashes it (build/deploy/nginx.conf.template). The
appliance needs nothing from the key to serve; it echoes it back so a client can check what the
balancer saw. OpenAI's `user` body field is accepted and ignored by the chat route; a balancer that
does not read bodies (nginx) cannot route on it, so API clients send the header.

The name is `server.replica_name` when set (Kubernetes passes the pod name), else
`<host name>:<port the request arrived on>`, which tells apart appliances sharing one machine.
The header is added in aiohttp's `on_response_prepare` signal rather than a middleware, because
a streamed answer sends its headers from inside the handler (`StreamResponse.prepare`), before a
middleware would see the response; the signal fires for every response, errors and static files
included.
"""
from __future__ import annotations

import socket

from aiohttp import web

from runtime.server import keys

REPLICA_HEADER = "X-Replica"
CONVERSATION_HEADER = "X-Conversation-Id"
MAX_CONVERSATION_ID = 128              # longer ids are not echoed (they still route)


def replica_name(request: web.Request) -> str:
    configured = request.app[keys.CONFIG].server.replica_name
    if configured:
        return configured
    port = request.app[keys.CONFIG].server.port
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if isinstance(sock, tuple) and len(sock) >= 2:
        port = sock[1]
    return f"{socket.gethostname()}:{port}"


async def _name_the_replica(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REPLICA_HEADER] = replica_name(request)
    conversation = request.headers.get(CONVERSATION_HEADER, "")
    if conversation and len(conversation) <= MAX_CONVERSATION_ID and conversation.isprintable():
        response.headers[CONVERSATION_HEADER] = conversation


def install(app: web.Application) -> None:
    app.on_response_prepare.append(_name_the_replica)
