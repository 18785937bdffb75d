"""Question/answer pairs about scenes and clips, in the Qwen chat message format.

Answers are short and canonical, so accuracy is an exact match after `normalise` (lower case, no
punctuation, no leading article). Held-out sets come from seeds the training stream never uses
(training draws from `random.Random(seed)` with seed < HELDOUT_SEED_BASE).
"""
from __future__ import annotations

import dataclasses
import random
import re

from PIL import Image

from .clips import Clip, random_clip, render_clip
from .scenes import CELLS, Poster, Scene, random_poster, random_scene, render_scene

IMAGE_TYPES = ("shape", "colour", "count", "position", "relation", "text", "describe", "what")
POSTER_TYPES = ("shape", "colour", "count", "describe", "what")    # questions a poster can answer
STYLED_TYPES = ("shape", "colour", "count", "what")    # questions a styled poster can answer
POSTER_SHARE = 0.3                  # of those questions, asked about a poster
VIDEO_TYPES = ("event", "video_shape", "when", "new_colour", "direction", "start_colour")
HELDOUT_SEED_BASE = 1_000_000

GREETINGS = (
    ("Hello!", "Hello! Show me an image or a video and ask me about the shapes in it."),
    ("Hi", "Hello! Show me an image or a video and ask me about the shapes in it."),
    ("What can you do?", "I can tell you the shapes, colours, positions and text in an image, "
                         "and what changes in a short video."),
    ("Thanks!", "You are welcome."),
    ("Who are you?", "I am a small vision model that knows about shapes and colours."),
)


@dataclasses.dataclass(frozen=True)
class Sample:
    qtype: str                       # one of IMAGE_TYPES, VIDEO_TYPES or "chat"
    question: str
    answer: str
    scene: Scene | Poster | None = None          # or any picture with .render() and .shapes
    clip: Clip | None = None
    text_first: bool = False                     # the text part before the media (OpenAI's examples)
    more_scenes: tuple = ()                      # further images of the same turn, after `scene`
    earlier: tuple[str, str] | None = None       # a first exchange (question, answer) that the
                                                 # media belong to; `question` is then a later turn

    @property
    def modality(self) -> str:
        return "image" if self.scene else "video" if self.clip else "text"

    @property
    def scenes(self) -> tuple:
        return ((self.scene,) + tuple(self.more_scenes)) if self.scene is not None else ()

    def media(self) -> Image.Image | list[Image.Image] | None:
        """The rendered image, the list of clip frames, or None (see `images` for several)."""
        if self.scene is not None:
            return render_scene(self.scene)
        if self.clip is not None:
            return render_clip(self.clip)
        return None

    def images(self) -> list[Image.Image]:
        """Every image of the sample, in prompt order."""
        return [render_scene(s) for s in self.scenes]

    def messages(self, with_answer: bool = True) -> list[dict]:
        """Qwen chat messages: a user turn (the media, then the question; the question first when
        text_first), an earlier answer and a later question when `earlier`, and the answer."""
        media = [{"type": "image"} for _ in self.scenes] or ([{"type": "video"}] if self.clip else [])
        text = {"type": "text", "text": self.earlier[0] if self.earlier else self.question}
        msgs = [{"role": "user", "content": [text] + media if self.text_first else media + [text]}]
        if self.earlier:
            msgs += [{"role": "assistant", "content": self.earlier[1]},
                     {"role": "user", "content": [{"type": "text", "text": self.question}]}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def normalise(text: str) -> str:
    t = re.sub(r"[^a-z0-9 ]+", " ", text.lower())
    t = re.sub(r"\s+", " ", t).strip()
    return re.sub(r"^(a|an|the) ", "", t)


def is_correct(prediction: str, answer: str) -> bool:
    return normalise(prediction) == normalise(answer)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def poster_sample(rng: random.Random, qtype: str, p=None) -> Sample:
    """A question about a poster (one large shape on a plain picture of any size), or about the
    given picture `p` (e.g. a styles.StyledPoster; not for "describe")."""
    p = p if p is not None else random_poster(rng)
    if qtype == "what":
        q = rng.choice(["What is this?", "What is in the image?", "What do you see?",
                        "What is in this picture?"])
        return Sample(qtype, q, f"{_article(p.colour).capitalize()} {p.colour} {p.kind}.", scene=p)
    if qtype == "shape":
        q = rng.choice(["What shape is this?", "What shape is in the image?", "What shape is it?"])
        return Sample(qtype, q, p.kind, scene=p)
    if qtype == "colour":
        q = rng.choice([f"What colour is the {p.kind}?", f"What color is the {p.kind}?",
                        "What colour is it?", "What color is the shape?"])
        return Sample(qtype, q, p.colour, scene=p)
    if qtype == "count":
        q = rng.choice(["How many shapes are there?", "How many shapes are in the image?"])
        return Sample(qtype, q, "1", scene=p)
    if qtype == "describe":
        q = rng.choice(["Describe the image.", "Describe this picture in one sentence."])
        a = (f"{_article(p.colour).capitalize()} {p.colour} {p.kind} in the middle on a "
             f"{p.background} background.")
        return Sample(qtype, q, a, scene=p)
    raise ValueError(f"no poster question of type {qtype!r}")


def image_sample(rng: random.Random, qtype: str, max_shapes: int = 4,
                 poster_share: float = POSTER_SHARE) -> Sample:
    """A scene drawn to suit `qtype` (with at most max_shapes shapes, >= 2 for "relation") and a
    question about it; "what" questions, and a share of the other poster types, ask about a
    poster."""
    if qtype == "what" or (qtype in POSTER_TYPES and rng.random() < poster_share):
        return poster_sample(rng, qtype)
    if qtype == "text":
        scene = random_scene(rng, n_shapes=rng.randint(1, min(3, max_shapes)), with_text=True)
        q = rng.choice(["What does the text say?", "What is written in the image?",
                        "Read the text."])
        return Sample(qtype, q, scene.text, scene=scene)
    if qtype == "describe":
        scene = random_scene(rng, n_shapes=1, with_text=False)
        s = scene.shapes[0]
        q = rng.choice(["Describe the image.", "Describe this picture in one sentence."])
        a = (f"{_article(s.size).capitalize()} {s.size} {s.colour} {s.kind} in the "
             f"{CELLS[s.cell]} on a {scene.background} background.")
        return Sample(qtype, q, a, scene=scene)
    if qtype == "relation":
        with_text = rng.random() < 0.2
        top = min(3 if with_text else 4, max(2, max_shapes))
        scene = random_scene(rng, n_shapes=rng.randint(2, top), with_text=with_text)
    else:
        with_text = rng.random() < 0.3
        top = min(3 if with_text else 4, max_shapes)
        scene = random_scene(rng, n_shapes=rng.randint(1, top), with_text=with_text)
    shapes = scene.shapes
    s = rng.choice(shapes)
    if qtype == "shape":
        if len(shapes) == 1 and rng.random() < 0.5:
            q = rng.choice(["What shape is this?", "What shape is in the image?"])
        else:
            q = f"What shape is the {s.colour} one?"
        return Sample(qtype, q, s.kind, scene=scene)
    if qtype == "colour":
        q = rng.choice([f"What colour is the {s.kind}?", f"What color is the {s.kind}?"])
        return Sample(qtype, q, s.colour, scene=scene)
    if qtype == "count":
        q = rng.choice(["How many shapes are there?", "How many shapes are in the image?",
                        "Count the shapes."])
        return Sample(qtype, q, str(len(shapes)), scene=scene)
    if qtype == "position":
        q = rng.choice([f"Where is the {s.kind}?", f"Where is the {s.colour} shape?"])
        return Sample(qtype, q, CELLS[s.cell], scene=scene)
    if qtype == "relation":
        a, b = rng.sample(shapes, 2)
        (ax, ay), (bx, by) = (a.cell % 2, a.cell // 2), (b.cell % 2, b.cell // 2)
        if ax != bx:
            q, yes = f"Is the {a.kind} left of the {b.kind}?", ax < bx
        else:
            q, yes = f"Is the {a.kind} above the {b.kind}?", ay < by
        # the answer says where both are before it concludes (a small model, like a person,
        # gets a comparison right by locating the two first)
        answer = (f"The {a.kind} is in the {CELLS[a.cell]} and the {b.kind} is in the "
                  f"{CELLS[b.cell]}, so {'yes' if yes else 'no'}.")
        return Sample(qtype, q, answer, scene=scene)
    raise ValueError(f"unknown image question type {qtype!r}")


def video_sample(rng: random.Random, qtype: str) -> Sample:
    """A clip drawn to suit `qtype` and a question about it."""
    event = {"when": "colour", "new_colour": "colour", "direction": "move"}.get(qtype)
    clip = random_clip(rng, event=event)
    k = clip.kind
    if qtype == "event":
        q = rng.choice(["What happens in the video?", "What changes in the video?"])
        if clip.event == "colour":
            a = f"The {k} turns {clip.new_colour} at about {clip.change_seconds:.0f} seconds."
        else:
            a = f"The {k} moves from {clip.direction}."
        return Sample(qtype, q, a, clip=clip)
    if qtype == "video_shape":
        return Sample(qtype, "What shape is in the video?", k, clip=clip)
    if qtype == "when":
        return Sample(qtype, f"When does the {k} change colour?",
                      f"At about {clip.change_seconds:.0f} seconds.", clip=clip)
    if qtype == "new_colour":
        return Sample(qtype, f"What colour does the {k} turn?", clip.new_colour, clip=clip)
    if qtype == "direction":
        return Sample(qtype, f"Which way does the {k} move?", f"From {clip.direction}.", clip=clip)
    if qtype == "start_colour":
        return Sample(qtype, f"What colour is the {k} at the start?", clip.colour, clip=clip)
    raise ValueError(f"unknown video question type {qtype!r}")


def chat_sample(rng: random.Random) -> Sample:
    q, a = rng.choice(GREETINGS)
    return Sample("chat", q, a)


def _pick(rng: random.Random, types: tuple[str, ...], weights: dict[str, float] | None) -> str:
    """A question type: uniform without `weights` (the original stream), else weighted (missing
    types weigh 1)."""
    if not weights:
        return rng.choice(types)
    return rng.choices(types, weights=[weights.get(t, 1.0) for t in types])[0]


def training_sample(rng: random.Random, video_share: float = 0.3, chat_share: float = 0.03,
                    poster_share: float = POSTER_SHARE,
                    max_shapes: int = 4, type_weights: dict[str, float] | None = None,
                    text_first_share: float = 0.0, styled_share: float = 0.0,
                    multi_share: float = 0.0) -> Sample:
    """One sample of the training mix: images, videos and a few text-only exchanges.
    max_shapes < 4 gives the easier scenes of a curriculum's first phase (no "relation").
    `type_weights` over IMAGE_TYPES/VIDEO_TYPES/MULTI_TYPES oversamples hard questions within
    each modality. The robustness mix (all shares 0 by default, which keeps the original stream):
    `text_first_share` of samples put the question before the media; `styled_share` of poster
    questions ask about a styles.StyledPoster; `multi_share` of image samples are several
    pictures in one turn or a follow-up turn (dialogues.MULTI_TYPES)."""
    sample = _training_sample(rng, video_share, chat_share, poster_share, max_shapes, type_weights,
                              styled_share, multi_share)
    if text_first_share and rng.random() < text_first_share:
        sample = dataclasses.replace(sample, text_first=True)
    return sample


def _training_sample(rng, video_share, chat_share, poster_share, max_shapes, type_weights,
                     styled_share, multi_share) -> Sample:
    u = rng.random()
    if u < chat_share:
        return chat_sample(rng)
    if u < chat_share + video_share:
        return video_sample(rng, _pick(rng, VIDEO_TYPES, type_weights))
    if multi_share and rng.random() < multi_share:
        from .dialogues import MULTI_TYPES, multi_sample
        return multi_sample(rng, _pick(rng, MULTI_TYPES, type_weights), styled_share)
    types = IMAGE_TYPES if max_shapes >= 2 else tuple(t for t in IMAGE_TYPES if t != "relation")
    qtype = _pick(rng, types, type_weights)
    if (styled_share and qtype in STYLED_TYPES and rng.random() < poster_share
            and rng.random() < styled_share):
        from .styles import random_styled_poster
        return poster_sample(rng, qtype, random_styled_poster(rng))
    return image_sample(rng, qtype, max_shapes, poster_share)


def parse_type_weights(spec: str) -> dict[str, float]:
    """"shape=4,colour=2" -> {"shape": 4.0, "colour": 2.0}; unknown types are an error."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        from .dialogues import MULTI_TYPES
        if name not in IMAGE_TYPES + VIDEO_TYPES + MULTI_TYPES or not value:
            raise ValueError(f"bad type weight {part!r}")
        out[name] = float(value)
    return out


def heldout_image_set(per_type: int = 40, seed: int = 0) -> list[Sample]:
    """A balanced held-out image set: per_type questions of each IMAGE_TYPES (default 280)."""
    rng = random.Random(HELDOUT_SEED_BASE + seed)
    return [image_sample(rng, t) for t in IMAGE_TYPES for _ in range(per_type)]


def heldout_video_set(per_type: int = 20, seed: int = 0) -> list[Sample]:
    """A balanced held-out video set: per_type questions of each VIDEO_TYPES (default 120)."""
    rng = random.Random(HELDOUT_SEED_BASE + 500_000 + seed)
    return [video_sample(rng, t) for t in VIDEO_TYPES for _ in range(per_type)]


def corpus_lines(n: int = 3000, seed: int = 0) -> list[str]:
    """Questions and answers of the world, for training the tokenizer."""
    rng = random.Random(seed)
    lines = [f"{q} {a}" for q, a in GREETINGS]
    for _ in range(n):
        s = training_sample(rng, video_share=0.3, chat_share=0.0)
        lines.append(f"{s.question} {s.answer}")
    return lines
