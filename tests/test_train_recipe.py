"""The training recipe end to end at toy size: a few steps lower the loss, and the directory it
writes reloads through transformers and answers through generate()."""
from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")


def test_five_steps_lower_the_loss_and_the_checkpoint_reloads(tmp_path):
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    from exporter.evaluate import answer
    from exporter.train import train
    from exporter.world.qa import image_sample

    torch.set_num_threads(1)
    out = tmp_path / "m"
    losses = train(out, 6, size="tiny", batch=4, lr=5e-3, seed=1, save_every=0, log=lambda m: None)
    assert len(losses) == 6
    assert min(losses[-2:]) < losses[0] - 0.3
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "preprocessor_config.json",
                 "video_preprocessor_config.json", "generation_config.json"):
        assert (out / name).exists(), name
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["deepstack_visual_indexes"]
    assert cfg["vision_config"]["patch_size"] == 16 and cfg["vision_config"]["temporal_patch_size"] == 2

    model = Qwen3VLForConditionalGeneration.from_pretrained(out).eval()
    assert model.config.text_config.rope_parameters["mrope_interleaved"] is True
    tok = AutoTokenizer.from_pretrained(out)
    pre = json.loads((out / "preprocessor_config.json").read_text())
    vpre = json.loads((out / "video_preprocessor_config.json").read_text())
    got = answer(model, tok, image_sample(random.Random(0), "colour"), pre, vpre,
                 max_new_tokens=3)
    assert isinstance(got, str)

    # the tokenizer pre-tokenizes as Qwen2 does, so tokenizer.json and AutoTokenizer agree; a
    # resumed checkpoint that lacks that rule (as the default model once did) is upgraded
    from tokenizers import Tokenizer, pre_tokenizers
    text = "Count to 10: 1, 2, 3. 你好 🙂"
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode(text, add_special_tokens=False).ids \
        == tok.encode(text, add_special_tokens=False)
    old = Tokenizer.from_file(str(out / "tokenizer.json"))
    old.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    old.save(str(out / "tokenizer.json"))
    again = tmp_path / "resumed"
    train(again, 1, size="tiny", batch=2, lr=5e-3, seed=1, save_every=0, resume=out,
          interpolate=0.25, log=lambda m: None)
    spec = json.loads((again / "tokenizer.json").read_text())["pre_tokenizer"]
    assert spec["type"] == "Sequence" and spec["pretokenizers"][0]["type"] == "Split"
    # --interpolate 0.25 wrote 0.25 x trained + 0.75 x resumed: a step away from the resumed weights
    # by a quarter of that step (AdamW's first step moves every weight by about lr)
    from safetensors.torch import load_file
    base, mixed = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    moved = max(float((mixed[k] - base[k]).abs().max()) for k in base)
    assert 0 < moved <= 0.25 * 5e-3 * 1.5


def test_labels_cover_only_the_answer():
    from exporter.default_model import build_tokenizer, write_preprocessor_configs
    from exporter.seed_model import write_tokenizer_files
    from exporter.world.encode import IGNORE, encode
    from exporter.world.qa import image_sample, video_sample
    from transformers import AutoTokenizer
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_tokenizer_files(build_tokenizer(512), Path(d))
        pre, vpre = write_preprocessor_configs(Path(d))
        tok = AutoTokenizer.from_pretrained(d)
    s = image_sample(random.Random(3), "shape")
    e = encode(s, tok, pre, vpre)
    kept = [t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE]
    assert tok.decode(kept) == s.answer + "<|im_end|>"
    assert e.input_ids.count(tok.convert_tokens_to_ids("<|image_pad|>")) == \
        int(e.image_grid_thw[0].prod()) // 4 == sum(t == 1 for t in e.mm_token_type_ids)
    v = encode(video_sample(random.Random(4), "when"), tok, pre, vpre, with_answer=False)
    text = tok.decode(v.input_ids)
    # clips keep their size under the video budget (96 px -> 6x6 patches), as the runtime sends them
    assert v.video_grid_thw[0].tolist() == [4, 6, 6]
    assert text.count("<|vision_start|>") == int(v.video_grid_thw[0, 0])
    assert "<0.2 seconds><|vision_start|>" in text and "<3.2 seconds>" in text
    assert all(lab == IGNORE for lab in v.labels)
