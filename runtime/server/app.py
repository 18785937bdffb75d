"""The app factory: `create_app(config, engine) -> web.Application`, and `serve()` for the CLI.

Life cycle (aiohttp `cleanup_ctx`, set up in order, torn down in reverse):
  uploads (temp dir + expiry sweeper) -> engine (`start()` in the background: the engine loads
  its sessions there, so the port is open at once, /health answers and /ready says 503 until the
  engine is up; `stop()` on the way out, which also releases the one media worker pool).
On SIGTERM `serve()` keeps listening while /ready answers 503 and new chat requests are refused,
gives running streams `server.shutdown_grace_seconds` to finish and cancels the rest (closing
their engine iterators frees their KV blocks); then it stops listening and the contexts above
unwind: engine stopped, uploads deleted.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from runtime.api import EngineAPI
from runtime.config import AppConfig, check_exposure
from runtime.server import (keys, replica, routes_chat, routes_completions, routes_misc,
                            routes_tokenize)
from runtime.server.metrics import Metrics
from runtime.server.middleware import auth_middleware, error_middleware
from runtime.server.protocol import ApplianceRunner
from runtime.server.security import add_security_headers, body_type_middleware, security_middleware
from runtime.server.uploads import UploadStore

log = logging.getLogger("runtime.server")
WEB_DIR = Path(__file__).resolve().parents[2] / "web"


def create_app(config: AppConfig, engine: EngineAPI, *, web_dir: Path | None = None) -> web.Application:
    app = web.Application(client_max_size=config.limits.max_body_bytes,
                          middlewares=[error_middleware, security_middleware, auth_middleware,
                                       body_type_middleware])
    app[keys.CONFIG] = config
    app[keys.ENGINE] = engine
    app[keys.METRICS] = Metrics(engine.stats)
    lim = config.limits
    app[keys.UPLOADS] = UploadStore(lim.max_upload_bytes, lim.upload_ttl_seconds,
                                    max_total_bytes=lim.max_stored_upload_bytes,
                                    max_count=lim.max_stored_uploads)
    app[keys.WEB_DIR] = Path(web_dir or WEB_DIR).resolve()
    app[keys.STREAMS] = set()
    app[keys.LIFECYCLE] = keys.Lifecycle()
    app.cleanup_ctx.extend([_uploads_ctx, _engine_ctx])
    app.on_shutdown.append(_drain_streams)
    app.on_response_prepare.append(add_security_headers)
    routes_chat.add_routes(app)
    routes_completions.add_routes(app)
    routes_tokenize.add_routes(app)
    routes_misc.add_routes(app)
    replica.install(app)                # X-Replica on every response (load-balancer affinity)
    return app


async def _uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    store = app[keys.UPLOADS]
    store.open()
    sweeper = asyncio.create_task(store.sweep_forever(max(1.0, min(60.0, store.ttl / 4))))
    try:
        yield
    finally:
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        store.close()


async def _start_engine(engine: EngineAPI, life: keys.Lifecycle) -> None:
    try:
        await engine.start()
        log.info("engine %s ready", engine.model_name)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        log.exception("the engine failed to start")
        life.start_error = str(e) or type(e).__name__


async def _engine_ctx(app: web.Application) -> AsyncIterator[None]:
    engine, life = app[keys.ENGINE], app[keys.LIFECYCLE]
    life.start_task = asyncio.create_task(_start_engine(engine, life))
    try:
        yield
    finally:
        life.shutting_down = True
        if life.start_task is not None and not life.start_task.done():
            life.start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await life.start_task
        try:
            await engine.stop()
        except Exception:
            log.exception("engine.stop() failed")


async def _drain_streams(app: web.Application) -> None:
    """Refuse new requests, let running ones finish for the grace period, cancel the rest."""
    app[keys.LIFECYCLE].shutting_down = True
    tasks = {t for t in app[keys.STREAMS] if not t.done()}
    if not tasks:
        return
    grace = app[keys.CONFIG].server.shutdown_grace_seconds
    log.info("shutting down: waiting up to %.1f s for %d running request(s)", grace, len(tasks))
    _, pending = await asyncio.wait(tasks, timeout=grace)
    for t in pending:
        t.cancel()
    if pending:
        log.info("cancelled %d request(s) still running after the grace period", len(pending))
        await asyncio.wait(pending, timeout=5.0)


def make_runner(app: web.Application, config: AppConfig) -> ApplianceRunner:
    """The runner `serve` uses (tests start it on port 0): JSON errors for malformed HTTP,
    slow-client timeouts, a client that leaves cancels its handler."""
    return ApplianceRunner(app, config.server, handler_cancellation=True,
                           access_log_format='%a "%r" %s %b %Tfs')


async def serve_until(app: web.Application, config: AppConfig, stop: asyncio.Event,
                      on_started=None, stop_on_start_error: bool = False) -> None:
    """Listen now (the engine loads in the background), serve until `stop` is set, then drain:
    /ready and new chat requests answer 503 while running streams get their grace period, and
    only then does the listener close."""
    runner = make_runner(app, config)
    await runner.setup()
    site = web.TCPSite(runner, config.server.host, config.server.port)
    await site.start()
    if on_started is not None:
        on_started(runner)
    log.info("listening on http://%s:%d", config.server.host, config.server.port)
    life = app[keys.LIFECYCLE]
    if stop_on_start_error and life.start_task is not None:
        life.start_task.add_done_callback(lambda _: life.start_error and stop.set())
    try:
        await stop.wait()
        await _drain_streams(app)
    finally:
        await runner.cleanup()


def serve(config: AppConfig, engine: EngineAPI) -> str | None:
    """Run until SIGINT/SIGTERM. Refuses a non-loopback bind without an API key. Returns the
    engine's start-up error when it could not start (the process should exit non-zero)."""
    check_exposure(config)
    app = create_app(config, engine)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_until(app, config, stop, stop_on_start_error=True)

    asyncio.run(main())
    return app[keys.LIFECYCLE].start_error
