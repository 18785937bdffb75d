"""Short clips of the synthetic world: one shape that either changes colour or moves.

A clip is `NUM_FRAMES` frames at `FPS` frames per second. Qwen3-VL merges frames in pairs
(temporal patch 2), so a colour change happens on an even frame: at `change_frame / FPS` seconds,
a whole number of seconds that lines up with a frame pair's `<t seconds>` stamp.
"""
from __future__ import annotations

import dataclasses
import random

from PIL import Image, ImageDraw

from .scenes import BACKGROUNDS, COLOURS, SHAPES, SIZES, draw_background, draw_shape

NUM_FRAMES = 8
FPS = 2.0
EVENTS = ("colour", "move")
DIRECTIONS = {  # name -> (start centre, end centre) as fractions of the side
    "left to right": ((0.2, 0.5), (0.8, 0.5)),
    "right to left": ((0.8, 0.5), (0.2, 0.5)),
    "top to bottom": ((0.5, 0.2), (0.5, 0.8)),
    "bottom to top": ((0.5, 0.8), (0.5, 0.2)),
}
CLIP_SIDE = 96              # a multiple of 32; 36 patches (9 tokens) per frame pair
CHANGE_FRAMES = (2, 4, 6)   # even frames: the change is at 1, 2 or 3 seconds


@dataclasses.dataclass(frozen=True)
class Clip:
    kind: str                   # shape, one of SHAPES
    colour: str                 # colour at the start
    event: str                  # "colour" or "move"
    new_colour: str | None      # colour after the change ("colour" clips)
    change_frame: int | None    # first frame showing the new colour ("colour" clips)
    direction: str | None       # one of DIRECTIONS ("move" clips)
    size: str
    background: str
    shade: int
    num_frames: int = NUM_FRAMES
    fps: float = FPS
    side: int = CLIP_SIDE

    @property
    def change_seconds(self) -> float | None:
        return None if self.change_frame is None else self.change_frame / self.fps


def random_clip(rng: random.Random, *, event: str | None = None, side: int = CLIP_SIDE) -> Clip:
    event = event or rng.choice(EVENTS)
    colour, new_colour = rng.sample(sorted(COLOURS), 2)
    kind = rng.choice(SHAPES)
    size = rng.choice(sorted(SIZES))
    background, shade = rng.choice(BACKGROUNDS), rng.randint(90, 170)
    if event == "colour":
        return Clip(kind, colour, event, new_colour, rng.choice(CHANGE_FRAMES), None, size,
                    background, shade, side=side)
    return Clip(kind, colour, event, None, None, rng.choice(sorted(DIRECTIONS)), size,
                background, shade, side=side)


def frame_state(clip: Clip, i: int) -> tuple[str, float, float]:
    """(colour, cx, cy) of the shape in frame i, centre in pixels."""
    side = clip.side
    if clip.event == "colour":
        colour = clip.new_colour if i >= clip.change_frame else clip.colour
        return colour, side * 0.5, side * 0.5
    (x0, y0), (x1, y1) = DIRECTIONS[clip.direction]
    a = i / (clip.num_frames - 1)
    return clip.colour, side * (x0 + a * (x1 - x0)), side * (y0 + a * (y1 - y0))


def render_clip(clip: Clip) -> list[Image.Image]:
    """The clip's frames as RGB images (deterministic)."""
    frames = []
    r = SIZES[clip.size] * clip.side / 2
    for i in range(clip.num_frames):
        img = Image.new("RGB", (clip.side, clip.side))
        draw = ImageDraw.Draw(img)
        draw_background(draw, clip.background, clip.shade, clip.side)
        colour, cx, cy = frame_state(clip, i)
        draw_shape(draw, clip.kind, colour, cx, cy, r)
        frames.append(img)
    return frames


def frame_timestamps(num_frames: int, fps: float, temporal_patch: int = 2) -> list[float]:
    """Qwen3-VL's stamp per merged frame group: the mean time of the group's first and last frame
    (frames padded by repeating the last one), as in Qwen3VLProcessor._calculate_timestamps."""
    idx = list(range(num_frames))
    while len(idx) % temporal_patch:
        idx.append(idx[-1])
    times = [i / fps for i in idx]
    return [(times[i] + times[i + temporal_patch - 1]) / 2 for i in range(0, len(times), temporal_patch)]

