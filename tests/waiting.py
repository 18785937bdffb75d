"""Wait for a state instead of sleeping a fixed time: the suite runs on busy 2-core machines."""
from __future__ import annotations

import asyncio
import inspect
import time


async def wait_until(predicate, timeout: float = 20.0, interval: float = 0.005) -> bool:
    """Poll `predicate` (sync or async) until it is true or `timeout` seconds pass; returns its
    last value so callers can assert on it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return bool(value)
        await asyncio.sleep(interval)


async def server_ready(client) -> bool:
    return (await client.get("/ready")).status == 200


async def wait_ready(client, timeout: float = 20.0) -> None:
    """Wait for an aiohttp test client's server to answer /ready with 200 (the engine starts in
    the background)."""
    if not await wait_until(lambda: server_ready(client), timeout, interval=0.01):
        raise AssertionError("the server never became ready")
