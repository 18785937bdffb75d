"""The app factory: `create_app(config, engine) -> web.Application`, and `serve()` for the CLI.

Life cycle (aiohttp `cleanup_ctx`, set up in order, torn down in reverse):
  executor -> uploads (temp dir + expiry sweeper) -> engine (`start()` in the background, so
  /health answers at once and /ready says 503 until the engine is up; `stop()` on the way out).
On SIGTERM `web.run_app` stops listening, then `on_shutdown` gives running streams
`server.shutdown_grace_seconds` to finish and cancels the rest (which closes their engine
iterators, freeing KV blocks), then the contexts above unwind: engine stopped, uploads deleted.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from aiohttp import web

from runtime.api import EngineAPI
from runtime.config import AppConfig, check_exposure
from runtime.server import keys, replica, routes_chat, routes_misc
from runtime.server.admission import Admission
from runtime.server.metrics import Metrics
from runtime.server.middleware import auth_middleware, error_middleware
from runtime.server.uploads import UploadStore

log = logging.getLogger("runtime.server")
WEB_DIR = Path(__file__).resolve().parents[2] / "web"
MEDIA_THREADS = 2


def create_app(config: AppConfig, engine: EngineAPI, *, web_dir: Path | None = None) -> web.Application:
    app = web.Application(client_max_size=config.limits.max_body_bytes,
                          middlewares=[error_middleware, auth_middleware])
    admission = Admission(config.limits.max_concurrency, config.limits.max_queue,
                          config.limits.retry_after_seconds)
    app[keys.CONFIG] = config
    app[keys.ENGINE] = engine
    app[keys.ADMISSION] = admission
    app[keys.METRICS] = Metrics(engine.stats, lambda: admission.waiting)
    app[keys.UPLOADS] = UploadStore(config.limits.max_upload_bytes, config.limits.upload_ttl_seconds)
    app[keys.EXECUTOR] = ThreadPoolExecutor(MEDIA_THREADS, thread_name_prefix="appliance-media")
    app[keys.WEB_DIR] = Path(web_dir or WEB_DIR).resolve()
    app[keys.STREAMS] = set()
    app[keys.LIFECYCLE] = keys.Lifecycle()
    app.cleanup_ctx.extend([_executor_ctx, _uploads_ctx, _engine_ctx])
    app.on_shutdown.append(_drain_streams)
    routes_chat.add_routes(app)
    routes_misc.add_routes(app)
    replica.install(app)                # X-Replica on every response (load-balancer affinity)
    return app


async def _executor_ctx(app: web.Application) -> AsyncIterator[None]:
    yield
    app[keys.EXECUTOR].shutdown(wait=False, cancel_futures=True)


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
    if hasattr(engine, "start"):
        life.start_task = asyncio.create_task(_start_engine(engine, life))
    try:
        yield
    finally:
        life.shutting_down = True
        if life.start_task is not None and not life.start_task.done():
            life.start_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await life.start_task
        if hasattr(engine, "stop"):
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


def serve(config: AppConfig, engine: EngineAPI) -> None:
    """Run until SIGINT/SIGTERM. Refuses a non-loopback bind without an API key."""
    check_exposure(config)
    app = create_app(config, engine)
    web.run_app(app, host=config.server.host, port=config.server.port,
                handler_cancellation=True,                      # a client that leaves cancels its request
                shutdown_timeout=config.server.shutdown_grace_seconds + 5.0,
                access_log_format='%a "%r" %s %b %Tfs', print=lambda msg: log.info("%s", msg))
