"""The robustness parts of the world: styled posters and the evaluation's separate sketches show
the stated shape colour where the description says; several pictures in one turn have distinct
shapes and colours and the ordinal answer points at the right one; follow-ups and text-first
samples render the chat the way clients send it; the evaluation's seeds and drawings are
training's own in nothing but names."""
from __future__ import annotations

import random

import numpy as np
import pytest

from exporter.world import dialogues, qa, sketches, styles
from exporter.world.encode import encode, image_processor


def _near(px, rgb, tol=40):
    return np.abs(px.astype(int) - np.array(rgb)).sum(-1) < tol


@pytest.mark.parametrize("seed", range(10))
def test_styled_poster_shows_its_colour_at_its_centre_and_stands_out(seed):
    p = styles.random_styled_poster(random.Random(seed))
    px = np.asarray(p.render())
    assert px.shape == (p.height, p.width, 3)
    assert styles.contrast(p.rgb, p.background) > 150
    ink = _near(px, p.rgb, 60)
    assert ink.sum() >= 5
    ys, xs = np.nonzero(ink)
    assert abs(xs.mean() - p.cx) < p.radius and abs(ys.mean() - p.cy) < p.radius
    assert 0 < p.cx - p.radius and p.cx + p.radius < p.width


@pytest.mark.parametrize("style", sketches.STYLES)
def test_sketch_styles_draw_what_they_say(style):
    rng = random.Random(sketches.SKETCH_SEED_BASE + 1)
    for kind in ("circle", "triangle", "cross"):
        s = sketches.random_sketch(rng, style, kind=kind)
        px = np.asarray(s.render())
        assert px.shape == (s.height, s.width, 3) and s.kind == kind
        cov = sketches.coverage(s)
        share = (2 * s.radius) ** 2 / (s.width * s.height)
        if style == "small":
            assert 0.04 < share <= 0.15
        if style == "large":
            assert share >= 0.3                           # 60-90%, capped by the short side
        if style != "off-centre" and style != "mixed":
            ys, xs = np.nonzero(cov > 0.5)
            assert abs(xs.mean() - s.width / 2) < s.radius * 0.5
        if style not in ("blurred", "jpeg", "mixed", "outline", "outline only", "texture"):
            assert _near(px, s.rgb, 30)[cov > 0.99].mean() > 0.9   # the ink is the stated colour


def test_sketch_geometry_is_not_trainings():
    from exporter.world.scenes import shape_polygon
    ours = sketches.polygon("star", 10.0)
    theirs = np.array(shape_polygon("star", 0, 0, 10.0))
    assert ours.shape == theirs.shape and not np.allclose(ours, theirs)
    assert sketches.SKETCH_SEED_BASE > qa.HELDOUT_SEED_BASE


@pytest.mark.parametrize("qtype", dialogues.MULTI_TYPES)
def test_several_pictures_and_follow_ups(qtype):
    rng = random.Random(3)
    for _ in range(10):
        s = dialogues.multi_sample(rng, qtype)
        pics = s.scenes
        assert len({p.kind for p in pics}) == len(pics) == len({p.colour for p in pics})
        msgs = s.messages(with_answer=False)
        if qtype.startswith("followup"):
            assert len(pics) == 1 and [m["role"] for m in msgs] == ["user", "assistant", "user"]
            assert msgs[2]["content"] == [{"type": "text", "text": s.question}]
            assert s.answer in (pics[0].kind, pics[0].colour)
        else:
            assert 2 <= len(pics) <= 3 and [p["type"] for p in msgs[0]["content"]][-1] == "text"
        if qtype == "which_image":
            i = dialogues.ORDINALS.index(qa.normalise(s.answer))
            assert pics[i].kind in s.question or pics[i].colour in s.question


def test_text_first_puts_the_question_before_the_media_and_encodes_every_image(tmp_path):
    from transformers import AutoTokenizer
    from exporter.default_model import build_tokenizer, write_preprocessor_configs
    from exporter.seed_model import write_tokenizer_files
    write_tokenizer_files(build_tokenizer(512), tmp_path)
    pre, vpre = write_preprocessor_configs(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    s = dialogues.multi_sample(random.Random(5), "multi_shape")
    s = qa.Sample(s.qtype, s.question, s.answer, scene=s.scene, more_scenes=s.more_scenes,
                  text_first=True)
    assert s.messages()[0]["content"][0] == {"type": "text", "text": s.question}
    e = encode(s, tok, pre, vpre, image_processor(pre))
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert len(e.image_grid_thw) == len(s.scenes)
    assert e.input_ids.count(pad) == sum(int(g.prod()) // 4 for g in e.image_grid_thw)
    text = tok.decode(e.input_ids)
    assert text.index(s.question) < text.index("<|vision_start|>")


def test_the_robustness_mix_is_off_by_default_and_seeded():
    base = [qa.training_sample(random.Random(9)) for _ in range(1)]
    assert base == [qa.training_sample(random.Random(9), text_first_share=0.0, styled_share=0.0,
                                       multi_share=0.0)]
    rng = random.Random(2)
    mix = [qa.training_sample(rng, text_first_share=0.5, styled_share=0.6, multi_share=0.2,
                              poster_share=0.5) for _ in range(300)]
    assert 0.35 < np.mean([s.text_first for s in mix]) < 0.65
    assert any(isinstance(s.scene, styles.StyledPoster) for s in mix)
    assert any(s.qtype in dialogues.MULTI_TYPES for s in mix)
    assert not any(isinstance(p, sketches.Sketch) for s in mix for p in s.scenes)
