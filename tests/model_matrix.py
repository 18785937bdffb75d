"""Small random Qwen3-VL checkpoints from varied configs: the export test matrix.

Each variant starts from the seed model's config (`exporter.seed_model.tiny_config`) and changes
what real checkpoints vary in: tied or untied embeddings, grouped-query attention groups of 1 to
4, head dims that are not powers of two (or have an odd number of rotary frequencies), MRoPE
sections that overrun the head, the spatial merge size, the vision depth and which blocks feed
DeepStack relative to the profile's vision cut (`cpu`: blocks [0, 2) in vision_cpu), and a model
context shorter than the profile's. `HF_TEST_CONFIG` is transformers' own Qwen3-VL model-test
config (tests/models/qwen3_vl), with this tokenizer's vocabulary and special token ids.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# transformers' Qwen3VLVisionText2TextModelTester, verbatim but for vocab and token ids
HF_TEST_CONFIG = {
    "text": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=8, max_position_embeddings=512, rope_theta=10000.0,
                 tie_word_embeddings=True,
                 rope_scaling={"rope_type": "default", "mrope_section": [16, 8, 8],
                               "mrope_interleaved": True}),
    "vision": dict(depth=2, hidden_size=32, intermediate_size=32, out_hidden_size=32, num_heads=4,
                   patch_size=16, spatial_merge_size=1, temporal_patch_size=2,
                   num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
    "tie": True,
}

VARIANTS: dict[str, dict[str, Any]] = {
    # head_dim 8 with sections [16, 8, 8] (overrun), merge 1, GQA 2, tied; both taps before the cut
    # (cut 2 = depth: vision_gpu holds no block), the last at the last block; a 512-token model
    "hf-test-config": HF_TEST_CONFIG,
    # GQA 3 (6 query heads over 2), head_dim 24, untied, merge 1; one tap, at the last block, after the cut
    "gqa3-untied-merge1": {
        "text": dict(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                     num_key_value_heads=2, head_dim=24, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "default", "mrope_section": [4, 4, 4],
                                   "mrope_interleaved": True}),
        "vision": dict(depth=4, hidden_size=48, intermediate_size=96, out_hidden_size=96, num_heads=4,
                       spatial_merge_size=1, deepstack_visual_indexes=[3]),
        "tie": False,
    },
    # GQA 1 (multi-head), head_dim 10 (5 rotary frequencies), sections short of them; merge 2;
    # taps at block 0 (before the cut) and at the last block 2 (after it)
    "mha-headdim10": {
        "text": dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=4, head_dim=10,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1],
                                   "mrope_interleaved": True}),
        "vision": dict(depth=3, hidden_size=48, intermediate_size=64, out_hidden_size=40, num_heads=4,
                       deepstack_visual_indexes=[0, 2]),
    },
    # GQA 4 (8 over 2), head_dim 12, untied; a tap exactly at the cut (block 2, the first of
    # vision_gpu) and one at block 1 just before it
    "gqa4-untied": {
        "text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=2, head_dim=12, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "default", "mrope_section": [2, 2, 2],
                                   "mrope_interleaved": True}),
        "vision": dict(depth=4, hidden_size=64, intermediate_size=96, out_hidden_size=64, num_heads=4,
                       deepstack_visual_indexes=[1, 2]),
        "tie": False,
    },
    # slow: three taps over a 2-layer decoder (the third tap is never injected, as in transformers),
    # linear rope scaling, vision head dim 20, patch 14 (factor 28 with merge 2)
    "patch14-linear-rope": {
        "text": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=1, head_dim=16,
                     rope_scaling={"rope_type": "linear", "factor": 2.0, "mrope_section": [4, 2, 2],
                                   "mrope_interleaved": True}),
        "vision": dict(depth=3, hidden_size=80, intermediate_size=96, out_hidden_size=64, num_heads=4,
                       patch_size=14, deepstack_visual_indexes=[0, 1, 2]),
    },
}
SLOW = ("patch14-linear-rope",)


def variant_config(name: str, vocab_size: int, ids: dict[str, int]) -> dict[str, Any]:
    from exporter.seed_model import tiny_config
    spec = VARIANTS[name]
    cfg = copy.deepcopy(tiny_config(vocab_size, ids))
    cfg["text_config"].update(copy.deepcopy(spec["text"]))
    cfg["vision_config"].update(copy.deepcopy(spec["vision"]))
    cfg["tie_word_embeddings"] = spec.get("tie", True)
    return cfg


def build_variant(name: str, out: Path, seed: int = 0) -> Path:
    """Write checkpoint `name` (random weights from `seed`) into `out`, Hugging Face layout."""
    from exporter import seed_model

    out.mkdir(parents=True, exist_ok=True)
    tok = seed_model.build_tokenizer(seed, 1024)
    ids = {t: tok.token_to_id(t) for t in seed_model.SPECIAL_TOKENS}
    seed_model.write_tokenizer_files(tok, out)
    config = variant_config(name, tok.get_vocab_size(), ids)
    vision = config["vision_config"]
    geometry = dict(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                    temporal_patch_size=vision["temporal_patch_size"])
    for file, pre in zip(("preprocessor_config.json", "video_preprocessor_config.json"),
                         seed_model.preprocessor_configs()):
        (out / file).write_text(json.dumps(pre | geometry, indent=2))
    return seed_model.save_random_model(out, config, ids, seed)


def matrix_model_dir(name: str) -> Path:
    """Checkpoint `name`, built once into build/cache/ (rebuilt when this file or the seed
    builder changes)."""
    from tests.conftest import ROOT, _cached_dir, _source_key
    key = _source_key(ROOT / "tests" / "model_matrix.py", ROOT / "exporter" / "seed_model.py")
    return _cached_dir(f"matrix-{name}", key, lambda out: build_variant(name, out))
