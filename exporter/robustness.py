"""The robustness evaluation: what users really send, drawn by a generator training never uses.

    python -m exporter.robustness --model build/models/default [--json report.json]

Questions about exporter.world.sketches drawings (numpy-rasterised; seeds from SKETCH_SEED_BASE):
- "shape" and "colour" questions about one drawing in each style of sketches.STYLES;
- "which_image", "multi_shape", "multi_colour": two or three drawings in one turn;
- "followup_shape", "followup_colour": the drawing and a first exchange, then the question as the
  next turn;
each asked with the image first and with the text first. Question wordings include some training
never uses ("What shape is in this picture?", "What colour is this shape?").
Accuracy is reported by question type, by part order and by style (`score`); the model card's bar
is >= 95% on shape and colour questions in both orders.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import random
import sys
from pathlib import Path

from exporter.world.dialogues import ORDINALS
from exporter.world.qa import Sample, is_correct
from exporter.world.scenes import SHAPES
from exporter.world.sketches import SKETCH_SEED_BASE, STYLES, random_sketch

ORDERS = ("image first", "text first")
SHAPE_QUESTIONS = ("What shape is this?", "What shape is in the image?", "What shape is it?",
                   "What shape is in this picture?")
COLOUR_QUESTIONS = ("What colour is it?", "What color is the shape?", "What colour is the {kind}?",
                    "What colour is this shape?")


@dataclasses.dataclass(frozen=True)
class Item:
    sample: Sample
    style: str
    order: str


def robustness_set(per_cell: int = 6, multi_per_type: int = 12, seed: int = 0) -> list[Item]:
    """per_cell questions per (style, shape/colour, order), cycling through the six shapes, and
    multi_per_type per (multi-picture or follow-up type, order); 13*2*2*6 + 5*2*12 = 432 items."""
    rng = random.Random(SKETCH_SEED_BASE + seed)
    items: list[Item] = []
    for style in STYLES:
        for qtype in ("shape", "colour"):
            for order in ORDERS:
                for i in range(per_cell):
                    sk = random_sketch(rng, style, kind=SHAPES[i % len(SHAPES)])
                    if qtype == "shape":
                        q, a = rng.choice(SHAPE_QUESTIONS), sk.kind
                    else:
                        q, a = rng.choice(COLOUR_QUESTIONS).format(kind=sk.kind), sk.colour
                    items.append(Item(Sample(qtype, q, a, scene=sk, text_first=order == ORDERS[1]),
                                      style, order))
    for qtype in ("which_image", "multi_shape", "multi_colour", "followup_shape", "followup_colour"):
        for order in ORDERS:
            for _ in range(multi_per_type):
                items.append(Item(_multi(rng, qtype, order == ORDERS[1]), "mixed", order))
    return items


def _distinct(rng: random.Random, n: int) -> list:
    out: list = []
    while len(out) < n:
        sk = random_sketch(rng, rng.choice(STYLES))
        if all(sk.kind != o.kind and sk.colour != o.colour for o in out):
            out.append(sk)
    return out


def _multi(rng: random.Random, qtype: str, text_first: bool) -> Sample:
    if qtype.startswith("followup"):
        sk = _distinct(rng, 1)[0]
        earlier = rng.choice([("What shape is this?", sk.kind), ("What colour is it?", sk.colour)])
        if qtype == "followup_shape":
            q, a = rng.choice(["And what shape is it?", "What shape is it?"]), sk.kind
        else:
            q, a = rng.choice(["And what colour is it?", f"What colour is the {sk.kind}?"]), sk.colour
        return Sample(qtype, q, a, scene=sk, text_first=text_first, earlier=earlier)
    pics = _distinct(rng, rng.choice((2, 3)))
    i = rng.randrange(len(pics))
    p, nth = pics[i], ORDINALS[i]
    if qtype == "which_image":
        q, a = rng.choice([f"Which picture has the {p.kind}?",
                           f"Which image shows the {p.colour} shape?"]), f"The {nth}."
    elif qtype == "multi_shape":
        q, a = f"What shape is in the {nth} picture?", p.kind
    else:
        q, a = f"What colour is the shape in the {nth} image?", p.colour
    return Sample(qtype, q, a, scene=pics[0], more_scenes=tuple(pics[1:]), text_first=text_first)


def score(items: list[Item], answers: list[str]) -> dict:
    """Accuracy overall, by question type, by order, by (type, order) and by style (single-picture
    shape/colour questions), plus the failures."""
    groups: dict[str, dict[str, list[bool]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    failures = []
    for it, got in zip(items, answers):
        ok = is_correct(got, it.sample.answer)
        s = it.sample
        groups["type"][s.qtype].append(ok)
        groups["order"][it.order].append(ok)
        groups["type_order"][f"{s.qtype} / {it.order}"].append(ok)
        if s.qtype in ("shape", "colour"):
            groups["style"][it.style].append(ok)
            groups["shape_colour_order"][it.order].append(ok)
        groups["all"]["all"].append(ok)
        if not ok:
            failures.append((s.qtype, it.style, it.order, s.question, s.answer, got))
    out = {g: {k: sum(v) / len(v) for k, v in d.items()} for g, d in groups.items()}
    out["n"] = len(items)
    out["failures"] = failures
    return out


def evaluate(model_dir: Path, threads: int = 1, per_cell: int = 6, multi_per_type: int = 12,
             log=None) -> dict:
    """The robustness report of a checkpoint through transformers (fp32, greedy)."""
    from exporter.evaluate import answer, load
    from exporter.world.encode import image_processor
    model, tok, pre, vpre = load(model_dir, threads)
    improc = image_processor(pre)
    items = robustness_set(per_cell, multi_per_type)
    answers = []
    for i, it in enumerate(items):
        answers.append(answer(model, tok, it.sample, pre, vpre, improc))
        if log and i % 100 == 0:
            log(f"{i}/{len(items)}")
    return score(items, answers)


def print_report(rep: dict, out=sys.stdout) -> None:
    for group in ("all", "shape_colour_order", "order", "type", "type_order", "style"):
        print(f"{group}:", file=out)
        for k, v in rep.get(group, {}).items():
            print(f"  {k:32s} {v:.3f}", file=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/models/default"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-cell", type=int, default=6)
    ap.add_argument("--multi-per-type", type=int, default=12)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rep = evaluate(args.model, args.threads, args.per_cell, args.multi_per_type,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print_report(rep)
    for f in rep["failures"][:40]:
        print("  FAIL", f)
    if args.json:
        args.json.write_text(json.dumps(rep, indent=2))


if __name__ == "__main__":
    main()
