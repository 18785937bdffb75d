"""Still scenes of the synthetic visual world: shapes in a 2x2 layout, sometimes a printed word;
and posters: one shape drawn large near the middle of a plain picture of any size and background,
which is what a user who draws or photographs "a red triangle" uploads.

A scene is a frozen description (`Scene` or `Poster`); `render_scene` draws either
deterministically with Pillow. Invariants the question generator relies on:
  * every object in a scene has a distinct shape and a distinct colour (so "the red one" and
    "the circle" each name exactly one object);
  * every object, and the printed text, sits in its own quadrant cell; the quadrant is its position;
  * a poster's shape colour stands out from its background.
"""
from __future__ import annotations

import dataclasses
import random
from functools import lru_cache

from PIL import Image, ImageDraw, ImageFont

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 180), "orange": (250, 140, 0), "white": (255, 255, 255), "black": (0, 0, 0),
}
SIZES = {"small": 0.26, "large": 0.40}          # radius as a fraction of the cell side
BACKGROUNDS = ("plain", "striped", "dotted")
CELLS = ("top left", "top right", "bottom left", "bottom right")
TEXTS = ("CAT", "DOG", "SUN", "STOP", "HELLO", "OK", "7", "42")
IMAGE_SIDE = 128                                # a multiple of 32: the processor keeps it as is


@dataclasses.dataclass(frozen=True)
class Shape:
    kind: str          # one of SHAPES
    colour: str        # one of COLOURS
    size: str          # one of SIZES
    cell: int          # index into CELLS
    dx: float = 0.0    # jitter of the centre within the cell, fraction of the cell side
    dy: float = 0.0


@dataclasses.dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str                   # one of BACKGROUNDS
    shade: int                        # grey level of the background, 90..170
    text: str | None = None           # printed text, or None
    text_cell: int | None = None      # quadrant of the text
    side: int = IMAGE_SIDE


def random_scene(rng: random.Random, *, n_shapes: int | None = None, with_text: bool | None = None,
                 side: int = IMAGE_SIDE) -> Scene:
    """Draw a scene: 1-4 shapes (1-3 with text), distinct shapes and colours, one per quadrant."""
    if with_text is None:
        with_text = rng.random() < 0.3
    if n_shapes is None:
        n_shapes = rng.randint(1, 3 if with_text else 4)
    cells = rng.sample(range(4), n_shapes + (1 if with_text else 0))
    kinds = rng.sample(SHAPES, n_shapes)
    colours = rng.sample(sorted(COLOURS), n_shapes)
    shapes = tuple(
        Shape(kinds[i], colours[i], rng.choice(sorted(SIZES)), cells[i],
              rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06))
        for i in range(n_shapes))
    return Scene(shapes, rng.choice(BACKGROUNDS), rng.randint(90, 170),
                 rng.choice(TEXTS) if with_text else None,
                 cells[-1] if with_text else None, side)


POSTER_BACKGROUNDS = {
    "white": (255, 255, 255), "cream": (245, 240, 222), "light grey": (205, 205, 205),
    "grey": (128, 128, 128), "dark grey": (60, 60, 60), "black": (0, 0, 0),
}


@dataclasses.dataclass(frozen=True)
class Poster:
    kind: str
    colour: str
    background: str                   # one of POSTER_BACKGROUNDS
    width: int
    height: int
    cx: float                         # centre, fraction of width / height
    cy: float
    radius: float                     # fraction of the shorter side

    @property
    def shapes(self) -> tuple[Shape, ...]:
        """The poster as one large shape (for questions that only need kind and colour)."""
        return (Shape(self.kind, self.colour, "large", -1),)


def _contrast(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b))


def random_poster(rng: random.Random) -> Poster:
    """One shape, 18-45% of the shorter side in radius, near the middle of a plain picture 96-512
    pixels wide with an aspect ratio between 0.6 and 1.7, on a background it stands out from."""
    kind = rng.choice(SHAPES)
    colour = rng.choice(sorted(COLOURS))
    backgrounds = [b for b in sorted(POSTER_BACKGROUNDS)
                   if _contrast(POSTER_BACKGROUNDS[b], COLOURS[colour]) > 150]
    width = rng.randrange(96, 513, 8)
    height = max(64, min(768, int(width / rng.uniform(0.6, 1.7))))
    return Poster(kind, colour, rng.choice(backgrounds), width, height,
                  0.5 + rng.uniform(-0.1, 0.1), 0.5 + rng.uniform(-0.1, 0.1), rng.uniform(0.18, 0.45))


def render_poster(p: Poster) -> Image.Image:
    img = Image.new("RGB", (p.width, p.height), POSTER_BACKGROUNDS[p.background])
    draw_shape(ImageDraw.Draw(img), p.kind, p.colour, p.cx * p.width, p.cy * p.height,
               p.radius * min(p.width, p.height))
    return img


def cell_centre(cell: int, side: int) -> tuple[float, float]:
    half = side / 2
    return (cell % 2) * half + half / 2, (cell // 2) * half + half / 2


def draw_background(draw: ImageDraw.ImageDraw, kind: str, shade: int, side: int) -> None:
    draw.rectangle([0, 0, side, side], fill=(shade,) * 3)
    other = (shade - 35,) * 3
    if kind == "striped":
        for x in range(0, side, 12):
            draw.rectangle([x, 0, x + 5, side], fill=other)
    elif kind == "dotted":
        for y in range(4, side, 12):
            for x in range(4, side, 12):
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=other)


def shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Vertices of a polygonal shape centred at (cx, cy) with radius r; None for a circle."""
    import math
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.7, cy), (cx, cy + r), (cx - r * 0.7, cy)]
    if kind == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if kind == "cross":
        t = r * 0.33
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if kind == "circle":
        return None
    raise ValueError(f"unknown shape {kind!r}")


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, colour: str, cx: float, cy: float,
               r: float) -> None:
    fill = COLOURS[colour]
    poly = shape_polygon(kind, cx, cy, r)
    if poly is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


@lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_text(draw: ImageDraw.ImageDraw, text: str, cell: int, side: int) -> None:
    """Black text on a white label, centred in its quadrant."""
    cx, cy = cell_centre(cell, side)
    font = _font(max(12, side // 8))
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    w, h = x1 - x0, y1 - y0
    left, top = cx - w / 2 - x0, cy - h / 2 - y0
    draw.rectangle([cx - w / 2 - 3, cy - h / 2 - 3, cx + w / 2 + 3, cy + h / 2 + 3],
                   fill=(255, 255, 255))
    draw.text((left, top), text, fill=(0, 0, 0), font=font)


def render_scene(scene: Scene | Poster) -> Image.Image:
    """Draw the scene as an RGB image of side x side pixels (a poster at its own size; any other
    picture description, e.g. a styles.StyledPoster, draws itself)."""
    if not isinstance(scene, (Scene, Poster)):
        return scene.render()
    if isinstance(scene, Poster):
        return render_poster(scene)
    side = scene.side
    img = Image.new("RGB", (side, side))
    draw = ImageDraw.Draw(img)
    draw_background(draw, scene.background, scene.shade, side)
    cell_side = side / 2
    for s in scene.shapes:
        cx, cy = cell_centre(s.cell, side)
        draw_shape(draw, s.kind, s.colour, cx + s.dx * cell_side, cy + s.dy * cell_side,
                   SIZES[s.size] * cell_side)
    if scene.text is not None:
        draw_text(draw, scene.text, scene.text_cell, side)
    return img
