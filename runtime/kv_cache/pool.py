"""The paged KV pool: device-resident ONNX Runtime values in the layout the decoder graph reads.

Layout (runtime/manifest.py), per layer l: kv.l [NB+1, BS, 2*KVH, D] (int8, or a float dtype for
an fp-KV graph; keys in heads 0..KVH-1, values in KVH..2*KVH-1) and, in int8 mode, kv_scale.l
f32[NB+1, BS, 2*KVH, 1] (one scale per token and head). Token i of a sequence lives at flat slot
block_table[i // BS] * BS + i % BS. Block NB is the scratch block: padding rows of a step write
there, and the block manager (which hands out blocks 0..NB-1) never gives it to a sequence.

The values are allocated once, session-less (so one value can be bound to several sessions), on
the decoder's device and zeroed there by a tiny graph; nothing of the pool's size ever crosses
the host. The decoder writes new tokens into them in place (ScatterND over the same bound buffer);
the host side of a step moves only indices, embeddings of the new tokens and logits.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnxruntime as ort

from runtime import manifest as mf
from runtime.kv_cache import device_ops

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
        """Pool bytes one token takes: keys + values, 2 * KVH heads a layer (+ their f32 scales
        in int8 mode)."""
        per_head = self.head_dim * np.dtype(MODES[mode]).itemsize + (4 if mode == "int8" else 0)
        return 2 * self.num_layers * self.num_kv_heads * per_head

    def bytes_per_block(self, mode: str) -> int:
        return self.bytes_per_token(mode) * self.block_size


class KVPool:
    def __init__(self, shape: KVShape, num_blocks: int, mode: str = "int8", device: str = "cpu",
                 device_id: int = 0):
        if mode not in MODES:
            raise ValueError(f"KV mode must be one of {sorted(MODES)}, got {mode!r}")
        if num_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {num_blocks}")
        self.shape, self.num_blocks, self.mode, self.device = shape, num_blocks, mode, device
        self.dtype = np.dtype(MODES[mode])
        s = shape
        dims = [num_blocks + 1, s.block_size, 2 * s.num_kv_heads, s.head_dim]   # + the scratch block
        self.values: dict[str, ort.OrtValue] = {}
        for layer in range(s.num_layers):
            for name in mf.pool_names(layer, mode == "int8"):
                scale = mf.is_scale(name)
                value = ort.OrtValue.ortvalue_from_shape_and_type(
                    dims[:3] + [1] if scale else dims, np.float32 if scale else self.dtype, device, device_id)
                device_ops.fill_zero(value, device)
                self.values[name] = value

    @classmethod
    def from_budget(cls, shape: KVShape, budget_bytes: int, mode: str = "int8",
                    max_blocks: int | None = None, device: str = "cpu") -> "KVPool":
        """The largest pool that fits budget_bytes (optionally capped at max_blocks)."""
        return cls(shape, blocks_for_budget(shape, budget_bytes, mode, max_blocks), mode, device)

    @property
    def block_size(self) -> int:
        return self.shape.block_size

    @property
    def num_slots(self) -> int:
        """Slots the block manager can hand out (the scratch block excluded)."""
        return self.num_blocks * self.shape.block_size

    @property
    def scratch_slot(self) -> int:
        """Where padding rows write: the first slot of the scratch block."""
        return self.num_slots

    def bytes_per_token(self) -> int:
        return self.shape.bytes_per_token(self.mode)

    def nbytes(self) -> int:
        """Bytes allocated on the device, the scratch block included."""
        return (self.num_blocks + 1) * self.shape.bytes_per_block(self.mode)

    def bindings(self) -> list[tuple[str, str, ort.OrtValue]]:
        """(decoder input, decoder output, value): bind the value as both, for in-place writes."""
        return [(name, name + mf.UPDATED, value) for name, value in self.values.items()]

    def copy_blocks(self, pairs: tuple[tuple[int, int], ...] | list[tuple[int, int]]) -> None:
        """Copy whole blocks (keys, values and their scales, every layer) src -> dst where the
        pool lives: copy-on-write of a shared partial block. Nothing crosses the host but ids."""
        if not pairs:
            return
        src, dst = np.asarray(pairs, np.int64).reshape(-1, 2).T
        if min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= self.num_blocks:
            raise IndexError(f"block ids must be in [0, {self.num_blocks})")
        for value in self.values.values():
            device_ops.copy_blocks(value, self.device, src, dst)

    def data_ptrs(self) -> dict[str, int]:
        return {name: value.data_ptr() for name, value in self.values.items()}

    def read_slots(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Debug accessor: host copies of the stored values at a few flat slots, keys and values
        apart: k, v [n, L, KVH, D] (and k_scale, v_scale [n, L, KVH, 1]). Copies only those
        slots."""
        slots = np.asarray(slots, dtype=np.int64)
        if slots.ndim != 1 or (slots.size and (slots.min() < 0 or slots.max() > self.scratch_slot)):
            raise IndexError(f"slots must be a 1-D array of slot ids in [0, {self.scratch_slot}]")
        blk, off = slots // self.block_size, slots % self.block_size
        kvh = self.shape.num_kv_heads
        out = {}
        for kind, keys in ((mf.KV, ("k", "v")), (mf.KV_SCALE, ("k_scale", "v_scale"))):
            names = [mf.pool_name(kind, layer) for layer in range(self.shape.num_layers)]
            if names[0] in self.values:
                both = np.stack([device_ops.gather_slots(self.values[n], self.device, blk, off)
                                 for n in names], axis=1)                  # [n, L, 2*KVH, ...]
                out[keys[0]], out[keys[1]] = both[:, :, :kvh], both[:, :, kvh:]
        return out


def blocks_for_budget(shape: KVShape, budget_bytes: int, mode: str = "int8",
                      max_blocks: int | None = None) -> int:
    """Blocks the block manager may hand out from budget_bytes (one more, the scratch block, is
    allocated beside them)."""
    n = int(budget_bytes) // shape.bytes_per_block(mode) - 1
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n < 1:
        raise ValueError(f"a KV budget of {budget_bytes} bytes holds no block of "
                         f"{shape.bytes_per_block(mode)} bytes beside the scratch block")
    return n
