"""Uploaded media files: streamed to a private temp directory under a size cap, referenced as
`upload://<id>`, deleted when they expire and when the server shuts down.

Invariants: an id is 22 url-safe characters from `secrets` (never a path the client chose), a file
is registered only once it is complete, and a file over the cap is deleted before the error is
raised. Disk writes happen in the executor, in batches of WRITE_BATCH bytes. All stored uploads
together stay within `max_total_bytes` and `max_count`: a new upload makes room by deleting the
oldest ones first. A body that stalls for `idle_timeout` seconds ends the upload (408).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import shutil
import tempfile
import time
from concurrent.futures import Executor
from pathlib import Path

from aiohttp import BodyPartReader

from runtime.api import AppError, InvalidRequest, PayloadTooLarge

log = logging.getLogger("runtime.server.uploads")
WRITE_BATCH = 1 << 20
ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
SCHEME = "upload://"


@dataclasses.dataclass(frozen=True)
class Upload:
    id: str
    path: Path
    bytes: int
    filename: str
    content_type: str
    created_at: float
    expires_at: float

    def to_json(self) -> dict:
        return {"id": self.id, "object": "upload", "url": SCHEME + self.id, "bytes": self.bytes,
                "filename": self.filename, "content_type": self.content_type,
                "created_at": int(self.created_at), "expires_at": int(self.expires_at)}


class UploadTimeout(AppError):
    status, code, type = 408, "request_timeout", "invalid_request_error"


class UploadStore:
    def __init__(self, max_bytes: int, ttl_seconds: float, root: Path | None = None, *,
                 max_total_bytes: int | None = None, max_count: int | None = None):
        self.max_bytes, self.ttl = max_bytes, ttl_seconds
        self.max_total_bytes = max_total_bytes if max_total_bytes is not None else 8 * max_bytes
        self.max_count = max_count if max_count is not None else 64
        self.root = root
        self.dir: Path | None = None          # created by open() at start-up
        self._items: dict[str, Upload] = {}

    def open(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="appliance-uploads-", dir=self.root))

    async def save(self, part: BodyPartReader, executor: Executor,
                   idle_timeout: float = 60.0) -> Upload:
        """Stream one multipart field to disk; PayloadTooLarge past max_bytes (partial file removed)."""
        if self.dir is None:
            raise RuntimeError("UploadStore.open() was not called")
        loop = asyncio.get_running_loop()
        uid = secrets.token_urlsafe(16)
        path = self.dir / uid
        fh = await loop.run_in_executor(executor, open, path, "wb")
        size, buf = 0, bytearray()
        try:
            while chunk := await self._next_chunk(part, idle_timeout):
                size += len(chunk)
                if size > self.max_bytes:
                    raise PayloadTooLarge(f"upload exceeds limits.max_upload_bytes ({self.max_bytes} bytes)")
                buf += chunk
                if len(buf) >= WRITE_BATCH:
                    data, buf = bytes(buf), bytearray()
                    await loop.run_in_executor(executor, fh.write, data)
            if buf:
                await loop.run_in_executor(executor, fh.write, bytes(buf))
        except BaseException:
            await loop.run_in_executor(executor, fh.close)
            path.unlink(missing_ok=True)
            raise
        await loop.run_in_executor(executor, fh.close)
        if size == 0:
            path.unlink(missing_ok=True)
            raise InvalidRequest("the uploaded file is empty")
        self._make_room(size)
        now = time.time()
        up = Upload(uid, path, size, (part.filename or "")[:200],
                    part.headers.get("Content-Type", "application/octet-stream")[:100], now, now + self.ttl)
        self._items[uid] = up
        return up

    @staticmethod
    async def _next_chunk(part: BodyPartReader, idle_timeout: float) -> bytes:
        try:
            async with asyncio.timeout(idle_timeout):
                return await part.read_chunk(256 * 1024)
        except TimeoutError:
            raise UploadTimeout(f"the upload stalled for {idle_timeout:g} s") from None

    @property
    def total_bytes(self) -> int:
        return sum(u.bytes for u in self._items.values())

    def _make_room(self, size: int) -> None:
        """Delete the oldest uploads until one more of `size` bytes fits the quota."""
        by_age = sorted(self._items.values(), key=lambda u: u.created_at)
        total = self.total_bytes
        while by_age and (total + size > self.max_total_bytes or
                          len(self._items) + 1 > self.max_count):
            old = by_age.pop(0)
            total -= old.bytes
            self.delete(old.id)
            log.info("upload quota: deleted the oldest upload %s (%d bytes)", old.id, old.bytes)

    def resolve(self, ref: str) -> Upload:
        """`upload://<id>` or a bare id -> the live Upload; InvalidRequest when unknown or expired."""
        uid = ref[len(SCHEME):] if ref.startswith(SCHEME) else ref
        up = self._items.get(uid) if ID_RE.match(uid) else None
        if up is None or up.expires_at < time.time():
            raise InvalidRequest(f"unknown or expired upload {ref[:80]!r}; upload the file again")
        return up

    def delete(self, uid: str) -> bool:
        up = self._items.pop(uid, None)
        if up:
            up.path.unlink(missing_ok=True)
        return up is not None

    def expire(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        dead = [u for u, up in self._items.items() if up.expires_at < now]
        for uid in dead:
            self.delete(uid)
        return len(dead)

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        """Delete every upload and the directory (shutdown)."""
        self._items.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    async def sweep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            n = self.expire()
            if n:
                log.info("deleted %d expired upload(s)", n)
