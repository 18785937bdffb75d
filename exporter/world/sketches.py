"""The robustness evaluation's own drawings: a generator separate from training's.

Training draws with Pillow (scenes.py, styles.py). This module rasterises with numpy instead:
anti-aliased coverage from 3x3 supersampling, its own shape geometry (an equilateral triangle, a
star with inner radius 0.5, a diamond of aspect 0.6, a cross of arm width 0.6 r, a square of side
1.5 r), colours jittered in HSV rather than RGB, its own textures (sums of random sinusoids and
value noise, "paper" and "wood"), a box blur rather than a Gaussian one, and JPEG qualities 30-85.
Its seeds start at SKETCH_SEED_BASE, far above anything training draws (training seeds < 1e6).

Each `Sketch` has one `style`: "clean" (a filled, centred, medium shape on white, PNG) or exactly
one departure from it (STYLES), or "mixed" (all departures drawn at random), so accuracy can be
read per style. A shape's "share of the frame" is its bounding box's area over the frame's area.
Invariant: the shape's colour differs from the background's mean by more than 150 (sum over RGB).
"""
from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import random

import numpy as np
from PIL import Image, ImageFilter

from .scenes import COLOURS, SHAPES, Shape

SKETCH_SEED_BASE = 3_000_000
STYLES = ("clean", "small", "large", "off-centre", "outline", "outline only", "blurred", "jpeg",
          "off-white", "light colour", "texture", "aspect", "mixed")


@dataclasses.dataclass(frozen=True)
class Sketch:
    style: str
    kind: str
    colour: str
    rgb: tuple[int, int, int]
    width: int
    height: int
    cx: float
    cy: float
    radius: float                      # half the bounding box side, pixels
    rotation: float                    # degrees
    fill: str                          # "filled", "outlined" or "outline only"
    background: str                    # "white", "off-white", "light colour", "texture"
    bg_rgb: tuple[int, int, int]
    seed: int
    blur: int                          # box blur radius in pixels
    jpeg: int | None

    @property
    def shapes(self) -> tuple[Shape, ...]:
        return (Shape(self.kind, self.colour, "large", -1),)

    def render(self) -> Image.Image:
        return render_sketch(self)


def _hsv_jitter(rng: random.Random, colour: str) -> tuple[int, int, int]:
    r, g, b = (c / 255 for c in COLOURS[colour])
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    h = (h + rng.uniform(-0.025, 0.025)) % 1.0
    s = min(1.0, max(0.0, s * rng.uniform(0.85, 1.0)))
    v = min(1.0, max(0.0, v * rng.uniform(0.85, 1.0) if colour != "black" else rng.uniform(0, 0.15)))
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, v))


def _contrast(a, b) -> float:
    return float(sum(abs(int(x) - int(y)) for x, y in zip(a, b)))


def random_sketch(rng: random.Random, style: str, kind: str | None = None,
                  colour: str | None = None) -> Sketch:
    mixed = style == "mixed"
    pick = lambda s: mixed and rng.random() < 0.5 or style == s   # noqa: E731
    background = ("texture" if pick("texture") else "light colour" if pick("light colour")
                  else "off-white" if pick("off-white") else "white")
    bg_rgb = {"white": (255, 255, 255),
              "off-white": tuple(rng.randint(232, 250) for _ in range(3)),
              "light colour": tuple(int(c * 255) for c in colorsys.hsv_to_rgb(
                  rng.random(), rng.uniform(0.12, 0.35), rng.uniform(0.85, 1.0))),
              "texture": tuple(rng.randint(170, 225) for _ in range(3))}[background]
    kind = kind or rng.choice(SHAPES)
    colours = [c for c in sorted(COLOURS) if _contrast(COLOURS[c], bg_rgb) > 220]
    colour = colour if colour in colours else rng.choice(colours)
    rgb = _hsv_jitter(rng, colour)
    if pick("aspect"):
        aspect = rng.choice([rng.uniform(0.4, 0.6), rng.uniform(1.7, 2.5)])
    else:
        aspect = rng.uniform(0.8, 1.3)
    long_side = rng.randrange(160, 640)
    width, height = ((long_side, int(long_side / aspect)) if aspect >= 1
                     else (int(long_side * aspect), long_side))
    share = (rng.uniform(0.05, 0.15) if pick("small") else rng.uniform(0.6, 0.9) if pick("large")
             else rng.uniform(0.2, 0.4))
    radius = min(math.sqrt(share * width * height) / 2, min(width, height) / 2 - 2)
    if pick("off-centre"):
        cx, cy = (rng.uniform(radius + 1, width - radius - 1),
                  rng.uniform(radius + 1, height - radius - 1))
    else:
        cx, cy = width / 2, height / 2
    fill = "outline only" if pick("outline only") else "outlined" if pick("outline") else "filled"
    blur = max(1, int(min(width, height) / 150)) if pick("blurred") else 0
    jpeg = rng.randint(30, 85) if pick("jpeg") else None
    return Sketch(style, kind, colour, rgb, width, height, cx, cy, radius, rng.uniform(-8, 8),
                  fill, background, bg_rgb, rng.randrange(1 << 30), blur, jpeg)


def polygon(kind: str, r: float) -> np.ndarray | None:
    """Vertices around (0, 0) for a bounding box of half-side about r; None for a circle."""
    if kind == "circle":
        return None
    if kind == "square":
        return np.array([(-r, -r), (r, -r), (r, r), (-r, r)]) * 0.75
    if kind == "triangle":                    # equilateral, apex up, centred on its bbox
        h = r * 1.7
        return np.array([(0, -h / 2), (r, h / 2), (-r, h / 2)])
    if kind == "diamond":
        return np.array([(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)])
    if kind == "star":
        a = -np.pi / 2 + np.arange(10) * np.pi / 5
        rad = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        return np.stack([rad * np.cos(a), rad * np.sin(a)], 1)
    if kind == "cross":
        t = 0.3 * r
        return np.array([(-t, -r), (t, -r), (t, -t), (r, -t), (r, t), (t, t), (t, r), (-t, r),
                         (-t, t), (-r, t), (-r, -t), (-t, -t)])
    raise ValueError(f"unknown shape {kind!r}")


def _inside(kind: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Even-odd point-in-shape test for coordinates relative to the centre."""
    poly = polygon(kind, r)
    if poly is None:
        return x * x + y * y <= r * r
    inside = np.zeros(x.shape, bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, 0)):
        crosses = (y0 > y) != (y1 > y)
        xc = x0 + (y - y0) * (x1 - x0) / ((y1 - y0) if y1 != y0 else 1e-9)
        inside ^= crosses & (x < xc)
    return inside


def coverage(s: Sketch) -> np.ndarray:
    """[H, W] fraction of each pixel covered by the drawn stroke or fill (3x3 supersampled)."""
    k = 3
    ys, xs = np.mgrid[0:s.height * k, 0:s.width * k].astype(np.float32)
    x, y = (xs + 0.5) / k - s.cx, (ys + 0.5) / k - s.cy
    t = math.radians(s.rotation)
    x, y = x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)
    outer = _inside(s.kind, x, y, s.radius)
    if s.fill == "filled":
        m = outer
    else:
        inner = _inside(s.kind, x, y, s.radius * 0.85)
        m = outer & ~inner if s.fill == "outline only" else outer
    return m.reshape(s.height, k, s.width, k).mean((1, 3))


def _texture(s: Sketch) -> np.ndarray:
    r = np.random.default_rng(s.seed)
    ys, xs = np.mgrid[0:s.height, 0:s.width].astype(np.float32)
    field = np.zeros_like(xs)
    for _ in range(6):                                  # grain of paper / wood: random sinusoids
        f, a = r.uniform(0.005, 0.08), r.uniform(0, np.pi)
        field += np.sin(f * (xs * np.cos(a) + ys * np.sin(a)) + r.uniform(0, 6.3)) * r.uniform(3, 9)
    field += r.normal(0, 5, field.shape)
    tint = r.uniform(0.9, 1.1, 3)
    return np.clip(np.asarray(s.bg_rgb, np.float32)[None, None] * tint + field[..., None], 0, 255)


def render_sketch(s: Sketch) -> Image.Image:
    bg = (_texture(s) if s.background == "texture"
          else np.broadcast_to(np.asarray(s.bg_rgb, np.float32), (s.height, s.width, 3)))
    cov = coverage(s)[..., None]
    ink = np.asarray(s.rgb, np.float32)
    if s.fill == "outlined":                          # a dark outline around the filled shape
        rim = cov - coverage(dataclasses.replace(s, radius=s.radius * 0.9))[..., None]
        img = bg * (1 - cov) + ink * (cov - rim) + ink * 0.3 * rim
    else:
        img = bg * (1 - cov) + ink * cov
    out = Image.fromarray(np.uint8(np.clip(img, 0, 255)))
    if s.blur:
        out = out.filter(ImageFilter.BoxBlur(s.blur))
    if s.jpeg:
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=s.jpeg)
        out = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return out
