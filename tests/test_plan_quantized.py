"""The memory planner under quantised-weight profiles: a Qwen3-VL-8B-shaped config (derived from
the real 4B config with the 8B's published sizes) through the planning path, meta device, no
weights. INT4 weights put the 8B on one 24 GB card with room for KV; fp16 weights do not."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest

from exporter.build import plan_engine
from exporter.plan import GiB, quantized_matrix_bytes

REFERENCE = Path(os.environ.get("REFERENCE_CONFIGS",         # as tests/test_plan.py, or elsewhere
                               Path(__file__).resolve().parent.parent.parent / "shared" / "reference"))
# Qwen3-VL-8B-Instruct's sizes (the rest as in the 4B: 36 layers, 32 / 8 heads of 128, vocab)
TEXT_8B = dict(hidden_size=4096, intermediate_size=12288, tie_word_embeddings=False)
VISION_8B = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                 deepstack_visual_indexes=[8, 16, 24])


def config_8b() -> dict:
    cfg = copy.deepcopy(json.loads((REFERENCE / "qwen3-vl-4b-instruct.config.json").read_text()))
    cfg["text_config"].update(TEXT_8B)
    cfg["vision_config"].update(VISION_8B)
    cfg["tie_word_embeddings"] = False
    return cfg


@pytest.fixture(scope="module")
def dir_8b(tmp_path_factory, seed_model_dir) -> Path:
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE}")
    d = tmp_path_factory.mktemp("qwen3-vl-8b-config")
    (d / "config.json").write_text(json.dumps(config_8b()))
    for f in ("preprocessor_config.json", "video_preprocessor_config.json"):
        shutil.copy(REFERENCE / f"qwen3-vl-4b-instruct.{f}", d / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(seed_model_dir / f, d / f)
    return d


H, INTER, LAYERS, VOCAB, KVD = 4096, 12288, 36, 151_936, 8 * 128
LINEARS = [(H, H), (H, KVD), (H, KVD), (H, H), (H, INTER), (H, INTER), (INTER, H)]   # [K, N]
NORMS = 2 * H + 2 * 128


def test_8b_in_int4_fits_a_24gb_card_with_room_for_kv(dir_8b):
    plan, manifest = plan_engine(dir_8b, "cuda-24gb-int4")
    assert manifest.profile["weights"]["symmetric"] is True
    # INT4, block 32, fp16 scales, symmetric: 16 + 2 bytes per 32 weights (zero points: + 0.5)
    assert quantized_matrix_bytes(H, INTER, 4, 32, False, 2) == H * INTER * 18.5 / 32
    assert quantized_matrix_bytes(H, INTER, 4, 32, True, 2) == H * INTER * 18 / 32
    layer = sum(k * n * 18 / 32 for k, n in LINEARS) + NORMS * 2
    head = H * VOCAB * 34 / 32                     # INT8: 32 + 2 (scale) per 32
    assert plan.weights_bytes["decoder"] == LAYERS * layer + H * 2 + head
    assert plan.params["decoder"] == LAYERS * (sum(k * n for k, n in LINEARS) + NORMS) + H + H * VOCAB
    assert 7.5e9 < plan.params["decoder"] < 7.7e9                   # the 8B's text decoder
    assert plan.weights_bytes["decoder"] < 2 * plan.params["decoder"] / 3      # a third of fp16
    assert plan.weights_bytes["embed_tokens"] == VOCAB * H * 2    # untied, fp16, on the host
    # the whole device side (weights, the peak step at max batch x max context, KV) within
    # budget - reserve, and room for at least 64k tokens of INT8 KV
    used = plan.device_weights_bytes + plan.activation_peak_bytes + plan.kv_blocks * plan.kv_block_bytes
    assert used <= (24 - 1.5) * GiB
    assert plan.kv_tokens >= 64 * 1024
    assert "INT4 weights, block 32" in plan.table()
    assert manifest.profile["weights"]["bits"] == 4
    print("\n" + plan.table())


def test_8b_in_fp16_leaves_far_less_kv_than_int4(dir_8b):
    fp16, _ = plan_engine(dir_8b, "cuda-24gb")
    int4, _ = plan_engine(dir_8b, "cuda-24gb-int4")
    assert fp16.weights_bytes["decoder"] == 2 * fp16.params["decoder"]
    assert fp16.device_weights_bytes - int4.device_weights_bytes > 9.5 * GiB
    assert fp16.kv_tokens < int4.kv_tokens / 3
