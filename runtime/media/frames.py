"""Video frame planning for Qwen3-VL, in plain Python/numpy (no decoder here).

What lives here: the video parameters (`VideoParams`), how many frames to take and at which
target times (`plan_targets`, the rule of transformers' `Qwen3VLVideoProcessor.sample_frames`),
the video smart-resize rule (`video_smart_resize`, which spends one pixel budget over all
frames), and how selected frames are paired into temporal patches (`pair_frames`).

Invariants:
- Times are seconds from the stream's first presentation time, taken from real pts.
- A pair is two frames fused by one temporal patch (Tp = 2). It never spans a gap longer than
  `gap_factor` target intervals, where the interval is never wider than a regular clip of the
  same duration would get (`nominal_interval`): a lone frame is duplicated into its own pair.
- One timestamp per pair: the mean of its two frame times (`_calculate_timestamps` in
  transformers' `processing_qwen3_vl.py`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from runtime.api import MediaError

MAX_FPS = 2.0
MAX_ASPECT_RATIO = 200


@dataclasses.dataclass(frozen=True)
class VideoParams:
    """How an engine wants videos prepared. `min_pixels`/`max_pixels` are the checkpoint's
    `size.shortest_edge`/`size.longest_edge`: pixel budgets over ALL frames of a clip."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_pixels: int = 4096
    max_pixels: int = 25165824
    fps: float = 2.0                      # target sampling rate, 0 < fps <= 2
    min_frames: int = 4
    max_frames: int = 768
    max_side: int = 1024                  # cap on the longest displayed side before smart-resize
    max_duration_s: float = 24 * 3600.0   # longer clips are refused
    dedup_threshold: float = 0.0          # > 0: a frame repeats the last kept one when no block of
                                          # a 16x16 RGB grid changed by this much (0-255; 4 is a
                                          # good value). 0 (default): off, as transformers samples
    dedup_keep_every_s: float = 10.0      # ...but keep one at least this often in a static scene
    gap_factor: float = 1.5               # frames further apart than this many target intervals
                                          # are not fused into one temporal patch
    keyframe_slack: float = 1.0           # keyframe-only decoding when GOP <= slack * interval
    thumbnail_side: int = 160
    max_thumbnails: int = 32
    decode_threads: int = 1               # per clip; clips run in a thread pool already

    def __post_init__(self):
        if not 0 < self.fps <= MAX_FPS:
            raise ValueError(f"video fps must be in (0, {MAX_FPS}], got {self.fps}")
        if self.temporal_patch_size != 2:
            raise ValueError("the pairing logic assumes temporal_patch_size == 2")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"need 1 <= min_frames <= max_frames, got "
                             f"{self.min_frames}, {self.max_frames}")

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def from_config(cfg: dict, **overrides) -> "VideoParams":
        """From a checkpoint's video_preprocessor_config.json (as a dict); fps is capped at 2."""
        size = cfg.get("size") or {}
        fields = dict(
            patch_size=cfg.get("patch_size", 16),
            temporal_patch_size=cfg.get("temporal_patch_size", 2),
            merge_size=cfg.get("merge_size", 2),
            image_mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),
            image_std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),
            min_pixels=size.get("shortest_edge", 4096),
            max_pixels=size.get("longest_edge", 25165824),
            fps=min(float(cfg.get("fps") or MAX_FPS), MAX_FPS),
            min_frames=cfg.get("min_frames", 4),
            max_frames=cfg.get("max_frames", 768))
        fields.update(overrides)
        return VideoParams(**fields)

    @staticmethod
    def from_file(path: str | Path, **overrides) -> "VideoParams":
        return VideoParams.from_config(json.loads(Path(path).read_text()), **overrides)

    @staticmethod
    def from_preprocessing(pre, **overrides) -> "VideoParams":
        """From a `runtime.manifest.Preprocessing`."""
        fields = dict(patch_size=pre.patch_size, temporal_patch_size=pre.temporal_patch_size,
                      merge_size=pre.merge_size, image_mean=tuple(pre.image_mean),
                      image_std=tuple(pre.image_std), min_pixels=pre.video_min_pixels,
                      max_pixels=pre.video_max_pixels, fps=min(pre.video_fps, MAX_FPS),
                      min_frames=pre.video_min_frames, max_frames=pre.video_max_frames)
        fields.update(overrides)
        return VideoParams(**fields)


def plan_frame_count(total_frames: int, video_fps: float, params: VideoParams) -> int:
    """transformers' `sample_frames` count: int(total / video_fps * fps) clamped to
    [min_frames, max_frames] and never more than the clip has."""
    n = int(total_frames / video_fps * params.fps)
    return max(1, min(max(n, params.min_frames), params.max_frames, total_frames))


def plan_targets(total_frames: int, video_fps: float, params: VideoParams) -> np.ndarray:
    """Target times (seconds from the first frame): the frame indices of transformers'
    `sample_frames` (linspace over [0, total-1], rounded) divided by the frame rate. For a
    constant-rate clip the nearest frame to each target is exactly transformers' frame."""
    n = plan_frame_count(total_frames, video_fps, params)
    indices = np.linspace(0, total_frames - 1, n).round().astype(np.int64)
    return indices / float(video_fps)


def target_interval(targets: np.ndarray, params: VideoParams) -> float:
    """Spacing of the planned targets (1 / fps for a clip with a single target)."""
    if len(targets) < 2:
        return 1.0 / params.fps
    return float(targets[-1] - targets[0]) / (len(targets) - 1) or 1.0 / params.fps


def nominal_interval(duration: float, params: VideoParams) -> float:
    """The target spacing of a regular clip of this duration: 1 / fps, or wider when max_frames
    caps the count. The unit of the pairing gap rule, whatever the stream's own frame spacing."""
    return max(1.0 / params.fps, duration / params.max_frames)


def video_smart_resize(num_frames: int, height: int, width: int, params: VideoParams
                       ) -> tuple[int, int]:
    """transformers' qwen3_vl video `smart_resize`: sides multiples of patch*merge, and the pixel
    count of all frames (t rounded to a multiple of Tp) within [min_pixels, max_pixels]."""
    factor, tf = params.factor, params.temporal_patch_size
    if height < 1 or width < 1:
        raise MediaError(f"video has an empty frame size {width}x{height}")
    num_frames = max(num_frames, tf)   # a lone frame is duplicated into a pair
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"video aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got "
                         f"{width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / tf) * tf
    if t_bar * h_bar * w_bar > params.max_pixels:
        beta = math.sqrt((num_frames * height * width) / params.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < params.min_pixels:
        beta = math.sqrt(params.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar




def pair_frames(times: list[float], interval: float, params: VideoParams) -> list[tuple[int, int]]:
    """Group selected frames (sorted times) into temporal pairs of frame positions. Consecutive
    frames are fused when at most `gap_factor * interval` apart; otherwise the earlier frame is
    paired with itself. A trailing odd frame is paired with itself (transformers pads the same)."""
    max_gap = params.gap_factor * interval + 1e-9
    pairs, i = [], 0
    while i < len(times):
        if i + 1 < len(times) and times[i + 1] - times[i] <= max_gap:
            pairs.append((i, i + 1))
            i += 2
        else:
            pairs.append((i, i))
            i += 1
    return pairs


def pair_timestamps(times: list[float], pairs: list[tuple[int, int]]) -> list[float]:
    """One timestamp per pair: the mean of its two frame times."""
    return [(times[a] + times[b]) / 2 for a, b in pairs]


SIGNATURE_GRID = 16


def frame_signature(rgb: np.ndarray) -> np.ndarray:
    """A 16x16 colour thumbnail (float32 [16, 16, 3], 0-255) for near-duplicate detection, by
    block means. Colour, not grey: a red shape turning blue can keep its luminance."""
    h, w = rgb.shape[:2]
    g = SIGNATURE_GRID
    ys = np.linspace(0, h, g + 1).astype(int)
    xs = np.linspace(0, w, g + 1).astype(int)
    rows = np.add.reduceat(rgb.astype(np.float32), ys[:-1], axis=0) / np.diff(ys)[:, None, None]
    return np.add.reduceat(rows, xs[:-1], axis=1) / np.diff(xs)[None, :, None]


def is_near_duplicate(sig: np.ndarray, last_sig: np.ndarray | None, dt: float,
                      params: VideoParams) -> bool:
    """A frame repeats the last kept one when no block of their signatures changed by the
    threshold or more (the most-changed block decides, so a small object that moves or changes
    colour is a change, while encoder noise, averaged over a block, is not), unless
    `dedup_keep_every_s` has passed since the last kept frame."""
    if params.dedup_threshold <= 0 or last_sig is None or dt >= params.dedup_keep_every_s:
        return False
    return float(np.abs(sig - last_sig).mean(axis=-1).max()) < params.dedup_threshold
