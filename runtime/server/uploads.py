"""Uploaded media files: streamed to a private temp directory under a size cap, referenced as
`upload://<id>`, deleted when they expire and when the server shuts down.

Invariants: an id is 22 url-safe characters from `secrets` (never a path the client chose), a file
is registered only once it is complete, and a file over the cap is deleted before the error is
raised. Disk writes happen in the executor, in batches of WRITE_BATCH bytes.
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

from runtime.api import InvalidRequest, PayloadTooLarge

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


class UploadStore:
    def __init__(self, max_bytes: int, ttl_seconds: float, root: Path | None = None):
        self.max_bytes, self.ttl = max_bytes, ttl_seconds
        self.root = root
        self.dir: Path | None = None          # created by open() at start-up
        self._items: dict[str, Upload] = {}

    def open(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="appliance-uploads-", dir=self.root))

    async def save(self, part: BodyPartReader, executor: Executor) -> Upload:
        """Stream one multipart field to disk; PayloadTooLarge past max_bytes (partial file removed)."""
        if self.dir is None:
            raise RuntimeError("UploadStore.open() was not called")
        loop = asyncio.get_running_loop()
        uid = secrets.token_urlsafe(16)
        path = self.dir / uid
        fh = await loop.run_in_executor(executor, open, path, "wb")
        size, buf = 0, bytearray()
        try:
            while chunk := await part.read_chunk(256 * 1024):
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
        now = time.time()
        up = Upload(uid, path, size, (part.filename or "")[:200],
                    part.headers.get("Content-Type", "application/octet-stream")[:100], now, now + self.ttl)
        self._items[uid] = up
        return up

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
