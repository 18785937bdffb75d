"""The synthetic world: deterministic from a seed, and answers that match what is drawn."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from exporter.world import clips, qa, scenes
from exporter.world.encode import image_processor, video_patches
from exporter.world.scenes import COLOURS, cell_centre


def _pixels(img):
    return np.asarray(img, dtype=np.int16)


def test_scene_rendering_is_deterministic():
    assert qa.training_sample(random.Random(7)) == qa.training_sample(random.Random(7))
    s1, s2 = scenes.random_scene(random.Random(3)), scenes.random_scene(random.Random(3))
    assert np.array_equal(_pixels(scenes.render_scene(s1)), _pixels(scenes.render_scene(s2)))
    assert scenes.random_scene(random.Random(4)) != s1


def _has_colour(img, colour, min_pixels: int = 40) -> bool:
    return int(np.all(_pixels(img) == np.array(COLOURS[colour]), axis=-1).sum()) >= min_pixels


@pytest.mark.parametrize("seed", range(6))
def test_count_and_colour_answers_match_the_pixels(seed):
    rng = random.Random(seed)
    s = qa.image_sample(rng, "count")
    img = s.media()
    drawn = [c for c in COLOURS if c not in ("white", "black") and _has_colour(img, c)]
    expected = [sh.colour for sh in s.scene.shapes if sh.colour not in ("white", "black")]
    assert sorted(drawn) == sorted(expected)
    assert s.answer == str(len(s.scene.shapes))


@pytest.mark.parametrize("seed", range(6))
def test_position_answer_names_the_quadrant_holding_the_colour(seed):
    s = qa.image_sample(random.Random(100 + seed), "position")
    shape = next(sh for sh in s.scene.shapes if sh.kind in s.question or sh.colour in s.question)
    px = _pixels(s.media())
    ys, xs = np.nonzero(np.all(px == np.array(COLOURS[shape.colour]), axis=-1))
    half = s.scene.side / 2
    vert = "top" if ys.mean() < half else "bottom"
    horiz = "left" if xs.mean() < half else "right"
    assert s.answer == f"{vert} {horiz}"


@pytest.mark.parametrize("seed", range(6))
def test_relation_answer_locates_both_shapes_then_concludes(seed):
    s = qa.image_sample(random.Random(200 + seed), "relation")
    m = re.fullmatch(r"Is the (\w+) (left of|above) the (\w+)\?", s.question)
    a, rel, b = m.groups()
    cells = {sh.kind: sh.cell for sh in s.scene.shapes}
    (ax, ay), (bx, by) = [(cells[k] % 2, cells[k] // 2) for k in (a, b)]
    yes = ax < bx if rel == "left of" else ay < by
    assert s.answer == (f"The {a} is in the {scenes.CELLS[cells[a]]} and the {b} is in the "
                        f"{scenes.CELLS[cells[b]]}, so {'yes' if yes else 'no'}.")


def test_text_scene_prints_dark_pixels_in_its_cell():
    s = qa.image_sample(random.Random(5), "text")
    assert s.answer in scenes.TEXTS
    cx, cy = cell_centre(s.scene.text_cell, s.scene.side)
    patch = _pixels(s.media())[int(cy) - 6:int(cy) + 6, int(cx) - 12:int(cx) + 12]
    assert (patch.sum(-1) < 60).any()          # black glyph pixels at the label centre


@pytest.mark.parametrize("seed", range(8))
def test_poster_answers_match_the_pixels(seed):
    """A poster is one shape of the stated colour, near the middle, standing out from its
    background; "what is this" names both colour and shape."""
    s = qa.image_sample(random.Random(seed), "what")
    p = s.scene
    assert isinstance(p, scenes.Poster) and s.answer.lower().endswith(f"{p.colour} {p.kind}.")
    px = _pixels(s.media())
    assert px.shape == (p.height, p.width, 3)
    ys, xs = np.nonzero(np.all(px == np.array(COLOURS[p.colour]), axis=-1))
    assert len(xs) > 0.02 * p.width * p.height
    assert abs(xs.mean() / p.width - 0.5) < 0.2 and abs(ys.mean() / p.height - 0.5) < 0.2
    corner = tuple(int(v) for v in px[0, 0])
    assert corner == scenes.POSTER_BACKGROUNDS[p.background] != COLOURS[p.colour]


def test_posters_are_a_share_of_their_question_types():
    rng = random.Random(11)
    got = [qa.image_sample(rng, t) for t in ("shape", "colour", "position") for _ in range(100)]
    share = {t: np.mean([isinstance(s.scene, scenes.Poster) for s in got if s.qtype == t])
             for t in ("shape", "colour", "position")}
    assert 0.15 < share["shape"] < 0.45 and 0.15 < share["colour"] < 0.45
    assert share["position"] == 0              # a poster has no quadrant to ask about


def test_colour_clip_changes_at_the_stated_time():
    c = clips.random_clip(random.Random(2), event="colour")
    frames = clips.render_clip(c)
    centre = [tuple(_pixels(f)[c.side // 2, c.side // 2]) for f in frames]
    first_new = next(i for i, p in enumerate(centre) if p == COLOURS[c.new_colour])
    assert first_new == c.change_frame and centre[0] == COLOURS[c.colour]
    s = qa.video_sample(random.Random(2), "when")
    assert s.clip == c and s.answer == f"At about {c.change_frame // 2} seconds."


def test_move_clip_moves_in_the_stated_direction():
    c = clips.random_clip(random.Random(9), event="move")
    frames = clips.render_clip(c)
    def centroid(f):
        ys, xs = np.nonzero(np.all(_pixels(f) == np.array(COLOURS[c.colour]), axis=-1))
        return xs.mean(), ys.mean()
    (x0, y0), (x1, y1) = centroid(frames[0]), centroid(frames[-1])
    moved = {"left to right": x1 > x0 + 20, "right to left": x1 < x0 - 20,
             "top to bottom": y1 > y0 + 20, "bottom to top": y1 < y0 - 20}
    assert moved[c.direction] and sum(moved.values()) == 1


def test_heldout_sets_are_balanced_and_disjoint_from_training_stream():
    img, vid = qa.heldout_image_set(), qa.heldout_video_set()
    assert len(img) >= 200 and len(vid) >= 100
    assert {s.qtype for s in img} == set(qa.IMAGE_TYPES)
    train = {(s.scene, s.question) for s in (qa.image_sample(random.Random(0), t)
                                               for t in qa.IMAGE_TYPES)}
    assert not train & {(s.scene, s.question) for s in img}


def test_type_weights_oversample_and_default_stream_is_unchanged():
    rng = random.Random(5)
    w = qa.parse_type_weights("shape=6,count=0")
    kinds = [qa.training_sample(rng, video_share=0.0, chat_share=0.0, type_weights=w).qtype
             for _ in range(300)]
    assert "count" not in kinds and kinds.count("shape") > 300 // len(qa.IMAGE_TYPES) * 2
    assert (qa.training_sample(random.Random(9), type_weights=None)
            == qa.training_sample(random.Random(9)))
    with pytest.raises(ValueError):
        qa.parse_type_weights("shapes=2")


def test_normalise_accepts_only_the_key_answer():
    assert qa.is_correct("The Circle.", "circle")
    assert qa.is_correct("at about 3 seconds", "At about 3 seconds.")
    assert not qa.is_correct("square", "circle")
    assert not qa.is_correct("at about 2 seconds", "At about 3 seconds.")


def test_video_patches_match_image_processor_for_a_still_pair():
    from exporter.default_model import preprocessor_configs
    pre, _ = preprocessor_configs(max_pixels=128 * 128, min_pixels=64 * 64)
    img = scenes.render_scene(scenes.random_scene(random.Random(1))).resize((160, 100))
    ref = image_processor(pre)(images=[img], return_tensors="np")
    # the video limit counts all frames: two frames get twice the image's pixel budget
    video_pre = dict(pre, size={"longest_edge": 2 * 128 * 128, "shortest_edge": 64 * 64})
    pv, grid = video_patches([img, img], video_pre)
    assert np.array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_allclose(pv, ref["pixel_values"], atol=1e-6)


def test_timestamps_follow_qwen3vl_processor():
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    ref = Qwen3VLProcessor._calculate_timestamps(None, list(range(7)), 2.0, 2)
    assert clips.frame_timestamps(7, 2.0) == ref
