"""Interleaved multimodal RoPE (MRoPE) for the Qwen3-VL text decoder, computed in the graph.

Each token has three position rows (temporal, height, width). Rotary frequency j (of head_dim/2)
reads its position from one row, chosen by a fixed pattern that mirrors transformers'
`Qwen3VLTextRotaryEmbedding.recomposition_frequencies` (`apply_interleaved_mrope` in 4.57):
row 1 (H) claims the frequencies `range(half_dim)[1 : 3 * mrope_section[1] : 3]`, row 2 (W)
claims `range(half_dim)[2 : 3 * mrope_section[2] : 3]`, row 0 (T) keeps the rest. Those are
Python slices, so sections that overrun the head's frequencies are clamped, not an error
(transformers' own test config, `mrope_section [16, 8, 8]` with head_dim 8, rotates frequencies
0..3 by rows T, H, W, T); `mrope_section[0]` is never read, and the sections need not sum to
half_dim. The pattern is a constant, so in the graph it is one Gather over the 3 rows.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

DEFAULT_SECTION = (24, 20, 20)      # transformers' default when the config names none
# rope types whose frequencies are fixed at load time (what a static graph can hold). "dynamic"
# grows its frequencies only past max_position_embeddings, which the engine's context never
# reaches (the build caps it there), so within the engine it is the initial table too.
STATIC_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "proportional")


class MRopeError(ValueError):
    """A rope configuration this exporter does not reproduce."""


def check_sections(mrope_section: Any) -> list[int]:
    """The section sizes as ints; MRopeError for what transformers would not run (fewer than
    three entries, non-integers) or what only runs by accident of Python slicing (negatives)."""
    if (not isinstance(mrope_section, (list, tuple)) or len(mrope_section) < 3
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in mrope_section)):
        raise MRopeError(f"mrope_section {mrope_section!r} must list three integer sizes (T, H, W)")
    if any(x < 0 for x in mrope_section):
        raise MRopeError(f"mrope_section {list(mrope_section)} has a negative size")
    return [int(x) for x in mrope_section]


def check_rope_parameters(rope_parameters: dict[str, Any] | None) -> list[int]:
    """Validate a text config's rope parameters before any export; returns the sections."""
    rp = dict(rope_parameters or {})
    rope_type = rp.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise MRopeError(f"rope_type {rope_type!r} recomputes its frequencies from the sequence "
                         f"length; the exporter builds {', '.join(STATIC_ROPE_TYPES)}")
    return check_sections(rp.get("mrope_section", list(DEFAULT_SECTION)))


def interleaved_rows(half_dim: int, mrope_section: list[int]) -> list[int]:
    """For each rotary frequency, which position row (0=T, 1=H, 2=W) it rotates by."""
    sections = check_sections(mrope_section)
    rows = [0] * half_dim
    frequencies = range(half_dim)
    for row in (1, 2):
        for j in frequencies[row:3 * sections[row]:3]:
            rows[j] = row
    return rows


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class InterleavedMRope(nn.Module):
    """position_ids i64[3, B, S] -> (cos, sin) [B, S, head_dim] in `dtype`, computed in float32
    and then cast, exactly as HF does."""

    def __init__(self, rotary_emb: nn.Module, mrope_section: list[int]):
        super().__init__()
        inv_freq = rotary_emb.inv_freq.detach().float().clone()
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        rows = interleaved_rows(inv_freq.shape[0], list(mrope_section))
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64), persistent=False)
        self.scaling = float(getattr(rotary_emb, "attention_scaling", 1.0))

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype,
                half: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """half: only the first D/2 columns (the second half repeats them), as
        `rotary_embedding`'s tables take them."""
        pos = position_ids.index_select(0, self.rows).permute(1, 2, 0)      # [B, S, D/2]
        freqs = pos.float() * self.inv_freq
        emb = freqs if half else torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D]; cos/sin [B, S, D] broadcast over heads (or already [B, S, 1, D], as
    the decoder passes them: unsqueezed once per step, not once per layer)."""
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin


# ONNX Runtime's contrib RotaryEmbedding (com.microsoft, CPU and CUDA kernels) as a torch op, so
# the decoder's RoPE exports as one node per call instead of five (split, swap, two Mul, Add).
# Its layout (onnxruntime contrib_ops/cpu/bert/rotary_embedding_helper.h, 1.31): x is
# [B, S, heads * D] or [B, heads, S, D]; position_ids i64[B, S] index the rows of cos_cache and
# sin_cache [rows, D/2]; interleaved=0 is rotate_half's layout: out = x * cos + rotate_half(x) * sin
# with cos, sin repeated over both halves (what InterleavedMRope's tables are).
@torch.library.custom_op("appliance::rotary_embedding", mutates_args=())
def rotary_embedding(x: torch.Tensor, position_ids: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads*D] or [B, heads, S, D]; position_ids i64[B, S]; caches [rows, D/2]."""
    cos, sin = cos_cache[position_ids], sin_cache[position_ids]        # [B, S, D/2]
    half = cos.shape[-1]
    if x.dim() == 4:
        xs, cos, sin = x, cos[:, None], sin[:, None]                    # [B, heads, S, D]
    else:
        xs = x.reshape(x.shape[0], x.shape[1], -1, 2 * half)            # [B, S, heads, D]
        cos, sin = cos[:, :, None], sin[:, :, None]
    x1, x2 = xs[..., :half], xs[..., half:]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.reshape(x.shape)


@rotary_embedding.register_fake
def _rotary_embedding_fake(x, position_ids, cos_cache, sin_cache):
    return torch.empty_like(x)


def _onnx_translations() -> dict:
    """torch.onnx.export(custom_translation_table=...): the ops above, as ONNX Runtime nodes. The
    onnx package holds no schema for ONNX Runtime's contrib ops, so the node's signature is
    declared here (inputs, output, attribute: the subset of RotaryEmbedding this uses)."""
    from onnx import defs
    from onnxscript import values

    param = defs.OpSchema.FormalParameter
    schema = defs.OpSchema(
        "RotaryEmbedding", "com.microsoft", 1,
        inputs=[param("input", "T"), param("position_ids", "M"), param("cos_cache", "T"),
                param("sin_cache", "T")],
        outputs=[param("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int64)"], "")],
        attributes=[defs.OpSchema.Attribute("interleaved", defs.OpSchema.AttrType.INT, "")])
    rotary = values.Op(values.Opset("com.microsoft", 1), "RotaryEmbedding", schema)

    def rotary_embedding_onnx(x, position_ids, cos_cache, sin_cache):
        return rotary(x, position_ids, cos_cache, sin_cache, interleaved=0)

    return {torch.ops.appliance.rotary_embedding.default: rotary_embedding_onnx}


def rope_tables(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InterleavedMRope's half tables (cos, sin) [B, S, D/2] -> (position_ids i64[B, S],
    cos_cache, sin_cache [B*S, D/2]) for `rotary_embedding`: row b*S + s holds token (b, s)'s
    angles, so each token's multimodal position is used as it is, whatever its three rows."""
    b, s, h = cos.shape
    rows = torch.arange(b * s, device=cos.device).reshape(b, s)
    return rows, cos.reshape(b * s, h), sin.reshape(b * s, h)
