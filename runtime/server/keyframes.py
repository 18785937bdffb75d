"""GET /v1/uploads/{id}/keyframes: what the model will see of an uploaded video.

The engine's own frame selection runs on the uploaded file (`engine.preview_video`, the same
frame selection and video params a chat request uses) in the engine's worker pool, never on the
event loop. The answer is small JSON: a strip of JPEG thumbnails (data URLs) with their times, one
timestamp per temporal pair, the grid and the visual token count:

    {"frames": [{"time": 0.0, "thumbnail": "data:image/jpeg;base64,..."}],
     "pairs": [{"timestamp": 0.25}], "grid_thw": [t, h, w], "visual_tokens": t*h*w/merge^2,
     "mode": "keyframes" | "seek", "frames_decoded": n, ...}

Invariants: one preview per upload id is computed at most once at a time (concurrent callers
share it) and kept while the upload lives (bounded LRU), so the page's strip and a later chat
request describe the same frames (the same file and params give the same selection). Failures
are not cached. Unknown or expired ids are 404; a file that is not a readable video is 400.
"""
from __future__ import annotations

import asyncio
import base64
from collections import OrderedDict
from aiohttp import web

from runtime.api import AppError, EngineAPI, InvalidRequest
from runtime.media.video import VideoInput
from runtime.server import keys
from runtime.server.uploads import Upload, UploadStore

MAX_ENTRIES = 64                       # previews kept; each is at most ~32 small JPEGs


class UploadNotFound(AppError):
    status, code, type = 404, "not_found", "invalid_request_error"


def preview_json(video: VideoInput) -> dict:
    """VideoInput -> the route's JSON (no pixel data but the thumbnails)."""
    t, h, w = video.grid_thw
    s = video.stats
    return {
        "object": "video.keyframes",
        "frames": [{"time": round(time, 3),
                    "thumbnail": "data:image/jpeg;base64," + base64.b64encode(jpeg).decode()}
                   for time, jpeg in video.thumbnails],
        "frame_times": [round(x, 3) for x in video.frame_times],
        "pairs": [{"timestamp": round(x, 3)} for x in video.timestamps],
        "grid_thw": [t, h, w],
        "size": list(video.size),
        "visual_tokens": video.num_tokens,
        "mode": s.mode,
        "frames_decoded": s.frames_decoded,
        "duration": round(s.duration, 3),
        "source_fps": round(s.source_fps, 3),
        "content_hash": video.content_hash,
    }


async def _compute(engine: EngineAPI, path: str) -> dict:
    """Decode and select in the engine's pool, then shape the JSON there too (base64)."""
    video = await engine.preview_video(path)
    return await asyncio.get_running_loop().run_in_executor(engine.executor, preview_json, video)


class KeyframePreviews:
    """Per-upload preview cache: upload id -> a future of the preview JSON (LRU-bounded)."""

    def __init__(self, max_entries: int = MAX_ENTRIES):
        self.max_entries = max_entries
        self._items: OrderedDict[str, asyncio.Future] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    async def get(self, upload: Upload, engine: EngineAPI) -> dict:
        fut = self._items.get(upload.id)
        if fut is None:
            fut = asyncio.ensure_future(_compute(engine, str(upload.path)))
            self._items[upload.id] = fut
            fut.add_done_callback(lambda f, uid=upload.id: self._forget_failed(uid, f))
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(upload.id)
        return await asyncio.shield(fut)     # a caller that leaves does not cancel the others

    def _forget_failed(self, uid: str, fut: asyncio.Future) -> None:
        if (fut.cancelled() or fut.exception() is not None) and self._items.get(uid) is fut:
            del self._items[uid]

    def prune(self, store: UploadStore) -> None:
        """Drop previews of uploads that were deleted or expired."""
        for uid in list(self._items):
            try:
                store.resolve(uid)
            except InvalidRequest:
                del self._items[uid]


PREVIEWS = web.AppKey("keyframe_previews", KeyframePreviews)


async def get_keyframes(request: web.Request) -> web.Response:
    app = request.app
    uid = request.match_info["upload_id"]
    store = app[keys.UPLOADS]
    try:
        upload = store.resolve(uid)
    except InvalidRequest:
        raise UploadNotFound(f"unknown or expired upload {uid[:80]!r}; upload the file again") from None
    previews = app[PREVIEWS]
    previews.prune(store)
    body = await previews.get(upload, app[keys.ENGINE])
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    app[PREVIEWS] = KeyframePreviews()
    app.router.add_get("/v1/uploads/{upload_id}/keyframes", get_keyframes)
