"""The video benchmark's clips: deterministic moving test pictures, encoded once with PyAV's own
encoders (libx264, libvpx-vp9) into a cache directory and reused.

    bench_clips(directory, gops=(15, 60, 250), vp9_gop=60, seconds=20) -> [Clip, ...]
"""
from __future__ import annotations

import dataclasses
import os

import av
import numpy as np

FPS, WIDTH, HEIGHT = 30, 1280, 720


@dataclasses.dataclass(frozen=True)
class Clip:
    name: str              # the benchmark row's key, e.g. "h264 gop=60"
    path: str
    description: str


def _frames(seconds: int):
    """A panning gradient with a bar sweeping down: every pixel moves every frame."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(xx * 255 // WIDTH), (yy * 255 // HEIGHT), ((xx + yy) % 256)], -1)
    base = base.astype(np.uint8)
    for i in range(seconds * FPS):
        img = np.roll(base, 8 * i, axis=1)
        img[(i * 4) % HEIGHT:(i * 4) % HEIGHT + 40] = 255
        yield av.VideoFrame.from_ndarray(img, format="rgb24")


def _encode(path: str, container: str, codec: str, options: dict, seconds: int) -> None:
    tmp = path + ".part"
    with av.open(tmp, "w", format=container) as out:
        stream = out.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = options
        for frame in _frames(seconds):
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    os.replace(tmp, path)                     # an interrupted encode never leaves a short clip


def encode_bench_clip(path: str, gop: int, seconds: int = 20) -> None:
    """H.264 (libx264 veryfast, crf 23, B-frames), a keyframe exactly every `gop` frames."""
    _encode(path, "mp4", "libx264", {"preset": "veryfast", "crf": "23",
                                     "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"},
            seconds)


def encode_vp9_clip(path: str, gop: int, seconds: int = 20) -> None:
    """VP9 in WebM (libvpx-vp9 realtime, cpu-used 8, crf 32), a keyframe every `gop` frames."""
    _encode(path, "webm", "libvpx-vp9", {"deadline": "realtime", "cpu-used": "8", "crf": "32",
                                         "b": "0", "g": str(gop), "keyint_min": str(gop),
                                         "row-mt": "1"}, seconds)


def bench_clips(directory: str, gops: tuple[int, ...] = (15, 60, 250), vp9_gop: int | None = 60,
                seconds: int = 20) -> list[Clip]:
    """The clips, encoded into `directory` unless already there (names carry every setting)."""
    os.makedirs(directory, exist_ok=True)
    size = f"{WIDTH}x{HEIGHT} {FPS} fps {seconds} s"
    clips = []
    for gop in gops:
        path = os.path.join(directory, f"h264_gop{gop}_{seconds}s.mp4")
        if not os.path.exists(path):
            encode_bench_clip(path, gop, seconds)
        clips.append(Clip(f"h264 gop={gop}", path, f"H.264 (libx264 veryfast, B-frames) {size}"))
    if vp9_gop:
        path = os.path.join(directory, f"vp9_gop{vp9_gop}_{seconds}s.webm")
        if not os.path.exists(path):
            encode_vp9_clip(path, vp9_gop, seconds)
        clips.append(Clip(f"vp9 gop={vp9_gop}", path, f"VP9 (libvpx-vp9 realtime) WebM {size}"))
    return clips
