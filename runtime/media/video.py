"""Video preprocessing for Qwen3-VL: PyAV keyframe-aware frame selection at <= 2 fps, true
timestamps, gap-aware temporal pairing, and the same normalize/patchify as images.

    preprocess_video(bytes | path, VideoParams) -> VideoInput          (blocking; run in a thread)
      = assemble_video(extract_frames(source, params), params, content_hash(source, params))

Extraction (open + probe (video_probe) -> plan target times like transformers' `sample_frames`
(frames.plan_targets) -> decode, choosing for each target the nearest decoded frame):
  * "keyframes" mode when keyframes are at least as dense as the targets: the decoder sees only
    key packets (`skip_frame = NONKEY` as well) and seeks ahead when the next target is > 2 GOPs
    away. When targets are less than two GOPs apart the targets are first snapped to distinct
    keyframes (video_probe.snap_to_keyframes), so the two grids cannot drift apart;
  * "seek" mode otherwise: decode forward, and when the next target is more than one GOP ahead
    seek to the keyframe before it and decode forward only up to it. Non-reference frames that
    cannot be the nearest frame to any target (another frame lies between them and each
    neighbouring target, judged on packet times with a lookahead) are not decoded
    (`skip_frame = NONREF` per packet): nothing depends on them, so the selection is unchanged.
  * "all" mode when every frame is wanted (a short or sparse clip): each decoded frame is kept.
Decoding is frame-threaded when `decode_threads != 1`. Each selected frame is converted once,
straight to its final size by swscale (one reused context; see scaler_for), rotation applied, and
kept as uint8; nothing else is kept, so memory is bounded by the selected frames. The
near-duplicate signature is computed only when dedup is on.

Assembly: pairing (frames.pair_frames), normalize + patchify (image.py) pair by pair into one
output array, thumbnails.
"""
from __future__ import annotations

import bisect
import collections
import dataclasses
import hashlib
import io
import json
import os

import av
import numpy as np
from av.video.reformatter import VideoReformatter
from PIL import Image

from runtime.api import MediaError
from runtime.media.frames import (VideoParams, frame_signature, is_near_duplicate,
                                  nominal_interval, pair_frames, pair_timestamps, plan_targets,
                                  target_interval, video_smart_resize)
from runtime.media.image import cap_side, normalize, patchify
from runtime.media.video_probe import (StreamProbe, keyframe_times, open_container, probe,
                                       snap_to_keyframes, video_stream)

MAX_DECODE_ERRORS = 32
LOOKAHEAD_PACKETS = 16          # packet times seen ahead before deciding a NONREF skip
EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class VideoStats:
    mode: str                         # "keyframes" or "seek"
    frames_decoded: int
    seeks: int
    frames_planned: int
    frames_selected: int              # distinct frames kept (after near-duplicate drop)
    duplicates_dropped: int
    keyframe_interval: float | None
    source_fps: float
    duration: float
    source_size: tuple[int, int]      # displayed (height, width), rotation applied
    rotation: int                     # degrees counter-clockwise applied for display
    container: str
    codec: str


@dataclasses.dataclass(frozen=True)
class VideoInput:
    """One preprocessed video, ready for the vision encoder."""
    pixel_values: np.ndarray                 # float32 [t*h*w, 3 * 2 * patch * patch]
    grid_thw: tuple[int, int, int]           # (pairs, h, w) in patches
    timestamps: list[float]                  # one per pair: mean time of its two frames
    frame_times: list[float]                 # each selected frame's true presentation time
    thumbnails: list[tuple[float, bytes]]    # (time, JPEG) for a few pairs, small
    content_hash: str                        # sha256 of the file bytes and the params
    size: tuple[int, int]                    # (height, width) fed to the encoder
    stats: VideoStats
    merge_size: int = 2                      # patches merged per side into one visual token

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_tokens(self) -> int:
        """Visual tokens the prompt holds for this video."""
        return self.num_patches // (self.merge_size * self.merge_size)


@dataclasses.dataclass(frozen=True)
class ExtractedFrames:
    """The selected frames of one clip, decoded and converted, before pairing and patchify."""
    frames: list[np.ndarray]          # uint8 [h, w, 3] each, displayed orientation, final size
    times: list[float]                # true presentation time of each frame, increasing
    interval: float                   # spacing of the planned targets (the pairing gap unit)
    size: tuple[int, int]             # (height, width) of every frame
    stats: VideoStats


def preprocess_video(source: bytes | str | os.PathLike, params: VideoParams = VideoParams()
                     ) -> VideoInput:
    """Encoded video (bytes, or a path read lazily) -> VideoInput. Raises MediaError for
    anything it cannot take. Blocking and CPU-bound: call it from a worker thread."""
    return assemble_video(extract_frames(source, params), params, content_hash(source, params))


def extract_frames(source: bytes | str | os.PathLike, params: VideoParams = VideoParams()
                   ) -> ExtractedFrames:
    """Probe, plan, decode and convert the selected frames (see the module docstring)."""
    try:
        with open_container(source) as container:
            info = probe(container, video_stream(container))
        if info.duration > params.max_duration_s:
            raise MediaError(f"video is too long: {info.duration:.0f} s, at most "
                             f"{params.max_duration_s:.0f} s are accepted")
        selector = _Selector(info, params)
        if selector.snaps_to_keyframes:
            with open_container(source) as container:
                selector.snap(keyframe_times(container, video_stream(container), info))
        with open_container(source) as container:
            selector.run(container, video_stream(container))
    except av.FFmpegError as e:
        raise MediaError(f"video could not be decoded ({getattr(e, 'strerror', None) or e})"
                         ) from e
    return selector.result()


class _Selector:
    """Decodes one stream and keeps, for each target time, the nearest frame."""

    def __init__(self, info: StreamProbe, params: VideoParams):
        self.info, self.params = info, params
        fps_grid = ((info.total_frames - 1) / info.last_time
                    if info.exact and info.last_time > 0 else info.fps)
        self.planned = plan_targets(info.total_frames, fps_grid, params)
        self.targets = self.planned                 # replaced by keyframe times when snapped
        self.interval = target_interval(self.planned, params)
        # Every frame is wanted (a short or sparse clip): keep each decoded frame instead of the
        # nearest to a target grid built from an average rate that may mean nothing (VFR). Its
        # pairs are then judged against the spacing a regular clip of this length gets, so a
        # sparse stream (three frames in ten hours) never fuses frames hours apart.
        self.keep_all = len(self.planned) >= info.total_frames
        self.pair_interval = (min(self.interval, nominal_interval(info.duration, params))
                              if self.keep_all else self.interval)
        gop = info.keyframe_interval
        self.mode = ("all" if self.keep_all else
                     "keyframes" if gop is not None and gop <= params.keyframe_slack * self.interval
                     else "seek")
        self.seek_gap = (float("inf") if gop is None
                         else 2 * gop if self.mode == "keyframes" else gop)
        # Targets less than two GOPs apart read every keyframe anyway (no seek), and are where
        # nearest-keyframe choices collide; sparser targets never share a nearest keyframe.
        self.snaps_to_keyframes = (self.mode == "keyframes" and len(self.planned) > 1
                                   and self.interval < 2 * gop)
        self.times: list[float] = []
        self.frames: list[np.ndarray] = []
        self.decoded = self.seeks = self.errors = self.dropped = 0
        self.size: tuple[int, int] | None = None   # (height, width) after resize, displayed
        self.source_size = (info.height, info.width)
        self.rotation = 0
        self._last_sig = None
        self._reformatter = VideoReformatter()       # one swscale context for every frame

    def snap(self, keyframes: list[float]) -> None:
        """Aim at distinct keyframes instead of the planned grid (keyframes mode only)."""
        if keyframes:
            self.targets = snap_to_keyframes(self.planned, keyframes)

    def run(self, container, stream) -> None:
        ctx = stream.codec_context
        ctx.thread_count = self.params.decode_threads
        if self.params.decode_threads != 1:
            ctx.thread_type = "AUTO"                    # frame + slice threads
        if self.mode == "keyframes":
            ctx.skip_frame = "NONKEY"
        if self.keep_all:
            self._keep_every_frame(container, stream)
            return
        targets, n = self.targets, len(self.targets)
        i, prev, last_t, last_seek = 0, None, -1.0, -1.0
        while i < n:
            seek_to = None
            for frame in self._decode(container, stream):
                t = self._time(frame, last_t)
                last_t = t
                while i < n and t >= targets[i] - EPS:
                    near_prev = prev is not None and targets[i] - prev[1] <= t - targets[i]
                    self._keep(*(prev if near_prev else (frame, t)))
                    i += 1
                if i >= n:
                    break
                prev = (frame, t)
                if targets[i] - t > self.seek_gap and targets[i] > last_seek:
                    seek_to = last_seek = float(targets[i])
                    break
            if seek_to is None:
                break                                   # all targets met, or end of stream
            offset = self.info.start_pts + int(seek_to / self.info.time_base)
            container.seek(offset, stream=stream, backward=True)
            self.seeks, prev = self.seeks + 1, None
        if i < n:                                       # the stream ended first
            if prev is not None:
                self._keep(*prev)
            if not self.times:
                raise MediaError("no decodable video frames (corrupt stream?)")
            tolerance = max(2 * self.interval, 1.0, 0.05 * self.info.duration)
            if targets[-1] - last_t > tolerance:
                raise MediaError(f"video is truncated or corrupt: frames end at {last_t:.1f} s, "
                                 f"expected about {targets[-1]:.1f} s")

    def _keep_every_frame(self, container, stream) -> None:
        last_t = -1.0
        for frame in self._decode(container, stream):
            last_t = self._time(frame, last_t)
            self._keep(frame, last_t)
            if len(self.times) >= self.params.max_frames:
                break
        if not self.times:
            raise MediaError("no decodable video frames (corrupt stream?)")

    def _decode(self, container, stream):
        """Frames in presentation order from the current position; skips packets the decoder
        rejects. In keyframe mode only key packets reach the decoder (not every decoder honours
        skip_frame, e.g. FFmpeg's native VP9). In seek mode each packet is decoded with
        skip_frame NONREF when `_skippable` says no target can want its frame."""
        ctx = stream.codec_context
        demuxed = container.demux(stream)
        packets = (self._with_skips(demuxed) if self.mode == "seek"
                   else ((p, False) for p in demuxed) if self.mode == "all"
                   else ((p, False) for p in demuxed if not (p.size and not p.is_keyframe)))
        skipping = False
        for packet, skip in packets:
            if skip != skipping:
                ctx.skip_frame, skipping = ("NONREF" if skip else "DEFAULT"), skip
            try:
                frames = packet.decode()
            except av.FFmpegError as e:
                self.errors += 1
                if self.errors > MAX_DECODE_ERRORS and self.errors > self.decoded:
                    raise MediaError(f"video stream is corrupt ({self.errors} undecodable "
                                     f"packets)") from e
                continue
            for frame in frames:
                self.decoded += 1
                yield frame

    def _with_skips(self, demuxed):
        """(packet, skippable) in demux order, each decided once LOOKAHEAD_PACKETS later packets
        have been read (or the stream ended), so the times around it are known."""
        pending: collections.deque = collections.deque()
        seen: collections.deque = collections.deque(maxlen=4 * LOOKAHEAD_PACKETS)
        for packet in demuxed:
            t = self._packet_time(packet)
            if t is not None:
                seen.append(t)
            pending.append((packet, t))
            while len(pending) > LOOKAHEAD_PACKETS or (pending and not packet.size):
                yield self._decided(*pending.popleft(), seen)
        while pending:
            yield self._decided(*pending.popleft(), seen)

    def _decided(self, packet, t: float | None, seen):
        return packet, t is not None and self._skippable(t, seen)

    def _packet_time(self, packet) -> float | None:
        if packet.pts is None or not packet.size:
            return None
        return max(0.0, float((packet.pts - self.info.start_pts) * self.info.time_base))

    def _skippable(self, p: float, seen) -> bool:
        """No target can select the frame at time p: another seen frame lies at or after the last
        target it reaches (so that target resolves earlier) and another lies before the next
        target it falls short of (so p is not the frame just before it). Seen times are a subset
        of the stream's, so this can only err towards decoding (see the selection in `run`)."""
        targets = self.targets
        k = bisect.bisect_right(targets, p + EPS)       # targets[:k] satisfy p >= target - EPS
        lo = targets[k - 1] - EPS if k else -np.inf
        hi = targets[k] - EPS if k < len(targets) else np.inf
        return (any(lo <= s < p for s in seen)) and any(p < s < hi for s in seen)

    def _time(self, frame, last_t: float) -> float:
        if frame.pts is None:
            return last_t + 1 / self.info.fps
        return max(0.0, float((frame.pts - self.info.start_pts) * self.info.time_base))

    def _keep(self, frame, t: float) -> None:
        if self.times and t <= self.times[-1]:
            return                                      # the same frame chosen for two targets
        if self.size is None:
            self._plan_size(frame)
        h, w = self.size
        k = round(self.rotation / 90) % 4
        ch, cw = (w, h) if k % 2 else (h, w)            # coded orientation
        rgb = self._reformatter.reformat(
            frame, width=cw, height=ch, format="rgb24",
            interpolation=scaler_for(frame.height, frame.width, ch, cw)).to_ndarray()
        rgb = np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb
        if self.params.dedup_threshold > 0:             # the signature costs ~4 ms a frame
            sig = frame_signature(rgb)
            dt = t - self.times[-1] if self.times else float("inf")
            if is_near_duplicate(sig, self._last_sig, dt, self.params):
                self.dropped += 1
                return
            self._last_sig = sig
        self.times.append(t)
        self.frames.append(rgb)

    def _plan_size(self, frame) -> None:
        """Final size from the first kept frame: rotation, the max_side cap, then the video
        smart-resize rule for the planned frame count (transformers' num_frames)."""
        self.rotation = int(frame.rotation or 0)
        h, w = frame.height, frame.width
        if round(self.rotation / 90) % 2:
            h, w = w, h
        self.source_size = (h, w)
        h, w = cap_side(h, w, self.params.max_side)
        self.size = video_smart_resize(len(self.planned), h, w, self.params)

    def result(self) -> ExtractedFrames:
        stats = VideoStats(mode=self.mode, frames_decoded=self.decoded, seeks=self.seeks,
                           frames_planned=len(self.planned), frames_selected=len(self.times),
                           duplicates_dropped=self.dropped,
                           keyframe_interval=self.info.keyframe_interval,
                           source_fps=self.info.fps, duration=self.info.duration,
                           source_size=self.source_size, rotation=self.rotation,
                           container=self.info.container, codec=self.info.codec)
        return ExtractedFrames(frames=self.frames, times=self.times, interval=self.pair_interval,
                               size=self.size, stats=stats)


# swscale flags beside the filter: chroma interpolated at full resolution on input and output
# and accurate rounding. Against exact decoding resized as transformers does (full-size RGB, then
# bicubic) this is 39 dB PSNR where the bare filter is 36 dB, for ~1.5 ms more a 720p frame
# (exporter/bench/video.py measures it on every run).
# libswscale's flag values (stable since FFmpeg 1.x), not PyAV enum members (which vary by version).
SWS_BICUBIC, SWS_AREA = 0x4, 0x20
SWS_QUALITY = 0x2000 | 0x4000 | 0x40000       # FULL_CHR_H_INT | FULL_CHR_H_INP | ACCURATE_RND


def scaler_for(src_h: int, src_w: int, dst_h: int, dst_w: int) -> int:
    """swscale flags: AREA when shrinking (anti-aliased, ~2x faster than swscale's BICUBIC at
    720p), BICUBIC when enlarging (like transformers), both with SWS_QUALITY."""
    return (SWS_AREA if dst_h * dst_w < src_h * src_w else SWS_BICUBIC) | SWS_QUALITY


def assemble_video(extracted: ExtractedFrames, params: VideoParams, content_hash: str
                   ) -> VideoInput:
    """Pair, normalize and patchify extracted frames into the encoder's input."""
    times, frames, stats = extracted.times, extracted.frames, extracted.stats
    pairs = pair_frames(times, extracted.interval, params)
    h, w = extracted.size
    # Lone frames inside the clip cost a whole pair; re-plan only if that breaks the budget.
    budget_frames = 2 * len(pairs) if any(a == b for a, b in pairs[:-1]) else len(times)
    if budget_frames * h * w > params.max_pixels:
        ch, cw = cap_side(*stats.source_size, params.max_side)
        h, w = video_smart_resize(budget_frames, ch, cw, params)
        frames = [np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC))
                  for f in frames]
    ps, tp, ms = params.patch_size, params.temporal_patch_size, params.merge_size
    per_pair = (h // ps) * (w // ps)
    pixel_values = np.empty((len(pairs) * per_pair, 3 * tp * ps * ps), np.float32)
    for j, (a, b) in enumerate(pairs):                  # t-major rows: fill pair by pair
        chw = normalize(np.stack([frames[a], frames[b]]), params.image_mean, params.image_std)
        pixel_values[j * per_pair:(j + 1) * per_pair] = patchify(chw, ps, tp, ms)[0]
    return VideoInput(pixel_values=pixel_values, grid_thw=(len(pairs), h // ps, w // ps),
                      timestamps=pair_timestamps(times, pairs), frame_times=list(times),
                      thumbnails=_thumbnails(frames, times, pairs, params),
                      content_hash=content_hash, size=(h, w), stats=stats,
                      merge_size=params.merge_size)


def _thumbnails(frames, times, pairs, params: VideoParams) -> list[tuple[float, bytes]]:
    """JPEG thumbnails (longest side `thumbnail_side`) of the first frame of evenly spaced
    pairs, at most `max_thumbnails`."""
    if params.max_thumbnails <= 0:
        return []
    count = min(len(pairs), params.max_thumbnails)
    picks = np.linspace(0, len(pairs) - 1, count).round().astype(int)
    out = []
    for j in dict.fromkeys(picks.tolist()):
        a = pairs[j][0]
        img = Image.fromarray(frames[a])
        img.thumbnail((params.thumbnail_side, params.thumbnail_side), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=80)
        out.append((times[a], buf.getvalue()))
    return out


def content_hash(source, params: VideoParams) -> str:
    """sha256 over the encoded bytes (a file is read in chunks) and the params, so the vision
    cache never mixes results prepared differently."""
    h = hashlib.sha256()
    if isinstance(source, (bytes, bytearray, memoryview)):
        h.update(source)
    else:
        with open(source, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    h.update(json.dumps(dataclasses.asdict(params), sort_keys=True).encode())
    return h.hexdigest()
