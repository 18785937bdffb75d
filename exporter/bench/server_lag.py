"""Event-loop lag under load: the real aiohttp app (runtime.server.create_app, runtime.config
defaults, the real Engine) on a TCP port on 127.0.0.1; N streaming chat completions run while a
task measures how late `asyncio.sleep(interval)` wakes up. The client shares the server's event
loop (aiohttp's TestServer/TestClient), so its SSE parsing is part of the measured load."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np


async def _sample_lag(stop: asyncio.Event, interval: float, out: list[float]) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        await asyncio.sleep(interval)
        out.append(max(0.0, time.perf_counter() - t - interval))


async def _stream_one(client, model: str, text: str, max_tokens: int) -> tuple[int, int]:
    """(SSE chunks, cached prompt tokens the server reported in its usage chunk)."""
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    chunks, cached = 0, 0
    async with client.post("/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"chat completion answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                chunks += 1
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    cached += (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    return chunks, cached


def _summary(lags: list[float]) -> dict:
    a = np.asarray(lags) * 1e3
    if not a.size:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"samples": int(a.size), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


async def event_loop_lag(engine_dir: Path, threads: int, streams: int, max_tokens: int,
                         prompt_tokens: int, interval: float = 0.01, idle_seconds: float = 1.0) -> dict:
    """Lag percentiles idle (idle_seconds, engine started, no requests) and while `streams`
    streaming requests of max_tokens (distinct prompts of ~prompt_tokens) run."""
    from aiohttp.test_utils import TestClient, TestServer

    from exporter.bench.ours import CacheHit, fresh_prompts, load_engine, prefix_hits
    from runtime import config as cfgmod
    from runtime.__main__ import engine_config
    from runtime.server import create_app

    cfg = cfgmod.AppConfig(engine=str(engine_dir))
    engine = load_engine(engine_dir, threads, config=engine_config(cfg))
    texts = fresh_prompts(engine, prompt_tokens, streams)      # never seen: each stream prefills
    client = TestClient(TestServer(create_app(cfg, engine), host="127.0.0.1"))
    await client.start_server()
    try:
        for _ in range(600):                       # the engine starts in the background
            if (await client.get("/ready")).status == 200:
                break
            await asyncio.sleep(0.05)
        model = engine.model_name
        await _stream_one(client, model, "hello", 4)   # warm-up
        idle: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_lag(stop, interval, idle))
        await asyncio.sleep(idle_seconds)
        stop.set()
        await sampler
        loaded: list[float] = []
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_lag(stop, interval, loaded))
        start = time.perf_counter()
        hits0 = prefix_hits(engine)
        got = await asyncio.gather(*(_stream_one(client, model, texts[i], max_tokens)
                                     for i in range(streams)))
        wall = time.perf_counter() - start
        hits = prefix_hits(engine) - hits0
        stop.set()
        await sampler
    finally:
        await client.close()                       # runs the app's cleanup: engine.stop()
    cached = sum(c for _, c in got)
    if cached or hits:
        raise CacheHit(f"event-loop lag: {cached} prompt tokens / {hits} blocks from the prefix cache")
    return {"streams": streams, "max_tokens": max_tokens, "sse_chunks": int(sum(c for c, _ in got)),
            "cached_tokens": cached, "cold_checked": True,
            "seconds": wall, "interval_ms": interval * 1e3,
            "idle": _summary(idle), "loaded": _summary(loaded)}
