"""Questions over several pictures in one turn, and follow-up questions in a later turn.

Several pictures: two or three one-shape pictures (posters or styled posters) with distinct shapes
and distinct colours, so "which picture has the circle?" has exactly one answer ("The first.",
"The second.", "The third.") and "the second picture" names exactly one shape.

Follow-ups: the picture comes with a first question and its answer; the question asked is the
user's next turn, without media ("What colour is it?"), as a chat client sends it.
"""
from __future__ import annotations

import random

from .scenes import random_poster
from .styles import random_styled_poster

MULTI_TYPES = ("which_image", "multi_shape", "multi_colour", "followup_shape", "followup_colour")
ORDINALS = ("first", "second", "third")


def one_picture(rng: random.Random, styled_share: float):
    return random_styled_poster(rng) if rng.random() < styled_share else random_poster(rng)


def distinct_pictures(rng: random.Random, n: int, styled_share: float) -> list:
    """n one-shape pictures, no two sharing a shape or a colour."""
    out: list = []
    while len(out) < n:
        p = one_picture(rng, styled_share)
        if all(p.kind != q.kind and p.colour != q.colour for q in out):
            out.append(p)
    return out


def _sample(*args, **kw):
    from .qa import Sample
    return Sample(*args, **kw)


def multi_sample(rng: random.Random, qtype: str, styled_share: float = 0.5):
    """A question of one of MULTI_TYPES."""
    if qtype.startswith("followup"):
        return followup_sample(rng, qtype, styled_share)
    pics = distinct_pictures(rng, rng.choice((2, 2, 3)), styled_share)
    i = rng.randrange(len(pics))
    p, nth = pics[i], ORDINALS[i]
    if qtype == "which_image":
        q = rng.choice([f"Which picture has the {p.kind}?", f"Which image shows the {p.kind}?",
                        f"Which picture has the {p.colour} shape?",
                        f"In which image is the {p.colour} shape?"])
        a = f"The {nth}."
    elif qtype == "multi_shape":
        q = rng.choice([f"What shape is in the {nth} picture?", f"What shape is in the {nth} image?"])
        a = p.kind
    elif qtype == "multi_colour":
        q = rng.choice([f"What colour is the shape in the {nth} picture?",
                        f"What color is the shape in the {nth} image?"])
        a = p.colour
    else:
        raise ValueError(f"unknown multi-image question type {qtype!r}")
    return _sample(qtype, q, a, scene=pics[0], more_scenes=tuple(pics[1:]))


def followup_sample(rng: random.Random, qtype: str, styled_share: float = 0.5):
    p = one_picture(rng, styled_share)
    first = rng.choice(["shape", "colour", "what"])
    if first == "shape":
        earlier = (rng.choice(["What shape is this?", "What shape is in the image?"]), p.kind)
    elif first == "colour":
        earlier = (rng.choice(["What colour is it?", "What color is the shape?"]), p.colour)
    else:
        art = "An" if p.colour[0] in "aeiou" else "A"
        earlier = (rng.choice(["What is this?", "What do you see?"]), f"{art} {p.colour} {p.kind}.")
    if qtype == "followup_shape":
        q, a = rng.choice(["And what shape is it?", "What shape is it?", "Which shape is that?"]), p.kind
    elif qtype == "followup_colour":
        q = rng.choice(["And what colour is it?", "What colour is it?", "What color is it?",
                        f"What colour is the {p.kind}?"])
        a = p.colour
    else:
        raise ValueError(f"unknown follow-up question type {qtype!r}")
    return _sample(qtype, q, a, scene=p, earlier=earlier)

