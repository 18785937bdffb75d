"""Typed application state keys (aiohttp `web.AppKey`): everything the handlers share lives here."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path

from aiohttp import web

from runtime.api import EngineAPI
from runtime.config import AppConfig
from runtime.server.metrics import Metrics
from runtime.server.uploads import UploadStore

class Lifecycle:
    """Start-up and shutdown state the handlers consult (engine start runs in the background)."""

    def __init__(self) -> None:
        self.start_task: asyncio.Task | None = None
        self.start_error: str | None = None
        self.shutting_down = False
        self.created = time.time()


CONFIG = web.AppKey("config", AppConfig)
ENGINE = web.AppKey("engine", EngineAPI)
METRICS = web.AppKey("metrics", Metrics)
UPLOADS = web.AppKey("uploads", UploadStore)
WEB_DIR = web.AppKey("web_dir", Path)
STREAMS = web.AppKey("streams", set)                     # handler tasks generating right now
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
