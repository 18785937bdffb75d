"""The decoder's MRoPE equals transformers' `Qwen3VLTextRotaryEmbedding` bit for bit, including
sections that overrun (or undershoot) the head's frequencies, and refuses what it cannot build."""
from __future__ import annotations

import pytest
import torch

from exporter.rope import InterleavedMRope, MRopeError, check_rope_parameters, interleaved_rows

CASES = [  # (head_dim, mrope_section, extra rope parameters)
    (8, [16, 8, 8], {}),             # transformers' own Qwen3-VL test config: sections overrun
    (32, [8, 4, 4], {}),             # the seed model: sections sum to head_dim / 2
    (128, [24, 20, 20], {}),         # Qwen3-VL-4B
    (16, [1, 1, 1], {}),             # sections short of head_dim / 2: T keeps the rest
    (10, [2, 2, 1], {}),             # an odd number of frequencies (5)
    (12, [0, 0, 9], {}),             # no H frequency at all; W overruns
    (16, [4, 2, 2, 7], {}),          # a fourth entry: transformers reads only [1] and [2]
    (32, [8, 4, 4], {"rope_type": "linear", "factor": 2.0}),
    (32, [8, 4, 4], {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}),
]


def hf_rotary(head_dim: int, section: list[int], extra: dict):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding
    cfg = Qwen3VLTextConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=head_dim, max_position_embeddings=512, rope_theta=10000.0,
                            rope_scaling={"rope_type": "default", "mrope_section": section,
                                          "mrope_interleaved": True, **extra})
    return Qwen3VLTextRotaryEmbedding(cfg)


@pytest.mark.parametrize("head_dim,section,extra", CASES)
def test_cos_sin_equal_transformers(head_dim, section, extra):
    hf = hf_rotary(head_dim, section, extra)
    ours = InterleavedMRope(hf, hf.mrope_section)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 500, (3, 2, 9), generator=g)      # three different rows per token
    x = torch.zeros(2, 9, head_dim)
    want_cos, want_sin = hf(x, pos)
    cos, sin = ours(pos, torch.float32)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def test_overrunning_sections_claim_what_transformers_claims():
    # head_dim 8 -> 4 frequencies: H claims [1:48:3] = {1}, W claims [2:24:3] = {2}
    assert interleaved_rows(4, [16, 8, 8]) == [0, 1, 2, 0]
    assert interleaved_rows(64, [24, 20, 20]) == [0, 1, 2] * 20 + [0] * 4
    assert interleaved_rows(5, [2, 2, 1]) == [0, 1, 2, 0, 1]


@pytest.mark.parametrize("params,message", [
    ({"mrope_section": [8, 8]}, "three integer sizes"),
    ({"mrope_section": [8, 4.5, 4]}, "three integer sizes"),
    ({"mrope_section": "8,4,4"}, "three integer sizes"),
    ({"mrope_section": [8, -4, 4]}, "negative"),
    ({"rope_type": "longrope", "mrope_section": [8, 4, 4]}, "'longrope'"),
])
def test_refused_in_one_line(params, message):
    with pytest.raises(MRopeError, match=message) as e:
        check_rope_parameters(params)
    assert "\n" not in str(e.value)


def test_default_section_when_none_named():
    assert check_rope_parameters({"rope_type": "default"}) == [24, 20, 20]


@pytest.mark.parametrize("layout", ["BSH", "BNSH"])
def test_onnx_runtime_rotary_embedding_is_hf_rope_on_multimodal_positions(layout):
    """The decoder's RoPE node (ONNX Runtime's com.microsoft RotaryEmbedding, fed per-token
    tables by `rope_tables`) and its eager twin `rotary_embedding` both equal transformers'
    rotate-half RoPE, for tokens whose three position rows differ, in both layouts it is used in."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb

    from exporter.rope import rope_tables, rotary_embedding
    b, s, heads, d = 2, 5, 3, 32
    rope = InterleavedMRope(hf_rotary(d, [8, 4, 4], {}), [8, 4, 4])
    gen = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 300, (3, b, s), generator=gen)
    cos, sin = rope(pos, torch.float32)                                   # [B,S,D]
    x = torch.randn(b, heads, s, d, generator=gen)                      # BNSH
    ref, _ = apply_rotary_pos_emb(x, x, cos, sin)                         # HF: unsqueeze_dim=1
    rows, cos_c, sin_c = rope_tables(*rope(pos, torch.float32, half=True))
    inp = x if layout == "BNSH" else x.transpose(1, 2).reshape(b, s, heads * d)
    eager = rotary_embedding(inp, rows, cos_c, sin_c)
    node = helper.make_node("RotaryEmbedding", ["x", "pos", "cos", "sin"], ["y"],
                            domain="com.microsoft", interleaved=0)
    graph = helper.make_graph([node], "rope", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, list(inp.shape)),
        helper.make_tensor_value_info("pos", TensorProto.INT64, [b, s]),
        helper.make_tensor_value_info("cos", TensorProto.FLOAT, list(cos_c.shape)),
        helper.make_tensor_value_info("sin", TensorProto.FLOAT, list(sin_c.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(inp.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": inp.numpy(), "pos": rows.numpy(), "cos": cos_c.numpy(),
                          "sin": sin_c.numpy()})[0]
    if layout == "BSH":
        got = got.reshape(b, s, heads, d).transpose(0, 2, 1, 3)
        eager = eager.reshape(b, s, heads, d).transpose(1, 2)
    np.testing.assert_allclose(got, ref.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(eager.numpy(), ref.numpy(), atol=1e-6, rtol=0)
    assert not np.allclose(got, x.numpy(), atol=1e-3)                     # it did rotate
