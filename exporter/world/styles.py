"""Styled posters: one shape drawn the way users really draw or photograph it, for training.

A `StyledPoster` is a poster with the variations users send: the shape at 4-92% of the frame's
area (its bounding box), anywhere in the frame (wholly inside it), filled, filled with a dark
outline, or only outlined; its proportions varied within its kind (a star's inner radius, a
diamond's width, a cross's arms: PROPORTIONS); slightly rotated; its colour dimmed or brightened
and jittered around the named colour; on a
flat background (white, off-white, a light or mid colour, grey) or a photo-like texture (blurred
noise blobs and grain); at an aspect ratio from 1:3 to 3:1; then optionally blurred and
JPEG-compressed. Drawn with Pillow, like the rest of the training world.

The evaluation set draws its pictures with different code and parameters (exporter.world.sketches);
nothing here is shared with it but the shape and colour names.

Invariant the questions rely on: the shape's colour stands out from every background pixel
(`contrast` > 120 against the background's mean colour, and texture stays within +-30 of it).
"""
from __future__ import annotations

import dataclasses
import io
import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .scenes import COLOURS, SHAPES, shape_polygon

FILLS = ("filled", "outlined", "outline only")
# People draw each kind with its own proportions; a styled poster's shape varies within these
# (kind: what varies, low, high; all as a fraction of the radius). scenes.shape_polygon draws
# one fixed point of each range.
PROPORTIONS = {"square": ("half side", 0.72, 0.9), "triangle": ("base below centre", 0.55, 0.9),
               "diamond": ("half width", 0.5, 0.82), "star": ("inner radius", 0.34, 0.56),
               "cross": ("half arm width", 0.24, 0.42), "circle": ("none", 1.0, 1.0)}


@dataclasses.dataclass(frozen=True)
class StyledPoster:
    kind: str
    colour: str
    rgb: tuple[int, int, int]          # the drawn colour (jittered around COLOURS[colour])
    width: int
    height: int
    cx: float                          # centre, pixels
    cy: float
    radius: float                      # pixels
    rotation: float                    # degrees
    fill: str                          # one of FILLS
    background: tuple[int, int, int]   # flat colour, or the texture's mean
    texture_seed: int | None           # photo-like texture when set
    blur: float                        # Gaussian radius in pixels (0: none)
    jpeg: int | None                   # JPEG quality, or None for lossless
    proportion: float | None = None    # 0-1: the shape's proportions within its kind's range
                                       # (PROPORTIONS); None draws scenes.shape_polygon's

    @property
    def shapes(self):
        from .scenes import Shape
        return (Shape(self.kind, self.colour, "large", -1),)

    def render(self) -> Image.Image:
        return render_styled(self)


def contrast(a, b) -> float:
    return float(sum(abs(int(x) - int(y)) for x, y in zip(a, b)))


def _background(rng: random.Random) -> tuple[int, int, int]:
    u = rng.random()
    if u < 0.3:
        return (255, 255, 255)
    if u < 0.5:                                            # off-white, cream, paper
        return tuple(rng.randint(225, 252) for _ in range(3))
    if u < 0.8:                                            # light colour
        return tuple(rng.randint(150, 250) for _ in range(3))
    return (g := rng.randint(40, 200), g, g) if rng.random() < 0.5 else \
        tuple(rng.randint(20, 120) for _ in range(3))      # grey, or a dark colour


def random_styled_poster(rng: random.Random) -> StyledPoster:
    kind = rng.choice(SHAPES)
    for _ in range(100):
        colour = rng.choice(sorted(COLOURS))
        base = COLOURS[colour]
        light = rng.uniform(0.8, 1.04)                     # lighting: the whole colour dimmer or brighter
        rgb = tuple(max(0, min(255, int(c * light) + rng.randint(-25, 25))) for c in base)
        bg = _background(rng)
        if contrast(rgb, bg) > 150:
            break
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    side = rng.randrange(96, 700)
    width, height = (side, max(48, int(side / aspect))) if aspect >= 1 else (max(48, int(side * aspect)), side)
    short = min(width, height)
    area = rng.uniform(0.04, 0.92)                          # bounding box over the frame's area
    radius = min(short * 0.48, math.sqrt(area * width * height) / 2)
    radius = max(radius, 6.0)
    cx = rng.uniform(radius + 1, width - radius - 1)
    cy = rng.uniform(radius + 1, height - radius - 1)
    fill = rng.choice(FILLS)
    return StyledPoster(kind, colour, rgb, width, height, cx, cy, radius,
                        rng.uniform(-12, 12), fill, bg,
                        rng.randrange(1 << 30) if rng.random() < 0.25 else None,
                        rng.choice([0, 0, 0.6, 1.2, 2.0]) * max(1.0, short / 200),
                        rng.randint(20, 95) if rng.random() < 0.4 else None, rng.random())


def styled_polygon(kind: str, cx: float, cy: float, r: float,
                   proportion: float | None) -> list[tuple[float, float]] | None:
    """The shape's vertices with its proportions at `proportion` (0-1) of PROPORTIONS' range;
    None for a circle."""
    if proportion is None or kind == "circle":
        return shape_polygon(kind, cx, cy, r)
    _, lo, hi = PROPORTIONS[kind]
    k = lo + (hi - lo) * proportion
    if kind == "square":
        return [(cx - r * k, cy - r * k), (cx + r * k, cy - r * k), (cx + r * k, cy + r * k),
                (cx - r * k, cy + r * k)]
    if kind == "triangle":                  # apex at the top; wider as the base comes up
        w = r * (0.8 + 0.25 * (1 - proportion))
        return [(cx, cy - r), (cx + w, cy + r * k), (cx - w, cy + r * k)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * k, cy), (cx, cy + r), (cx - r * k, cy)]
    if kind == "star":
        return [(cx + (r if i % 2 == 0 else r * k) * math.cos(-math.pi / 2 + i * math.pi / 5),
                 cy + (r if i % 2 == 0 else r * k) * math.sin(-math.pi / 2 + i * math.pi / 5))
                for i in range(10)]
    if kind == "cross":
        t = r * k
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(f"unknown shape {kind!r}")


def _texture(p: StyledPoster) -> Image.Image:
    """Photo-like: large soft blobs of +-30 around the mean colour, plus fine grain."""
    r = np.random.default_rng(p.texture_seed)
    coarse = r.normal(0, 1, (max(2, p.height // 24), max(2, p.width // 24), 3))
    img = Image.fromarray(np.uint8(np.clip(coarse * 40 + 128, 0, 255)))
    blobs = np.asarray(img.resize((p.width, p.height), Image.BICUBIC), np.float32) - 128
    grain = r.normal(0, 6, (p.height, p.width, 1))
    a = np.clip(np.asarray(p.background, np.float32) + np.clip(blobs * 0.6, -30, 30) + grain, 0, 255)
    return Image.fromarray(np.uint8(a))


def _rotate(points, cx, cy, degrees):
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def render_styled(p: StyledPoster) -> Image.Image:
    img = _texture(p) if p.texture_seed is not None else Image.new("RGB", (p.width, p.height), p.background)
    draw = ImageDraw.Draw(img)
    stroke = max(2, int(p.radius * 0.12))
    poly = styled_polygon(p.kind, p.cx, p.cy, p.radius, p.proportion)
    dark = tuple(c // 3 for c in p.rgb)
    fill = None if p.fill == "outline only" else p.rgb
    line = {"filled": None, "outlined": dark, "outline only": p.rgb}[p.fill]
    if poly is None:
        box = [p.cx - p.radius, p.cy - p.radius, p.cx + p.radius, p.cy + p.radius]
        draw.ellipse(box, fill=fill, outline=line, width=stroke if line else 0)
    else:
        pts = _rotate(poly, p.cx, p.cy, p.rotation)
        draw.polygon(pts, fill=fill, outline=line, width=stroke if line else 0)
    if p.blur:
        img = img.filter(ImageFilter.GaussianBlur(p.blur))
    if p.jpeg:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=p.jpeg)
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img
