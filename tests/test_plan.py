"""The full-size Qwen3-VL-4B-Instruct config through the exporter's planning path (meta device,
no weights): shapes, memory plan against hand-computed numbers, and the planned manifest."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from exporter.build import plan_engine
from exporter.plan import GiB
from runtime import manifest as mf

REFERENCE = Path(__file__).resolve().parent.parent.parent / "shared" / "reference"


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, seed_model_dir) -> Path:
    """A checkpoint directory holding the real 4B config files and no weights."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE}")
    d = tmp_path_factory.mktemp("qwen3-vl-4b-config")
    shutil.copy(REFERENCE / "qwen3-vl-4b-instruct.config.json", d / "config.json")
    shutil.copy(REFERENCE / "qwen3-vl-4b-instruct.preprocessor_config.json", d / "preprocessor_config.json")
    shutil.copy(REFERENCE / "qwen3-vl-4b-instruct.video_preprocessor_config.json",
                d / "video_preprocessor_config.json")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(seed_model_dir / f, d / f)
    return d


def layer_params(h=2560, heads=32, kv=8, hd=128, inter=9728) -> int:
    attn = h * heads * hd + 2 * h * kv * hd + heads * hd * h
    return attn + 3 * h * inter + 2 * h + 2 * hd          # + input/post norms, q/k norms


def test_memory_plan_cuda_24gb_matches_hand_computation(reference_dir):
    plan, _ = plan_engine(reference_dir, "cuda-24gb")
    # KV: 36 layers x 8 KV heads x 128 x 2 (K, V) bytes in INT8 + two fp32 scales per token and head
    assert plan.kv_bytes_per_token == 36 * 8 * 128 * 2 + 36 * 8 * 2 * 4 == 76_032
    assert plan.kv_bytes_per_token_fp16 == 36 * 8 * 128 * 2 * 2 == 147_456
    assert plan.kv_block_bytes == 76_032 * 32
    # decoder = 36 layers + final norm + LM head (tied to the 151936 x 2560 embedding)
    assert plan.params["decoder"] == 36 * layer_params() + 2560 + 151_936 * 2560 == 4_022_468_096
    assert plan.params["embed_tokens"] == 151_936 * 2560
    assert plan.weights_bytes["decoder"] == 2 * plan.params["decoder"]          # fp16
    # the vision cut at 4: patch embed (conv 3x2x16x16 -> 1024, + bias) + pos embed + 4 blocks
    block = 4 * 1024 * 1024 + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024 + 4 * 1024
    assert plan.params["vision_cpu"] == (3 * 2 * 16 * 16 * 1024 + 1024) + 2304 * 1024 + 4 * block
    # 1024 x 1024 is admitted as is: (1024/16)^2 patches
    assert plan.largest_image == (1024, 1024) and plan.vision_patches == 4096
    # the decoder's peak is a step at max_batch x max_context (16 x 16384): the graph gathers one
    # layer's past at a time, K and V dequantized to fp32 and cast to fp16 (6 bytes per element)
    # plus the fp32 scales, beside the 512-token chunk's fp32 scores and probabilities
    past = 16 * 16384 * 8 * 2 * (128 * (4 + 2) + 4)
    assert plan.decoder_past_bytes == past == 3_238_002_688
    scores = 2 * 32 * 512 * (16384 + 512) * 4
    assert plan.decoder_activation_bytes == past + scores + 512 * (4 * 2560 + 3 * 9728) * 2 + 16 * 151_936 * 4
    assert plan.activation_peak_bytes == plan.decoder_activation_bytes     # above the vision peak
    budget = 24 * GiB - 1.5 * GiB - plan.device_weights_bytes - plan.activation_peak_bytes
    assert plan.kv_blocks == int(budget // plan.kv_block_bytes)
    assert 4_000 <= plan.kv_blocks <= 4_200                   # ~9.2 GiB of INT8 KV, ~130k tokens
    assert plan.kv_tokens == plan.kv_blocks * 32
    assert plan.device_weights_bytes + plan.activation_peak_bytes + plan.kv_blocks * plan.kv_block_bytes \
        <= 22.5 * GiB


def test_planned_manifest_has_the_contract_shapes(reference_dir):
    _, manifest = plan_engine(reference_dir, "cuda-24gb")
    parts = manifest.partitions
    assert set(parts) == {"vision_cpu", "vision_gpu", "decoder"}
    dec_in = {t.name: t for t in parts["decoder"].inputs}
    dec_out = {t.name: t for t in parts["decoder"].outputs}
    for layer in (0, 35):                      # one K+V and one scale tensor per layer
        kv, scale = dec_in[f"kv.{layer}"], dec_in[f"kv_scale.{layer}"]
        assert kv.dtype == "int8" and kv.shape == ["NB", "BS", 16, 128]     # 8 K heads, 8 V heads
        assert scale.dtype == "float32" and scale.shape == ["NB", "BS", 16, 1]
        assert dec_out[f"kv.{layer}.out"].shape == kv.shape       # updated in place
    assert sum(1 for n in dec_in if mf.pool_kind(n)) == 2 * 36 == len(dec_out) - 1
    assert dec_in[mf.SLOT_MAPPING].shape == ["B", "S"]
    assert dec_in[mf.DEEPSTACK_EMBEDS].shape == [3, "B", "S", 2560]
    assert {t.name: t for t in parts["decoder"].outputs}[mf.LOGITS].shape == ["B", "K", 151_936]
    # deepstack taps at 5, 11, 17 all fall after the cut at 4: no taps leave vision_cpu
    assert [t.name for t in parts["vision_cpu"].outputs] == [mf.HIDDEN]
    assert {t.name: t for t in parts["vision_gpu"].outputs}[mf.DEEPSTACK_EMBEDS].shape == [3, "N/4", 2560]
    assert manifest.kv.num_layers == 36 and manifest.kv.block_size == 32 and manifest.kv.dtype == "int8"
    st = manifest.special_tokens
    assert (st.image_token_id, st.video_token_id, st.vision_start_token_id) == (151655, 151656, 151652)
    pre = manifest.preprocessing
    assert (pre.min_pixels, pre.max_pixels) == (65536, 16777216)
    assert (pre.video_min_pixels, pre.video_max_pixels, pre.video_fps) == (4096, 25165824, 2.0)
    assert pre.deepstack_indexes == [5, 11, 17] and pre.vision_head_dim == 64
    assert manifest.rope == {"theta": 5_000_000.0, "mrope_section": [24, 20, 20], "interleaved": True}
    # the manifest round-trips through its JSON form
    assert mf.Manifest.from_dict(json.loads(manifest.to_json())).to_json() == manifest.to_json()


def test_cpu_profile_plan_for_the_tiny_model(seed_model_dir):
    plan, manifest = plan_engine(seed_model_dir, "cpu")
    assert set(manifest.partitions) == {"vision_cpu", "vision_gpu", "decoder", "decoder_float"}
    assert plan.kv_bytes_per_token == 4 * 2 * (2 * 32 + 8)
    assert plan.kv_blocks > 1000
