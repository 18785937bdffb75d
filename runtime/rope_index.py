"""Multimodal RoPE (MRoPE) position ids for a Qwen3-VL prompt, in numpy.

Identical to transformers' `Qwen3VLModel.get_rope_index` for one unpadded sequence:
- text tokens advance all three axes (temporal, height, width) together, one per token;
- each run of consecutive image (or video) pad tokens is one visual item laid out on its
  (t, h/merge, w/merge) grid, every axis offset by the position where the run starts; the next
  token starts at that offset + max(h, w) // merge;
- a video of grid (t, h, w) is t separate items of grid (1, h, w): Qwen3-VL writes a text
  timestamp before each temporal group, so each group is its own run of pad tokens.

Decoding continues with `position = num_tokens_so_far + rope_delta` on all three axes.

The MRoPE sections (`mrope_section`: which rotary frequencies read which of the three rows) play
no part here: transformers' `get_rope_index` builds the same rows for any sections, and the
decoder graph applies them (`exporter/rope.py`). Of the model's config only the spatial merge
size enters, through `merge_size`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

TEXT, IMAGE, VIDEO = 0, 1, 2


class RopeIndexError(ValueError):
    """The prompt's visual pad tokens do not match the grids given for it."""


def _runs(kinds: np.ndarray) -> list[tuple[int, int, int]]:
    """Maximal runs of equal values: [(kind, start, end)]."""
    if kinds.size == 0:
        return []
    cuts = np.flatnonzero(np.diff(kinds)) + 1
    starts = np.concatenate([[0], cuts])
    ends = np.concatenate([cuts, [kinds.size]])
    return [(int(kinds[s]), int(s), int(e)) for s, e in zip(starts, ends)]


def vision_positions(start: int, grid_thw: Sequence[int], merge_size: int) -> np.ndarray:
    """i64[3, t*(h/m)*(w/m)] positions of one visual item whose first token sits at `start`."""
    t, h, w = (int(x) for x in grid_thw)
    gh, gw = h // merge_size, w // merge_size
    tt, hh, ww = np.meshgrid(np.arange(t, dtype=np.int64), np.arange(gh, dtype=np.int64),
                             np.arange(gw, dtype=np.int64), indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + start


def get_rope_index(input_ids: np.ndarray, image_grids: Sequence[Sequence[int]],
                   video_grids: Sequence[Sequence[int]], *, image_token_id: int,
                   video_token_id: int, vision_start_token_id: int | None = None,
                   merge_size: int) -> tuple[np.ndarray, int]:
    """(position_ids i64[3, S], rope_delta) for one prompt of token ids i64[S].

    `image_grids` / `video_grids` are the (t, h, w) patch grids of the images / videos in prompt
    order. When `vision_start_token_id` is given, every visual run must follow that token (a check
    of the prompt layout; transformers does not need it)."""
    ids = np.asarray(input_ids, dtype=np.int64).reshape(-1)
    kinds = np.zeros(ids.shape, dtype=np.int64)
    kinds[ids == image_token_id] = IMAGE
    kinds[ids == video_token_id] = VIDEO
    grids = {IMAGE: [tuple(int(x) for x in g) for g in image_grids],
             VIDEO: [(1, int(g[1]), int(g[2])) for g in video_grids for _ in range(int(g[0]))]}
    used = {IMAGE: 0, VIDEO: 0}

    pieces, current = [], 0
    for kind, start, end in _runs(kinds):
        if kind == TEXT:
            pieces.append(np.broadcast_to(np.arange(end - start, dtype=np.int64) + current,
                                          (3, end - start)))
            current += end - start
            continue
        name = "image" if kind == IMAGE else "video frame group"
        if used[kind] >= len(grids[kind]):
            raise RopeIndexError(f"prompt has more {name} runs than grids ({len(grids[kind])})")
        grid = grids[kind][used[kind]]
        used[kind] += 1
        expected = grid[0] * (grid[1] // merge_size) * (grid[2] // merge_size)
        if end - start != expected:
            raise RopeIndexError(f"{name} run at token {start} has {end - start} tokens, its grid "
                                 f"{grid} needs {expected}")
        if vision_start_token_id is not None and (start == 0 or ids[start - 1] != vision_start_token_id):
            raise RopeIndexError(f"{name} run at token {start} does not follow vision_start")
        pieces.append(vision_positions(current, grid, merge_size))
        current += max(grid[1], grid[2]) // merge_size
    for kind, name in ((IMAGE, "image"), (VIDEO, "video frame group")):
        if used[kind] != len(grids[kind]):
            raise RopeIndexError(f"prompt has {used[kind]} {name} runs but {len(grids[kind])} grids")

    if not pieces:
        return np.zeros((3, 0), dtype=np.int64), 0
    positions = np.ascontiguousarray(np.concatenate(pieces, axis=1))
    return positions, int(positions.max()) + 1 - ids.size

