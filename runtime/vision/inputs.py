"""The grid-dependent inputs of the vision graphs, computed in numpy from one `grid_thw`.

Everything data-dependent in the Qwen3-VL vision encoder lives here, so the exported graphs are
plain tensor programs: the bilinear resampling of the learned position table, the 2D rotary
tables, and which patches may attend to which (one segment per temporal frame group).

Patch order (the invariant every array shares): frames t-major; inside a frame, spatial-merge
blocks in raster order, and inside a block its merge x merge patches in raster order. This is the
order the image/video patchifier emits and the order Hugging Face's `Qwen3VLVisionModel` assumes
(`transformers.vision_utils.get_vision_interpolation_indices_and_weights`, `get_vision_position_ids`,
`get_vision_cu_seqlens`); the merger then fuses each run of merge*merge consecutive patches.
"""
from __future__ import annotations

import numpy as np

from runtime.manifest import POS_IDX, POS_WEIGHT, ROT_COS, ROT_SIN, SEGMENT_IDS


GRID_INPUTS = (POS_IDX, POS_WEIGHT, ROT_COS, ROT_SIN, SEGMENT_IDS)   # what vision_inputs returns


class VisionInputError(ValueError):
    """A grid the vision encoder cannot take (non-positive, or not divisible by the merge size)."""


def _check_grid(grid_thw, merge_size: int) -> tuple[int, int, int]:
    try:
        t, h, w = (int(x) for x in grid_thw)
    except (TypeError, ValueError) as e:
        raise VisionInputError(f"grid_thw must be three integers (t, h, w), got {grid_thw!r}") from e
    if t < 1 or h < 1 or w < 1:
        raise VisionInputError(f"grid_thw must be positive, got {(t, h, w)}")
    if h % merge_size or w % merge_size:
        raise VisionInputError(f"grid h and w must be multiples of merge_size={merge_size}, "
                               f"got {(t, h, w)}")
    return t, h, w


def patch_rows_cols(grid_thw, merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of every patch of one frame, in merge-block order: two int64 arrays of h*w."""
    _, h, w = _check_grid(grid_thw, merge_size)
    m = merge_size
    rows, cols = np.meshgrid(np.arange(h, dtype=np.int64), np.arange(w, dtype=np.int64),
                             indexing="ij")
    block = (h // m, m, w // m, m)
    return (rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1),
            cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1))


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear, align_corners=True taps (floor, floor+1, clamped) and weights along one axis,
    in float32 with the same operation order as HF's `_interpolation_axis_taps_weights`."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    weights = np.maximum(np.float32(1) - distance, np.float32(0)).astype(np.float32)
    return taps, weights


def position_interpolation(grid_thw, *, merge_size: int,
                           num_position_embeddings: int) -> tuple[np.ndarray, np.ndarray]:
    """pos_idx i64[4, N] and pos_weight f32[4, N]: the four learned-table rows each patch blends
    (taps ordered (h0,w0), (h0,w1), (h1,w0), (h1,w1)), repeated for every frame."""
    t, h, w = _check_grid(grid_thw, merge_size)
    side = int(num_position_embeddings ** 0.5)
    if side * side != num_position_embeddings:
        raise VisionInputError(f"num_position_embeddings={num_position_embeddings} is not a square")
    rows, cols = patch_rows_cols(grid_thw, merge_size)
    h_taps, h_weights = _axis_taps(rows, h, side)
    w_taps, w_weights = _axis_taps(cols, w, side)
    idx = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return (np.ascontiguousarray(np.tile(idx.T, (1, t))),
            np.ascontiguousarray(np.tile(weight.T, (1, t)), dtype=np.float32))


def rotary_tables(grid_thw, *, merge_size: int, head_dim: int,
                  rope_theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """rot_cos, rot_sin f32[N, head_dim]: axial 2D rope, [h freqs | w freqs] twice (no partial
    rotation), as `Qwen3VLVisionRotaryEmbedding` builds it."""
    t, _, _ = _check_grid(grid_thw, merge_size)
    if head_dim % 4:
        raise VisionInputError(f"vision head_dim={head_dim} must be a multiple of 4")
    spatial_dim = head_dim // 2
    exponent = np.arange(0, spatial_dim, 2, dtype=np.float32) / np.float32(spatial_dim)
    inv_freq = (1.0 / np.power(np.float32(rope_theta), exponent)).astype(np.float32)
    rows, cols = patch_rows_cols(grid_thw, merge_size)
    freq_h = rows.astype(np.float32)[:, None] * inv_freq
    freq_w = cols.astype(np.float32)[:, None] * inv_freq
    angles = np.concatenate([freq_h, freq_w, freq_h, freq_w], axis=-1)
    cos = np.cos(angles).astype(np.float32)
    sin = np.sin(angles).astype(np.float32)
    return np.ascontiguousarray(np.tile(cos, (t, 1))), np.ascontiguousarray(np.tile(sin, (t, 1)))


def segment_ids(grid_thw, *, merge_size: int) -> np.ndarray:
    """segment_ids i64[N]: the frame group of each patch; attention stays inside a segment
    (HF's cu_seqlens gives one segment of h*w patches per temporal step)."""
    t, h, w = _check_grid(grid_thw, merge_size)
    return np.repeat(np.arange(t, dtype=np.int64), h * w)


def vision_inputs(grid_thw: tuple[int, int, int], *, merge_size: int, num_position_embeddings: int,
                  head_dim: int, rope_theta: float = 10000.0) -> dict[str, np.ndarray]:
    """All grid-dependent inputs of vision_cpu.onnx / vision_gpu.onnx for one image or video,
    keyed by graph input name. N = t*h*w patches."""
    pos_idx, pos_weight = position_interpolation(
        grid_thw, merge_size=merge_size, num_position_embeddings=num_position_embeddings)
    rot_cos, rot_sin = rotary_tables(grid_thw, merge_size=merge_size, head_dim=head_dim,
                                     rope_theta=rope_theta)
    return {POS_IDX: pos_idx, POS_WEIGHT: pos_weight, ROT_COS: rot_cos, ROT_SIN: rot_sin,
            SEGMENT_IDS: segment_ids(grid_thw, merge_size=merge_size)}
