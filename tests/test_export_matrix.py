"""Every checkpoint of the export matrix (tests/model_matrix.py: tied/untied, GQA groups 1-4, odd
head dims, overrunning MRoPE sections, merge size 1 and 2, DeepStack taps before, at and after the
vision cut and at the last block, transformers' own test config) builds through the real exporter
and its parity gate (the build raises, writing nothing, when the gate fails), and its manifest
records what the runtime needs to serve it."""
from __future__ import annotations

import pytest

from runtime.manifest import load_manifest
from tests.conftest import build_cached_engine
from tests.model_matrix import SLOW, VARIANTS, matrix_model_dir, variant_config

NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in VARIANTS]


@pytest.mark.parametrize("name", NAMES)
def test_variant_builds_and_passes_its_parity_gate(name):
    model = matrix_model_dir(name)
    engine = build_cached_engine(model)              # raises BuildError if the gate fails
    m = load_manifest(engine)
    spec = VARIANTS[name]
    text, vision = spec["text"], spec["vision"]
    assert {"vision_cpu", "vision_gpu", "decoder", "decoder_float"} <= set(m.partitions)
    assert (m.kv.num_layers, m.kv.num_kv_heads, m.kv.head_dim) == (
        text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"])
    assert m.rope["mrope_section"] == text["rope_scaling"]["mrope_section"]
    assert m.preprocessing.merge_size == vision.get("spatial_merge_size", 2)
    assert m.preprocessing.deepstack_indexes == vision["deepstack_visual_indexes"]
    # the context is the smaller of the profile's (cpu: 4096) and the model's
    assert m.profile["max_context"] == min(4096, text.get("max_position_embeddings", 8192))
    assert m.vision_cut == min(2, vision["depth"])
    taps_in_cpu = [i for i in vision["deepstack_visual_indexes"] if i < m.vision_cut]
    assert sorted(t.name for t in m.partitions["vision_cpu"].outputs) == sorted(
        ["hidden"] + [f"tap_{i}" for i in taps_in_cpu])


def test_matrix_covers_what_the_issue_lists():
    """The matrix keeps its coverage when variants are edited."""
    from exporter.seed_model import SPECIAL_TOKENS
    ids = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    cfgs = [variant_config(n, 1024, ids) for n in VARIANTS if n not in SLOW]
    texts, visions = [c["text_config"] for c in cfgs], [c["vision_config"] for c in cfgs]
    assert {t["num_attention_heads"] // t["num_key_value_heads"] for t in texts} >= {1, 2, 3, 4}
    assert {c["tie_word_embeddings"] for c in cfgs} == {True, False}
    assert {v["spatial_merge_size"] for v in visions} == {1, 2}
    assert {v["temporal_patch_size"] for v in visions} == {2}
    assert any(t["head_dim"] & (t["head_dim"] - 1) for t in texts)          # not a power of two
    assert any(sum(t["rope_scaling"]["mrope_section"]) > t["head_dim"] // 2 for t in texts)
    cut = 2
    assert any(any(i < cut for i in v["deepstack_visual_indexes"]) for v in visions)
    assert any(any(i >= cut for i in v["deepstack_visual_indexes"]) for v in visions)
    assert any(cut in v["deepstack_visual_indexes"] for v in visions)
    assert any(v["depth"] - 1 in v["deepstack_visual_indexes"] for v in visions)
    assert any(t.get("max_position_embeddings", 8192) < 4096 for t in texts)
