"""Held-out accuracy of a checkpoint through transformers (fp32, greedy).

    python -m exporter.evaluate --model build/models/default

Loads the directory as the appliance's exporter would (Qwen3VLForConditionalGeneration,
AutoTokenizer, preprocessor_config.json), builds prompts with exporter.world.encode, generates
greedily, and scores exact match after exporter.world.qa.normalise, per question type. The
robustness evaluation (drawings from a separate generator, both part orders, several pictures,
follow-ups) is `python -m exporter.robustness`.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import sys
from pathlib import Path

from exporter.world.encode import encode, image_processor
from exporter.world.qa import (IMAGE_TYPES, VIDEO_TYPES, Sample, heldout_image_set,
                               heldout_video_set, is_correct)


@dataclasses.dataclass(frozen=True)
class Report:
    image_accuracy: float
    video_accuracy: float
    per_type: dict[str, float]
    failures: list[tuple[str, str, str, str]]     # (qtype, question, expected, got)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def load(model_dir: Path, threads: int = 1):
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
    torch.set_num_threads(threads)
    model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    pre = json.loads((model_dir / "preprocessor_config.json").read_text())
    vpre = json.loads((model_dir / "video_preprocessor_config.json").read_text())
    return model, tok, pre, vpre


def answer(model, tok, sample: Sample, pre: dict, vpre: dict, improc=None,
           max_new_tokens: int = 24) -> str:
    """Greedy answer of the model to one sample's question."""
    import torch
    e = encode(sample, tok, pre, vpre, improc, with_answer=False)
    kw = dict(input_ids=torch.tensor([e.input_ids]),
              attention_mask=torch.ones(1, len(e.input_ids), dtype=torch.long),
              mm_token_type_ids=torch.tensor([e.mm_token_type_ids], dtype=torch.int))
    if e.pixel_values is not None:
        kw.update(pixel_values=torch.from_numpy(e.pixel_values),
                  image_grid_thw=torch.from_numpy(e.image_grid_thw))
    if e.pixel_values_videos is not None:
        kw.update(pixel_values_videos=torch.from_numpy(e.pixel_values_videos),
                  video_grid_thw=torch.from_numpy(e.video_grid_thw))
    with torch.no_grad():
        out = model.generate(**kw, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, len(e.input_ids):], skip_special_tokens=True).strip()


def evaluate(model_dir: Path, image_per_type: int = 40, video_per_type: int = 20,
             threads: int = 1, log=None) -> Report:
    model, tok, pre, vpre = load(model_dir, threads)
    improc = image_processor(pre)
    hits: dict[str, list[bool]] = collections.defaultdict(list)
    failures = []
    samples = heldout_image_set(image_per_type) + heldout_video_set(video_per_type)
    for i, s in enumerate(samples):
        got = answer(model, tok, s, pre, vpre, improc)
        ok = is_correct(got, s.answer)
        hits[s.qtype].append(ok)
        if not ok:
            failures.append((s.qtype, s.question, s.answer, got))
        if log and i % 50 == 0:
            log(f"{i}/{len(samples)}")
    img_hits = [ok for t, v in hits.items() for ok in v if t in IMAGE_TYPES]
    vid_hits = [ok for t, v in hits.items() for ok in v if t in VIDEO_TYPES]
    return Report(sum(img_hits) / max(1, len(img_hits)), sum(vid_hits) / max(1, len(vid_hits)),
                  {t: sum(v) / len(v) for t, v in hits.items()}, failures)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("build/models/default"))
    ap.add_argument("--image-per-type", type=int, default=40)
    ap.add_argument("--video-per-type", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args()
    rep = evaluate(args.model, args.image_per_type, args.video_per_type, args.threads,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"image accuracy {rep.image_accuracy:.3f}  video accuracy {rep.video_accuracy:.3f}")
    for t, acc in rep.per_type.items():
        print(f"  {t:14s} {acc:.3f}")
    for f in rep.failures[:30]:
        print("  FAIL", f)
    if args.json:
        args.json.write_text(json.dumps(rep.as_dict(), indent=2))


if __name__ == "__main__":
    main()
