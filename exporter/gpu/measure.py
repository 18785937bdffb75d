"""What `make gpu-check` measures on a served engine: load time, peak memory, decode tokens/s at
batch 1/8/16, time to first token for a 1024x1024 image and a 60 s clip, the host bytes a decode
step moves, and the roofline ratio at batch 1. Through the real Engine, as the server drives it."""
from __future__ import annotations

import asyncio
import io
import threading
import time
from pathlib import Path

import numpy as np

from runtime import manifest as mf
from runtime.api import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart, VideoPart
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.gpu_memory import gpu_memory_bytes


class PeakMemory:
    """Polls GPU memory (NVML) or, without a GPU, this process's RSS, every 50 ms."""

    def __init__(self, gpu: bool):
        import psutil
        self.gpu, self.proc, self.peak = gpu, psutil.Process(), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            used = gpu_memory_bytes() if self.gpu else self.proc.memory_info().rss
            self.peak = max(self.peak, used or 0)
            self._stop.wait(0.05)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def text_request(salt: int, max_tokens: int) -> GenerationRequest:
    words = f"request {salt}: " + " ".join(f"word{(salt * 7919 + i) % 997}" for i in range(48))  # unseen
    return GenerationRequest((ChatMessage("user", (TextPart(words),)),),
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True))


async def _drain(engine: Engine, req: GenerationRequest):
    usage = None
    async for delta in engine.generate(req):
        if delta.finish_reason == "error":
            raise RuntimeError("a gpu-check request failed")
        usage = delta.usage or usage
    return usage


async def decode_rate(engine: Engine, batch: int, tokens: int, salt: int) -> dict:
    """batch concurrent requests of `tokens` tokens each; aggregate decode tokens/s after the
    last first token (prefill excluded)."""
    start = time.perf_counter()
    usages = await asyncio.gather(*(_drain(engine, text_request(salt + i, tokens)) for i in range(batch)))
    wall = time.perf_counter() - start
    last_first = max(u.time_to_first_token for u in usages)
    decode_s = wall - last_first
    return {"batch": batch, "tokens_per_s": batch * (tokens - 1) / decode_s if decode_s > 0 else None,
            "step_ms": 1e3 * decode_s / (tokens - 1), "cached_tokens": sum(u.cached_tokens for u in usages)}


def test_image(side: int = 1024) -> bytes:
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (side, side), (245, 240, 230))
    draw = ImageDraw.Draw(img)
    draw.polygon([(side // 2, side // 8), (side // 8, side * 7 // 8), (side * 7 // 8, side * 7 // 8)],
                 fill=(220, 30, 30))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_clip(seconds: int = 60, fps: int = 10, size: tuple[int, int] = (320, 240)) -> bytes:
    """An H.264 clip of a moving square (needs PyAV)."""
    import av
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(seconds * fps):
            frame = np.full((size[1], size[0], 3), 235, np.uint8)
            x = (i * 3) % (size[0] - 40)
            frame[100:140, x:x + 40] = (30, 30, 220)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


async def ttft(engine: Engine, part) -> float:
    req = GenerationRequest((ChatMessage("user", (part, TextPart("What is this?"))),),
                            SamplingParams(max_tokens=1))
    return (await _drain(engine, req)).time_to_first_token


def vision_output_bytes(manifest: mf.Manifest, side: int = 1024) -> int:
    """Bytes vision_gpu hands back to the host for one side x side image: the merged embeddings
    and the DeepStack features (they stay host-side for now)."""
    pre = manifest.preprocessing
    tokens = (side // (pre.patch_size * pre.merge_size)) ** 2
    return tokens * (1 + len(pre.deepstack_indexes)) * manifest.hidden_size * np.dtype(manifest.dtype).itemsize


async def serve_and_measure(engine_dir: Path, gpu: bool, bandwidth_gb_s: float, batches=(1, 8, 16),
                            tokens: int = 32, log=print) -> dict:
    out: dict = {}
    with PeakMemory(gpu) as peak:
        t = time.perf_counter()
        engine = Engine.load(engine_dir, EngineConfig(verify_hashes=False))
        await engine.start()
        out["load_s"] = time.perf_counter() - t
        out["device"] = engine.pool.device
        out["kv_pool_bytes"] = engine.pool.nbytes()
        try:
            await _drain(engine, text_request(10_000, 4))                      # warm-up
            out["decode"] = []
            for i, b in enumerate(batches):
                row = await decode_rate(engine, b, tokens, salt=1000 * (i + 1))
                log(f"  decode batch {b}: {row['tokens_per_s']:.1f} tok/s ({row['step_ms']:.2f} ms/step)")
                out["decode"].append(row)
            await _drain(engine, text_request(20_000, 3))                      # ends on a decode step
            io_ = engine.runner.binding.last_io
            out["decode_step_host_bytes"] = {"in": io_.host_in_bytes, "out": io_.host_out_bytes}
            out["ttft_image_1024_s"] = await ttft(engine, ImagePart(test_image()))
            log(f"  time to first token, 1024x1024 image: {out['ttft_image_1024_s']:.3f} s")
            # 2 fps of 60 s is 60 frame pairs: at 320x240 ~4k prompt tokens, which a cpu-profile
            # engine's 4,096-token context cannot hold, so the CPU run uses a smaller frame
            size = (320, 240) if gpu else (160, 128)
            try:
                clip = test_clip(size=size)
                out["ttft_video_60s_s"] = await ttft(engine, VideoPart(data=clip))
                log(f"  time to first token, 60 s clip ({size[0]}x{size[1]}): {out['ttft_video_60s_s']:.3f} s")
            except Exception as e:  # noqa: BLE001 - a missing PyAV or a refusal is reported
                out["ttft_video_60s_s"] = f"skipped: {type(e).__name__}: {e}"
        finally:
            await engine.stop()
    out["peak_memory_bytes"] = peak.peak
    out["peak_memory_kind"] = "GPU (NVML)" if gpu else "process RSS"
    plan = engine.manifest.profile.get("memory_plan", {})
    weights = plan.get("weights_bytes", {}).get("decoder", 0)
    step_s = out["decode"][0]["step_ms"] / 1e3
    context = 60                                   # prompt + half the answer, tokens
    read = weights + context * engine.pool.bytes_per_token()
    out["roofline"] = {"bytes_per_step": read, "step_s": step_s, "bandwidth_gb_s": bandwidth_gb_s,
                       "ratio": (read / step_s) / (bandwidth_gb_s * 1e9) if bandwidth_gb_s else None}
    out["vision_output_bytes_1024"] = vision_output_bytes(engine.manifest)
    return out
