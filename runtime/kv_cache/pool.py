"""The host-side paged KV pool: numpy arrays in the layout the decoder graph reads.

Layout (runtime/manifest.py): kv_k, kv_v [NB, L, BS, KVH, D] (int8, or a float dtype for an fp-KV
graph) and, in int8 mode, kv_k_scale, kv_v_scale f32 [NB, L, BS, KVH] (one scale per token, layer
and head). Token i of a sequence lives at flat slot block_table[i // BS] * BS + i % BS.

write() scatters the new tokens' keys/values into their slots in place: its cost grows with the
number of new tokens, never with the pool.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from runtime import manifest as mf

MODES = {"int8": np.int8, "float32": np.float32, "float16": np.float16}


@dataclasses.dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    @staticmethod
    def from_layout(kv: mf.KVLayout) -> "KVShape":
        return KVShape(kv.num_layers, kv.num_kv_heads, kv.head_dim, kv.block_size)

    def bytes_per_token(self, mode: str) -> int:
        """Pool bytes one token takes: keys + values (+ their f32 scales in int8 mode)."""
        per_head = self.head_dim * np.dtype(MODES[mode]).itemsize + (4 if mode == "int8" else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head

    def bytes_per_block(self, mode: str) -> int:
        return self.bytes_per_token(mode) * self.block_size


class KVPool:
    def __init__(self, shape: KVShape, num_blocks: int, mode: str = "int8"):
        if mode not in MODES:
            raise ValueError(f"KV mode must be one of {sorted(MODES)}, got {mode!r}")
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.shape, self.num_blocks, self.mode = shape, num_blocks, mode
        self.dtype = np.dtype(MODES[mode])
        s = shape
        dims = (num_blocks, s.num_layers, s.block_size, s.num_kv_heads, s.head_dim)
        self.k = np.zeros(dims, self.dtype)
        self.v = np.zeros(dims, self.dtype)
        self.k_scale = self.v_scale = None
        if mode == "int8":
            self.k_scale = np.zeros(dims[:-1], np.float32)
            self.v_scale = np.zeros(dims[:-1], np.float32)

    @classmethod
    def from_budget(cls, shape: KVShape, budget_bytes: int, mode: str = "int8",
                    max_blocks: int | None = None) -> "KVPool":
        """The largest pool that fits budget_bytes (optionally capped at max_blocks)."""
        return cls(shape, blocks_for_budget(shape, budget_bytes, mode, max_blocks), mode)

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.shape.block_size

    def bytes_per_token(self) -> int:
        return self.shape.bytes_per_token(self.mode)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.k, self.v, self.k_scale, self.v_scale) if a is not None)

    def _split(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slots = np.asarray(slots, dtype=np.int64)
        if slots.ndim != 1:
            raise ValueError(f"slots must be a 1-D array of flat slot ids, got shape {slots.shape}")
        if slots.size and (slots.min() < 0 or slots.max() >= self.num_slots):
            raise IndexError(f"slot ids must lie in [0, {self.num_slots})")
        return slots // self.block_size, slots % self.block_size

    def write(self, slots: np.ndarray, new_k: np.ndarray, new_v: np.ndarray,
              new_k_scale: np.ndarray | None = None, new_v_scale: np.ndarray | None = None) -> None:
        """Store n tokens: new_k/new_v [n, L, KVH, D], scales [n, L, KVH] (int8 mode only)."""
        blk, off = self._split(slots)
        s = self.shape
        want = (len(blk), s.num_layers, s.num_kv_heads, s.head_dim)
        for name, a in (("new_k", new_k), ("new_v", new_v)):
            if a.shape != want:
                raise ValueError(f"{name} has shape {a.shape}, expected {want}")
            if a.dtype != self.dtype:
                raise ValueError(f"{name} has dtype {a.dtype}, the pool holds {self.dtype}")
        if self.mode == "int8":
            if new_k_scale is None or new_v_scale is None:
                raise ValueError("an int8 pool needs new_k_scale and new_v_scale")
            for name, a in (("new_k_scale", new_k_scale), ("new_v_scale", new_v_scale)):
                if a.shape != want[:-1]:
                    raise ValueError(f"{name} has shape {a.shape}, expected {want[:-1]}")
            self.k_scale[blk, :, off] = new_k_scale
            self.v_scale[blk, :, off] = new_v_scale
        # Advanced indices split by a slice: the indexed view is [n, L, KVH, D], like new_k.
        self.k[blk, :, off] = new_k
        self.v[blk, :, off] = new_v

    def read(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Copies of the stored values at slots, keyed like write's arguments."""
        blk, off = self._split(slots)
        out = {"k": self.k[blk, :, off], "v": self.v[blk, :, off]}
        if self.mode == "int8":
            out.update(k_scale=self.k_scale[blk, :, off], v_scale=self.v_scale[blk, :, off])
        return out

    def write_outputs(self, slots: np.ndarray, outputs: dict[str, np.ndarray],
                      rows: np.ndarray, cols: np.ndarray) -> None:
        """Store tokens straight from decoder outputs [B, S, ...]: token j of the step is
        outputs[name][rows[j], cols[j]] (right-padded batches carry padding to skip)."""
        get = lambda name: outputs[name][rows, cols] if name in outputs else None
        self.write(slots, get(mf.NEW_K), get(mf.NEW_V), get(mf.NEW_K_SCALE), get(mf.NEW_V_SCALE))

    def feeds(self) -> dict[str, np.ndarray]:
        """The pool arrays by decoder graph input name."""
        out = {mf.KV_K: self.k, mf.KV_V: self.v}
        if self.mode == "int8":
            out.update({mf.KV_K_SCALE: self.k_scale, mf.KV_V_SCALE: self.v_scale})
        return out


def blocks_for_budget(shape: KVShape, budget_bytes: int, mode: str = "int8",
                      max_blocks: int | None = None) -> int:
    n = int(budget_bytes) // shape.bytes_per_block(mode)
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of "
                         f"{shape.bytes_per_block(mode)} bytes")
    return n
