"""Server-side admission: at most `max_running` requests generate at once, at most `max_queue`
wait for a slot, and the next one is refused with QueueFull (HTTP 429 + Retry-After).

The engine's scheduler still decides batching and KV admission; this bounds the work the HTTP
layer accepts so a burst of clients queues briefly or is told to come back, never piles up.
"""
from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from runtime.api import QueueFull


class Admission:
    def __init__(self, max_running: int, max_queue: int, retry_after: float):
        self.max_running, self.max_queue, self.retry_after = max_running, max_queue, retry_after
        self.running = 0
        self.waiting = 0
        self._sem = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a generation slot for the body of the `async with`; QueueFull when the queue is full."""
        if self.running >= self.max_running and self.waiting >= self.max_queue:
            raise QueueFull(f"the server is busy ({self.running} requests running, {self.waiting} "
                            "waiting); retry later", retry_after=self.retry_after)
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._sem.release()
