"""Everything but chat: models, health and readiness, Prometheus metrics, live stats, uploads, and
the web page (static files served only from the web directory)."""
from __future__ import annotations

from aiohttp import web

from runtime.api import InvalidRequest, NotReady
from runtime.server import keyframes, keys
from runtime.server.metrics import CONTENT_TYPE
from runtime.server.routes_chat import check_declared_length, check_ready

MULTIPART_SLACK = 64 * 1024            # headers and boundaries around the file itself


def _model_card(app: web.Application) -> dict:
    engine, cfg = app[keys.ENGINE], app[keys.CONFIG]
    return {"id": engine.model_name, "object": "model", "created": int(app[keys.LIFECYCLE].created),
            "owned_by": "appliance",
            "appliance": {"max_context": engine.max_context,
                          "max_side": cfg.media.max_side, "video_fps": cfg.media.video_fps,
                          "max_upload_bytes": cfg.limits.max_upload_bytes,
                          "max_body_bytes": cfg.limits.max_body_bytes,
                          "max_images_per_request": cfg.limits.max_images_per_request,
                          "max_video_frames": cfg.limits.max_video_frames,
                          "allow_remote_urls": cfg.media.allow_remote_urls}}


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_card(request.app)]})


async def get_model(request: web.Request) -> web.Response:
    card = _model_card(request.app)
    if request.match_info["model"] != card["id"]:
        raise web.HTTPNotFound()
    return web.json_response(card)


async def health(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP; 503 only when the engine failed to start (restart me)."""
    err = request.app[keys.LIFECYCLE].start_error
    if err:
        raise NotReady(f"the engine failed to start: {err}")
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: 503 until the engine is loaded and started, and again while shutting down."""
    check_ready(request.app)
    return web.json_response({"status": "ready", "model": request.app[keys.ENGINE].model_name})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[keys.METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def stats(request: web.Request) -> web.Response:
    app = request.app
    snap = app[keys.METRICS].snapshot()
    snap["model"] = app[keys.ENGINE].model_name
    snap["max_context"] = app[keys.ENGINE].max_context
    return web.json_response(snap)


async def create_upload(request: web.Request) -> web.Response:
    """multipart/form-data with one file field (named `file`); streamed to disk under the cap."""
    app = request.app
    store = app[keys.UPLOADS]
    check_declared_length(request, store.max_bytes + MULTIPART_SLACK,
                          "the upload (limits.max_upload_bytes)")
    if not request.content_type.startswith("multipart/"):
        raise InvalidRequest("send the file as multipart/form-data in a field named 'file'")
    reader = await request.multipart()
    async for part in reader:
        if part.name == "file" or (part.filename and part.name in (None, "", "video", "image")):
            up = await store.save(part, app[keys.ENGINE].executor,
                                  app[keys.CONFIG].server.body_timeout_seconds)
            return web.json_response(up.to_json())
    raise InvalidRequest("no file field in the upload (expected a multipart field named 'file')")


async def delete_upload(request: web.Request) -> web.Response:
    uid = request.match_info["upload_id"]
    if not request.app[keys.UPLOADS].delete(uid):
        raise web.HTTPNotFound()
    return web.json_response({"id": uid, "object": "upload", "deleted": True})


async def index(request: web.Request) -> web.FileResponse:
    page = request.app[keys.WEB_DIR] / "index.html"
    if not page.is_file():
        raise web.HTTPNotFound()
    return web.FileResponse(page, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model}", get_model)
    r.add_get("/health", health)
    r.add_get("/ready", ready)
    r.add_get("/metrics", metrics)
    r.add_get("/v1/stats", stats)
    r.add_post("/v1/uploads", create_upload)
    r.add_delete("/v1/uploads/{upload_id}", delete_upload)
    keyframes.add_routes(app)          # GET /v1/uploads/{upload_id}/keyframes
    r.add_get("/", index)
    # aiohttp's static route resolves paths and refuses anything outside the directory
    r.add_static("/static/", app[keys.WEB_DIR], show_index=False, follow_symlinks=False)
