"""Prompt building and MRoPE positions against transformers (the oracle).

transformers' `Qwen3VLProcessor` cannot be constructed here (its video processor needs
torchvision), so the oracle is assembled from its own parts: the tokenizer's
`apply_chat_template`, `Qwen3VLProcessor.replace_image_token` / `replace_video_token` /
`_calculate_timestamps` and `ProcessorMixin.get_text_with_replacements`, called on a processor
object whose attributes are set by hand; positions come from `Qwen3VLModel.get_rope_index`.
"""
from __future__ import annotations

import json
import types

import numpy as np
import pytest
from PIL import Image

from runtime.api import ChatMessage, ImagePart, InvalidRequest, PromptTooLong, TextPart, VideoPart
from runtime.prompt import MediaLayout, PromptBuilder, check_length
from runtime.rope_index import RopeIndexError, get_rope_index
from runtime.runner import positions_for
from runtime.sequence import RequestInputs, Sequence
from tests.oracle_helpers import to_hf_messages

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from transformers import AutoTokenizer, Qwen2VLImageProcessorPil  # noqa: E402
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel  # noqa: E402
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor  # noqa: E402

MERGE = 2


@pytest.fixture(scope="module")
def hf(seed_model_dir):
    tok = AutoTokenizer.from_pretrained(seed_model_dir)
    cfg = json.loads((seed_model_dir / "preprocessor_config.json").read_text())
    image_processor = Qwen2VLImageProcessorPil(
        **{k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")})
    proc = Qwen3VLProcessor.__new__(Qwen3VLProcessor)
    proc.tokenizer, proc.image_processor = tok, image_processor
    proc.video_processor = types.SimpleNamespace(merge_size=MERGE, temporal_patch_size=2)
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.vision_start_token, proc.vision_end_token = "<|vision_start|>", "<|vision_end|>"
    return proc


@pytest.fixture(scope="module")
def ids(seed_model_dir):
    config = json.loads((seed_model_dir / "config.json").read_text())
    return dict(image_token_id=config["image_token_id"], video_token_id=config["video_token_id"],
                vision_start_token_id=config["vision_start_token_id"],
                vision_end_token_id=config["vision_end_token_id"])


def make_builder(seed_model_dir, ids, **kw) -> PromptBuilder:
    tok_cfg = json.loads((seed_model_dir / "tokenizer_config.json").read_text())
    return PromptBuilder(seed_model_dir / "tokenizer.json",
                         (seed_model_dir / "chat_template.jinja").read_text(), merge_size=MERGE,
                         template_vars={"eos_token": tok_cfg["eos_token"],
                                        "pad_token": tok_cfg["pad_token"]}, **ids, **kw)


@pytest.fixture(scope="module")
def builder(seed_model_dir, ids):
    return make_builder(seed_model_dir, ids)


def hf_rope(input_ids, image_grids, video_grids, ids):
    fake = types.SimpleNamespace(config=types.SimpleNamespace(
        vision_config=types.SimpleNamespace(spatial_merge_size=MERGE)))
    fake.get_vision_position_ids = lambda *a, **k: Qwen3VLModel.get_vision_position_ids(fake, *a, **k)
    t = torch.tensor(input_ids, dtype=torch.long)[None]
    types_ = torch.zeros_like(t)
    types_[t == ids["image_token_id"]] = 1
    types_[t == ids["video_token_id"]] = 2
    pos, delta = Qwen3VLModel.get_rope_index(
        fake, t, types_, torch.tensor(image_grids) if image_grids else None,
        torch.tensor(video_grids) if video_grids else None)
    return pos[:, 0].numpy(), int(delta[0, 0])


def hf_prompt(hf, messages, images=(), videos=(), outer_wrapper=True):
    """transformers' token ids. `videos`: (grid_thw, frame_indices, fps). With
    outer_wrapper=False, the transformers 4.57 rule (replace the whole start/pad/end triple)."""
    text = hf.tokenizer.apply_chat_template(to_hf_messages(messages), tokenize=False,
                                            add_generation_prompt=True)
    image_inputs = hf.image_processor(images=list(images)) if images else {}
    image_repl = [hf.replace_image_token(image_inputs, i) for i in range(len(images))]
    video_inputs = {"video_grid_thw": np.array([v[0] for v in videos]),
                    "video_metadata": [types.SimpleNamespace(fps=v[2], frames_indices=v[1])
                                       for v in videos]}
    video_repl = [hf.replace_video_token(video_inputs, i) for i in range(len(videos))]
    if not outer_wrapper:
        triple = hf.vision_start_token + hf.video_token + hf.vision_end_token
        for r in video_repl:
            text = text.replace(triple, r.replace(hf.video_token, "\0"), 1)
        text = text.replace("\0", hf.video_token)
        video_repl = []
    (expanded,), _ = hf.get_text_with_replacements([text], image_repl, video_repl)
    grids = [tuple(int(x) for x in g) for g in image_inputs.get("image_grid_thw", [])]
    return np.array(hf.tokenizer(expanded, add_special_tokens=False)["input_ids"]), grids


def rgb(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


def user(*parts):
    return ChatMessage("user", tuple(TextPart(p) if isinstance(p, str) else p for p in parts))


IMG, VID = ImagePart(b"x"), VideoPart(b"x")

TEXT_CASES = {
    "text_only": [user("hello there, describe a red circle")],
    "system_user": [ChatMessage("system", (TextPart("You are a helpful assistant."),)),
                    user("How many shapes are there?")],
    "non_ascii": [user("é ü 你好 🙂 — naïve café\n\ttabs  and  spaces")],
    "special_text": [user("what does <b>bold</b> **markdown** `code` say?"), ],
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_prompts_match_transformers(builder, hf, ids, name):
    messages = TEXT_CASES[name]
    expected, _ = hf_prompt(hf, messages)
    prompt = builder.build(messages)
    np.testing.assert_array_equal(prompt.token_ids, expected)
    assert prompt.token_ids.dtype == np.int64
    np.testing.assert_array_equal(prompt.position_ids, np.tile(np.arange(expected.size), (3, 1)))
    assert prompt.rope_delta == 0 and prompt.media == ()


IMAGE_CASES = {
    "one_image": ([user(IMG, "What is in the image?")], [(224, 320)]),
    "two_images": ([user("Compare", IMG, "with", IMG)], [(64, 64), (500, 130)]),
    "image_text_image": ([user(IMG), ChatMessage("assistant", (TextPart("A square."),)),
                          user("and this one?", IMG)], [(100, 900), (333, 333)]),
    "multi_turn": ([ChatMessage("system", (TextPart("Be brief."),)), user(IMG, "Colour?"),
                    ChatMessage("assistant", (TextPart("Red."),)), user("Shape?")], [(256, 256)]),
}


@pytest.mark.parametrize("name", sorted(IMAGE_CASES))
def test_image_prompts_match_transformers(builder, hf, ids, name):
    messages, sizes = IMAGE_CASES[name]
    images = [rgb(h, w, i) for i, (h, w) in enumerate(sizes)]
    expected, grids = hf_prompt(hf, messages, images=images)
    prompt = builder.build(messages, [MediaLayout("image", g) for g in grids])
    np.testing.assert_array_equal(prompt.token_ids, expected)
    pos, delta = hf_rope(expected, grids, [], ids)
    np.testing.assert_array_equal(prompt.position_ids, pos)
    assert prompt.rope_delta == delta and (delta < 0)
    for span, grid in zip(prompt.media, grids):
        (s, e), = span.runs
        assert e - s == np.prod(grid) // MERGE ** 2 == span.num_pad_tokens
        assert (prompt.token_ids[s:e] == ids["image_token_id"]).all()
        assert prompt.token_ids[s - 1] == ids["vision_start_token_id"]
        assert prompt.token_ids[e] == ids["vision_end_token_id"]
    assert sum(s.num_pad_tokens for s in prompt.media) == (expected == ids["image_token_id"]).sum()


VIDEO_CASE = dict(grid=(3, 8, 12), frames=[0, 2, 4, 6, 8, 9], fps=4.0)


@pytest.mark.parametrize("outer_wrapper", [False, True])
def test_video_prompt_matches_transformers(seed_model_dir, builder, hf, ids, outer_wrapper):
    messages = [ChatMessage("system", (TextPart("sys"),)),
                user("Watch", VID, "then look at", IMG, "What changes?")]
    image = rgb(120, 200)
    grid, frames, fps = VIDEO_CASE["grid"], VIDEO_CASE["frames"], VIDEO_CASE["fps"]
    expected, image_grids = hf_prompt(hf, messages, images=[image], videos=[(grid, frames, fps)],
                                      outer_wrapper=outer_wrapper)
    timestamps = tuple(hf._calculate_timestamps(list(frames), fps, 2))
    assert len(timestamps) == grid[0]
    b = builder if not outer_wrapper else make_builder(seed_model_dir, ids, video_outer_wrapper=True)
    prompt = b.build(messages, [MediaLayout("video", grid, timestamps),
                                MediaLayout("image", image_grids[0])])
    np.testing.assert_array_equal(prompt.token_ids, expected)
    pos, delta = hf_rope(expected, image_grids, [grid], ids)
    np.testing.assert_array_equal(prompt.position_ids, pos)
    assert prompt.rope_delta == delta
    video = prompt.media[0]
    assert video.kind == "video" and len(video.runs) == grid[0]
    assert all(e - s == grid[1] * grid[2] // MERGE ** 2 for s, e in video.runs)
    text = b.tokenizer.decode(prompt.token_ids[video.start:video.end].tolist(),
                              skip_special_tokens=False)
    assert text.startswith(f"<{timestamps[0]:.1f} seconds><|vision_start|>")
    before = prompt.token_ids[video.start - 1]
    assert (before == ids["vision_start_token_id"]) == outer_wrapper


def test_mismatched_media_is_refused(builder):
    with pytest.raises(InvalidRequest):
        builder.build([user(IMG, "hi")], [])
    with pytest.raises(InvalidRequest):
        builder.build([user(IMG, "hi")], [MediaLayout("video", (2, 4, 4), (0.5, 1.5))])
    with pytest.raises(InvalidRequest):   # timestamps must cover every temporal group
        builder.build([user(VID)], [MediaLayout("video", (2, 4, 4), (0.5,))])
    with pytest.raises(InvalidRequest):   # a typed placeholder would steal an image's slot
        builder.build([user("<|image_pad|>", IMG)], [MediaLayout("image", (1, 4, 4))])


def test_prompt_too_long(builder):
    messages = [user(IMG, "hi")]
    layouts = [MediaLayout("image", (1, 32, 32))]
    n = int(builder.tokenize(messages, layouts)[0].size)
    assert n > 256
    assert builder.build(messages, layouts, max_tokens=n).num_tokens == n
    with pytest.raises(PromptTooLong):
        builder.build(messages, layouts, max_tokens=n - 1)
    with pytest.raises(PromptTooLong):
        check_length(10, 9)


def test_template_errors_become_invalid_request(seed_model_dir, ids):
    template = "{{ raise_exception('only user messages') }}"
    b = PromptBuilder(seed_model_dir / "tokenizer.json", template, merge_size=MERGE, **ids)
    with pytest.raises(InvalidRequest, match="only user messages"):
        b.build([user("hi")])


def test_template_environment_like_transformers(seed_model_dir, ids, hf):
    template = ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ m | tojson }}{% if loop.index > 5 %}{% break %}{% endif %}\n{% endfor %}"
                "{{ ns.n }}{{ eos_token }}{% if add_generation_prompt %}GEN{% endif %}")
    b = PromptBuilder(seed_model_dir / "tokenizer.json", template, merge_size=MERGE,
                      template_vars={"eos_token": "<|im_end|>"}, **ids)
    messages = [user("é <tag> \"q\""), ChatMessage("assistant", (TextPart("ok"),))]
    expected = hf.tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.parts[0].text} for m in messages], chat_template=template,
        tokenize=False, add_generation_prompt=True)
    assert b.render(messages) == expected


# --- rope index on hand-made layouts ------------------------------------------------------


ROPE_LAYOUTS = {
    "text_only": ([1, 2, 3, 4], [], []),
    "one_image": ([1, 9] + [5] * 6 + [10, 2], [(1, 4, 6)], []),
    "image_text_image": ([1, 9] + [5] * 6 + [10, 3, 3, 9] + [5] * 4 + [10, 2],
                         [(1, 4, 6), (1, 4, 4)], []),
    "video_t3": ([1] + sum(([7, 7, 9] + [6] * 6 + [10] for _ in range(3)), []) + [2],
                 [], [(3, 6, 4)]),
    "video_then_image": ([1] + sum(([7, 9] + [6] * 2 + [10] for _ in range(2)), []) + [3, 9]
                         + [5] * 9 + [10, 4], [(1, 6, 6)], [(2, 2, 4)]),
}


@pytest.mark.parametrize("name", sorted(ROPE_LAYOUTS))
def test_rope_index_matches_transformers(name):
    tokens, image_grids, video_grids = ROPE_LAYOUTS[name]
    ids = dict(image_token_id=5, video_token_id=6)
    pos, delta = get_rope_index(np.array(tokens), image_grids, video_grids, **ids,
                                vision_start_token_id=9, merge_size=MERGE)
    ref_pos, ref_delta = hf_rope(tokens, image_grids, video_grids, ids)
    np.testing.assert_array_equal(pos, ref_pos)
    assert pos.dtype == np.int64 and pos.shape == (3, len(tokens))
    assert delta == ref_delta
    # the runner continues the positions after the prompt as transformers' cached path does
    seq = Sequence(list(tokens) + [1, 2], inputs=RequestInputs(pos, delta))
    np.testing.assert_array_equal(positions_for(seq, len(tokens), 2),
                                  np.tile(pos.max() + 1 + np.arange(2), (3, 1)))


def test_rope_index_rejects_mismatched_grids():
    tokens = np.array([1, 9] + [5] * 6 + [10])
    kw = dict(image_token_id=5, video_token_id=6, merge_size=MERGE)
    with pytest.raises(RopeIndexError):
        get_rope_index(tokens, [(1, 4, 4)], [], **kw)          # 4 tokens expected, 6 present
    with pytest.raises(RopeIndexError):
        get_rope_index(tokens, [], [], **kw)                   # no grid for the run
    with pytest.raises(RopeIndexError):
        get_rope_index(tokens, [(1, 4, 6), (1, 2, 2)], [], **kw)   # a grid with no run
    with pytest.raises(RopeIndexError):
        get_rope_index(np.array([1] + [5] * 6), [(1, 4, 6)], [], vision_start_token_id=9, **kw)
