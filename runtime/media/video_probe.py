"""Open a video with PyAV and learn what frame selection needs, without decoding pixels.

`open_container` takes bytes (wrapped in a BytesIO) or a path (read lazily by FFmpeg, never
loaded whole). `probe` finds the video stream, its duration, frame count, frame rate and the
spacing of its keyframes: from the demuxer's index when it lists every sample (MP4/MOV), else by
demuxing (not decoding) packets from the start. Anything FFmpeg cannot read, or that is not a
video (an image, text, audio only), raises `MediaError`.

For keyframe-only decoding, `keyframe_times` lists every keyframe's presentation time (demuxing,
not decoding) and `snap_to_keyframes` picks one distinct keyframe per target time.
"""
from __future__ import annotations

import dataclasses
import io
import os
import re
from fractions import Fraction

import av
import numpy as np

from runtime.api import MediaError

# FFmpeg demuxers that read single images (png_pipe, jpeg_pipe, webp_pipe, ...) or text.
_IMAGE_FORMATS = {"image2", "tty"}
_IMAGE_CODECS = {"png", "mjpeg", "gif", "webp", "bmp", "tiff", "jpeg2000", "ansi"}
PROBE_MAX_PACKETS = 1500
PROBE_KEYFRAMES = 5
SNAP_MAX_CELLS = 4_000_000     # targets x keyframes for the exact assignment (32 MB of float64)


@dataclasses.dataclass(frozen=True)
class StreamProbe:
    """What the demuxer says about the chosen video stream. Times are seconds from `start_pts`."""
    container: str
    codec: str
    width: int                        # coded size (before rotation)
    height: int
    time_base: Fraction
    start_pts: int                    # first presentation time, in time_base units
    duration: float
    fps: float                        # average frame rate
    total_frames: int                 # exact when `exact`, else an estimate
    last_time: float                  # presentation time of the last frame (estimate unless exact)
    keyframe_interval: float | None   # median keyframe spacing; None when only one was seen
    exact: bool                       # total_frames/last_time come from a full packet scan/index


def open_container(source: bytes | str | os.PathLike) -> av.container.InputContainer:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise MediaError("video is empty (0 bytes)")
        file = io.BytesIO(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise MediaError(f"video file not found: {os.path.basename(path)}")
        if os.path.getsize(path) == 0:
            raise MediaError("video is empty (0 bytes)")
        file = path
    try:
        return av.open(file, mode="r", metadata_errors="ignore")
    except av.FFmpegError as e:
        raise MediaError(f"not a readable video container ({_reason(e)})") from e


def video_stream(container) -> av.video.stream.VideoStream:
    """The first real video stream (cover art and still images excluded)."""
    fmt = container.format.name
    if fmt in _IMAGE_FORMATS or fmt.endswith("_pipe"):
        raise MediaError(f"this is an image or text file ({fmt}), not a video")
    still = av.stream.Disposition.attached_pic | av.stream.Disposition.still_image
    for stream in container.streams.video:
        if not int(stream.disposition) & int(still):
            return stream
    kinds = sorted({s.type for s in container.streams}) or ["nothing"]
    raise MediaError(f"no video stream in this file (it holds {', '.join(kinds)})")


def probe(container, stream) -> StreamProbe:
    """Learn duration, frame count, rate and keyframe spacing. May demux packets (reading, not
    decoding); the caller must reopen the container (or seek) before decoding."""
    tb = stream.time_base or Fraction(1, 90000)
    start = stream.start_time if stream.start_time is not None else 0
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    declared, declared_by_stream = _declared_duration(container, stream, tb, start)
    width, height = stream.codec_context.width, stream.codec_context.height
    if width <= 0 or height <= 0:
        raise MediaError("video stream has no frame size (corrupt header?)")

    keyframes, exact, count, last = _index_keyframes(container, stream, tb, start), False, 0, 0.0
    if keyframes is None or declared is None:
        found, count, last, exact = _from_packets(
            container, stream, tb, start, None if declared is None else PROBE_MAX_PACKETS)
        keyframes = found if keyframes is None else keyframes
    if exact:
        fps = fps or ((count - 1) / last if last > 0 else 25.0)
        total, duration = count, last + 1 / fps
        if declared_by_stream and declared - duration > max(1.0, 0.1 * declared):
            raise MediaError(f"video is truncated: its frames end at {duration:.1f} s but the "
                             f"file declares {declared:.1f} s")
    else:
        fps = fps or 25.0
        duration = declared
        total = stream.frames or max(1, round(duration * fps))
        last = (total - 1) / fps
    if total == 1 and stream.codec_context.name in _IMAGE_CODECS:
        raise MediaError(f"this is a still image ({stream.codec_context.name}), not a video")
    return StreamProbe(container=container.format.name, codec=stream.codec_context.name,
                       width=width, height=height, time_base=tb, start_pts=start,
                       duration=duration, fps=fps, total_frames=total, last_time=max(last, 0.0),
                       keyframe_interval=_median_gap(keyframes), exact=exact)


def _declared_duration(container, stream, tb, start) -> tuple[float | None, bool]:
    """(seconds, whether the stream itself declared it). A container-wide duration may include
    a longer audio track, so only a stream's own duration is evidence of truncation."""
    if stream.duration:
        return float(stream.duration * tb), True
    tag = stream.metadata.get("DURATION") or stream.metadata.get("duration")
    if tag and (m := re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d+)?)", tag.strip())):
        return int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3]), True
    if container.duration:
        offset = float(start * tb) - (container.start_time or 0) / av.time_base
        return max(0.0, container.duration / av.time_base - offset), False
    return None, False


def _index_keyframes(container, stream, tb, start) -> list[float] | None:
    """Keyframe times from the demuxer's sample index, trusted only for MP4/MOV where it lists
    every sample (Matroska cues list only some keyframes). Looks at the first 2000 entries."""
    if not container.format.name.startswith("mov"):
        return None
    entries = stream.index_entries
    head = [entries[i] for i in range(min(len(entries), 2000))]
    keyframes = [float((e.timestamp - start) * tb) for e in head if e.is_keyframe]
    return keyframes or None


def _from_packets(container, stream, tb, start, max_packets: int | None):
    """Demux packets from the start: keyframe times, and the exact count and last time when the
    stream ends within `max_packets` (or always, with max_packets=None)."""
    keyframes, count, last_pts = [], 0, None
    try:
        for packet in container.demux(stream):
            if packet.size == 0:                      # the flush packet at the end
                continue
            count += 1
            pts = packet.pts if packet.pts is not None else packet.dts
            if pts is not None:
                last_pts = pts if last_pts is None else max(last_pts, pts)
                if packet.is_keyframe:
                    keyframes.append(float((pts - start) * tb))
            if max_packets is not None and (count >= max_packets
                                            or len(keyframes) > PROBE_KEYFRAMES):
                return keyframes, count, 0.0, False
    except av.FFmpegError:
        pass                                          # a truncated tail: what we read counts
    if count == 0:
        raise MediaError("video stream holds no frames")
    last = float((last_pts - start) * tb) if last_pts is not None else 0.0
    return keyframes, count, last, True


def keyframe_times(container, stream, info: StreamProbe) -> list[float]:
    """Sorted, distinct presentation times (seconds from `info.start_pts`, clamped at 0 like the
    decoder's frame times) of every keyframe packet, by demuxing the stream from its start. A
    truncated tail ends the list instead of failing."""
    times = set()
    try:
        for packet in container.demux(stream):
            if packet.size and packet.is_keyframe and packet.pts is not None:
                times.add(max(0.0, float((packet.pts - info.start_pts) * info.time_base)))
    except av.FFmpegError:
        pass
    return sorted(times)


def snap_to_keyframes(targets: np.ndarray, keyframes: list[float]) -> np.ndarray:
    """One distinct keyframe time per target, in order, minimizing the total |keyframe - target|.

    Picking the nearest keyframe for each target on its own lets the two grids drift: 120 targets
    every 0.5039 s against keyframes every 0.5 s share a keyframe near the end and skip one in the
    middle (119 frames, a 1 s hole). The order-preserving assignment (a dynamic programme over
    targets x keyframes) keeps every frame distinct. With no more keyframes than targets it returns
    them all; above SNAP_MAX_CELLS it falls back to the distinct nearest keyframes."""
    t = np.asarray(targets, np.float64)
    k = np.asarray(keyframes, np.float64)
    n, m = len(t), len(k)
    if m <= n:
        return k.copy()
    if n * m > SNAP_MAX_CELLS:
        right = np.clip(np.searchsorted(k, t), 1, m - 1)
        nearest = np.where(t - k[right - 1] <= k[right] - t, right - 1, right)
        return k[np.unique(nearest)]
    best = np.empty((n, m))
    best[0] = np.abs(k - t[0])
    for i in range(1, n):            # best[i, j]: target i on keyframe j, targets < i before j
        before = np.full(m, np.inf)
        before[1:] = np.minimum.accumulate(best[i - 1, :-1])
        best[i] = np.abs(k - t[i]) + before
    picks = [int(np.argmin(best[n - 1]))]
    for i in range(n - 2, -1, -1):
        picks.append(int(np.argmin(best[i, :picks[-1]])))
    return k[picks[::-1]]


def _median_gap(keyframes: list[float]) -> float | None:
    if len(keyframes) < 2:
        return None
    gaps = np.diff(np.sort(np.asarray(keyframes)))
    gaps = gaps[gaps > 0]
    return float(np.median(gaps)) if len(gaps) else None


def _reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)
