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

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        pos = position_ids.index_select(0, self.rows).permute(1, 2, 0)      # [B, S, D/2]
        freqs = pos.float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.scaling != 1.0:
            cos, sin = cos * self.scaling, sin * self.scaling
        return cos.to(dtype), sin.to(dtype)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., D] (both halves equal, as InterleavedMRope returns it) -> [-sin1, sin2], so that
    rotate_half(x) * sin == swap_halves(x) * signed_sin(sin) exactly (a sign flip is exact):
    `apply_rope_swapped` then needs no Neg per call, only once per step here."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def apply_rope_swapped(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the sign folded into sin (see `signed_sin`); cos/sin broadcast to x."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin_signed


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D]; cos/sin [B, S, D] broadcast over heads (or already [B, S, 1, D], as
    the decoder passes them: unsqueezed once per step, not once per layer)."""
    if cos.dim() == 3:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
