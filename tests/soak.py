"""`make soak`: N minutes of mixed traffic against a served engine (not part of `make test`).

    python -m tests.soak --engine build/engines/default --minutes 10 [--clients 6]

Starts `python -m runtime serve` on a free port, then drives it with concurrent clients mixing
text and image chats, streams, streams cancelled mid-way, uploads (+ keyframe previews of videos)
and bad requests; every 15 s it samples the server's RSS, open fds, KV blocks in use (at a quiet
moment) and latency. Fails (exit 1) on any 5xx, on KV blocks still held after the traffic
stops, or on RSS/fd growth past the bounds after a warm-up quarter; prints a table either way.
(With every image distinct, RSS climbs until the 256 MiB vision cache is full: that is the cache's
budget, not a leak, hence the repeating images.)
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import time

import aiohttp
import psutil
from PIL import Image

RSS_GROWTH_BOUND = 1.2        # last RSS sample / the sample after the warm-up quarter of the run
FD_GROWTH_BOUND = 32          # open fds beyond that sample
DISTINCT_IMAGES = 32          # images repeat, as in real chats, so the bounded caches (vision
                              # embeddings, decoded media; 256 MiB each by default) fill during
                              # the warm-up and any later growth is a leak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_url(rng: random.Random) -> str:
    """A PNG data URL of a random size and colour."""
    buf = io.BytesIO()
    Image.new("RGB", (rng.randint(32, 300), rng.randint(32, 300)),
              tuple(rng.randint(0, 255) for _ in range(3))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


IMAGES = [png_url(random.Random(i)) for i in range(DISTINCT_IMAGES)]


class Tally:
    def __init__(self):
        self.status: dict[int, int] = {}
        self.latency: list[float] = []

    def count(self, status: int, seconds: float | None = None) -> None:
        self.status[status] = self.status.get(status, 0) + 1
        if seconds is not None:
            self.latency.append(seconds)


async def one(session: aiohttp.ClientSession, base: str, rng: random.Random, tally: Tally) -> None:
    kind = rng.choice(["text", "image", "stream", "cancel", "upload", "bad"])
    t0 = time.monotonic()
    content: object = rng.choice(["Hello", "What shape is this?", "Describe the picture."])
    if kind == "image":
        content = [{"type": "image_url", "image_url": {"url": rng.choice(IMAGES)}},
                   {"type": "text", "text": "What is it?"}]
    body = {"model": "default", "max_tokens": rng.randint(1, 24), "messages": [{"role": "user", "content": content}]}
    if kind in ("text", "image"):
        async with session.post(base + "/v1/chat/completions", json=body) as r:
            await r.read()
            tally.count(r.status, time.monotonic() - t0)
    elif kind in ("stream", "cancel"):
        async with session.post(base + "/v1/chat/completions", json={**body, "stream": True}) as r:
            if kind == "cancel":
                await r.content.readany()
                r.close()
            else:
                await r.read()
            tally.count(r.status, time.monotonic() - t0)
    elif kind == "upload":
        form = aiohttp.FormData()
        form.add_field("file", os.urandom(rng.randint(1, 50_000)), filename="x.bin")
        async with session.post(base + "/v1/uploads", data=form) as r:
            tally.count(r.status)
    else:
        async with session.post(base + "/v1/chat/completions", data=b"{not json",
                                headers={"Content-Type": "application/json"}) as r:
            tally.count(r.status)


async def client(base: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < until:
            try:
                await one(session, base, rng, tally)
            except aiohttp.ClientError:
                tally.count(0)


async def stats(base: str) -> dict:
    async with aiohttp.ClientSession() as s, s.get(base + "/v1/stats") as r:
        return await r.json()


async def run(args) -> int:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "runtime", "serve", "--engine", args.engine,
                             "--port", str(port), "--log-level", "warning"])
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                try:
                    async with s.get(base + "/ready") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        server = psutil.Process(proc.pid)
        tally, samples = Tally(), []
        until = time.monotonic() + args.minutes * 60
        clients = [asyncio.create_task(client(base, i, until, tally)) for i in range(args.clients)]
        while time.monotonic() < until:
            await asyncio.sleep(min(15, max(0.1, until - time.monotonic())))
            st = await stats(base)
            samples.append((time.monotonic(), server.memory_info().rss, server.num_fds(),
                            st["kv_blocks_used"], sum(tally.status.values())))
        await asyncio.gather(*clients)
        await asyncio.sleep(1.0)
        final = await stats(base)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{'t s':>6} {'RSS MiB':>9} {'fds':>5} {'KV used':>8} {'requests':>9}")
    t0 = samples[0][0] if samples else 0
    for t, rss, fds, kv, n in samples:
        print(f"{t - t0:6.0f} {rss / 2**20:9.1f} {fds:5d} {kv:8d} {n:9d}")
    lat = sorted(tally.latency)
    if lat:
        print(f"latency s: p50 {statistics.median(lat):.3f}  p99 {lat[int(0.99 * (len(lat) - 1))]:.3f}")
    print("status counts:", dict(sorted(tally.status.items())))
    failures = []
    if any(s >= 500 or s == 0 for s in tally.status):
        failures.append("5xx or connection errors")
    if final["kv_blocks_used"] != 0:
        failures.append(f"{final['kv_blocks_used']} KV blocks still held after the traffic")
    if len(samples) >= 3:
        base_rss, base_fds = samples[len(samples) // 4][1], samples[len(samples) // 4][2]
        if samples[-1][1] > RSS_GROWTH_BOUND * base_rss:
            failures.append("RSS grew past the bound")
        if samples[-1][2] > base_fds + FD_GROWTH_BOUND:
            failures.append("open fds grew past the bound")
    print("soak:", "FAILED: " + "; ".join(failures) if failures else "clean")
    return 1 if failures else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", default="build/engines/default")
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=6)
    return asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
