"""Interleaved multimodal RoPE (MRoPE) for the Qwen3-VL text decoder, computed in the graph.

Each token has three position rows (temporal, height, width). Rotary frequency j (of head_dim/2)
reads its position from one row, chosen by a fixed interleaved pattern (HF
`Qwen3VLTextRotaryEmbedding.recomposition_frequencies`): row 1 (H) for j % 3 == 1 and
j < 3 * mrope_section[1], row 2 (W) for j % 3 == 2 and j < 3 * mrope_section[2], row 0 (T)
otherwise. The pattern is a constant, so in the graph it is one Gather over the 3 rows.
"""
from __future__ import annotations

import torch
from torch import nn


class MRopeError(ValueError):
    """A rope configuration this exporter does not reproduce."""


def interleaved_rows(half_dim: int, mrope_section: list[int]) -> list[int]:
    """For each rotary frequency, which position row (0=T, 1=H, 2=W) it rotates by."""
    if len(mrope_section) != 3 or sum(mrope_section) != half_dim:
        raise MRopeError(f"mrope_section {mrope_section} must have 3 parts summing to {half_dim}")
    rows = [0] * half_dim
    for row in (1, 2):
        for j in range(row, 3 * mrope_section[row], 3):
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, heads, D]; cos/sin [B, S, D] broadcast over heads."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
