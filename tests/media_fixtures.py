"""Tiny test clips encoded with PyAV, and helpers to read frames back out of a VideoInput.

Every frame carries its index as 8 bits in big black/white blocks along the top half of the
picture (bit 0 leftmost), so a test can tell which source frame was selected after decoding and
resizing. The bottom-left quarter is always white and the bottom-right always black, which makes
rotation visible.
"""
from __future__ import annotations

import io
import os
import wave
from fractions import Fraction

import av
import numpy as np

os.environ.setdefault("SVT_LOG", "1")      # SVT-AV1 prints its banner otherwise


def frame_pattern(index: int, width: int, height: int, static: bool = False) -> np.ndarray:
    """RGB uint8 [H, W, 3] encoding `index` (0-255) in 8 blocks across the top half."""
    img = np.full((height, width, 3), 128, np.uint8)
    if not static:
        cols = np.linspace(0, width, 9).astype(int)
        for bit in range(8):
            if (index >> bit) & 1:
                img[: height // 2, cols[bit]:cols[bit + 1]] = 255
            else:
                img[: height // 2, cols[bit]:cols[bit + 1]] = 0
    img[height // 2:, : width // 2] = 255
    img[height // 2:, width // 2:] = 0
    return img


def read_index(rgb: np.ndarray) -> int:
    """Inverse of `frame_pattern` on an upright (possibly resized) RGB frame."""
    h, w = rgb.shape[:2]
    grey = rgb.astype(np.float32).mean(axis=-1)
    centres = ((np.arange(8) + 0.5) * w / 8).astype(int)
    row = grey[h // 4, centres]
    return int(sum(1 << bit for bit in range(8) if row[bit] > 128))


def encode_clip(*, fmt: str = "mp4", codec: str = "libx264", width: int = 64, height: int = 48,
                fps: int = 10, frames: int = 30, gop: int | None = None,
                options: dict | None = None, rotation: int | None = None,
                times: list[float] | None = None, static: bool = False,
                path: str | None = None, container_options: dict | None = None,
                pix_fmt: str = "yuv420p") -> bytes:
    """Encode a clip and return its bytes (also written to `path` when given). `times` (seconds)
    makes a variable-frame-rate clip with exactly those presentation times."""
    if codec == "libx264" and options is None:
        options = {"preset": "ultrafast", "tune": "zerolatency"}
    if codec == "libx265" and options is None:
        options = {"preset": "ultrafast", "x265-params": "log-level=none"}
    if codec == "libvpx-vp9" and options is None:
        options = {"deadline": "realtime", "cpu-used": "8"}
    if codec == "libsvtav1" and options is None:
        options = {"preset": "12"}
    target = path or io.BytesIO()
    n = len(times) if times is not None else frames
    with av.open(target, "w", format=fmt, options=container_options or {}) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if gop:
            stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i % 256, width, height, static),
                                               format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    if path:
        with open(path, "rb") as f:
            return f.read()
    return target.getvalue()


def encode_frames(frames, fps: int) -> bytes:
    """Given frames (PIL images or uint8 RGB arrays) as a lossless H.264 MP4 (yuv444, every frame
    a keyframe), so decoded frames equal the originals up to colour-conversion rounding."""
    arrays = [np.asarray(f.convert("RGB") if hasattr(f, "convert") else f, np.uint8) for f in frames]
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.height, stream.width = arrays[0].shape[:2]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast", "g": "1"}
        for a in arrays:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(a, format="rgb24").reformat(format="yuv444p")))
        out.mux(stream.encode())
    return buf.getvalue()


def encoder_available(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def corrupt_stream_clip() -> bytes:
    """A valid Matroska container (real H.264 headers, timing and keyframe flags) whose packets
    are random bytes of the original sizes."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(io.BytesIO(encode_clip(frames=40, fps=10, gop=10))) as src, \
            av.open(buf, "w", format="matroska") as out:
        source = src.streams.video[0]
        target = out.add_stream_from_template(source)
        for packet in src.demux(source):
            if not packet.size:
                continue
            garbage = av.Packet(rng.bytes(packet.size))
            garbage.pts, garbage.dts = packet.pts, packet.dts
            garbage.time_base, garbage.is_keyframe = packet.time_base, packet.is_keyframe
            garbage.stream = target
            out.mux(garbage)
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, rate: int = 8000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        w.writeframes((np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


def unpatchify(pixel_values: np.ndarray, grid_thw, patch_size: int = 16, temporal: int = 2,
               merge: int = 2) -> np.ndarray:
    """pixel_values [t*h*w, 3*Tp*P*P] -> float32 frames [t*Tp, 3, H, W] (inverse of the
    Qwen3-VL patch layout), to look at what the encoder will see."""
    t, gh, gw = grid_thw
    x = pixel_values.reshape(t, gh // merge, gw // merge, merge, merge, 3, temporal,
                             patch_size, patch_size)
    x = x.transpose(0, 6, 5, 1, 3, 7, 2, 4, 8)
    return x.reshape(t * temporal, 3, gh * patch_size, gw * patch_size)


def to_uint8(frames_chw: np.ndarray, mean: float = 0.5, std: float = 0.5) -> np.ndarray:
    """Normalized float [T, 3, H, W] -> uint8 [T, H, W, 3]."""
    x = (frames_chw * std + mean) * 255
    return np.clip(np.round(x), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
