"""A least-recently-used cache of vision encoder outputs, bounded by total bytes.

Keys are content hashes of what was encoded (see `content_key`), so the same image sent twice, or
in a later turn of a chat, skips the encoder. Stored arrays are made read-only: every hit hands out
the same buffers, and a consumer that wrote into them would corrupt later hits.
"""
from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any

import numpy as np


def content_key(pixel_values: np.ndarray, grid_thw, *extra: Any) -> str:
    """A hash of the patches, their dtype/shape, the grid and anything else that changes the
    encoder output (e.g. the engine name)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(repr((str(pixel_values.dtype), pixel_values.shape, tuple(int(x) for x in grid_thw),
                   extra)).encode())
    h.update(np.ascontiguousarray(pixel_values).data)
    return h.hexdigest()


def nbytes(value: Any) -> int:
    """Bytes held by an array, a (nested) tuple/list of arrays, or a preprocessed media item
    (its pixel values)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, (tuple, list)):
        return sum(nbytes(v) for v in value)
    if isinstance(getattr(value, "pixel_values", None), np.ndarray):
        return int(value.pixel_values.nbytes)
    raise TypeError(f"cannot size a {type(value).__name__} for the vision cache")


def _freeze(value: Any) -> None:
    if isinstance(value, np.ndarray):
        value.flags.writeable = False
    elif isinstance(value, (tuple, list)):
        for v in value:
            _freeze(v)
    elif isinstance(getattr(value, "pixel_values", None), np.ndarray):
        value.pixel_values.flags.writeable = False


class VisionCache:
    """Thread-safe LRU keyed by content hash; evicts least recently used entries until the total
    stays within `capacity_bytes`. A value larger than the whole capacity is not stored."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.total_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: str, value: Any) -> bool:
        """Store (or refresh) `value`; return whether it is now cached."""
        size = nbytes(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.total_bytes -= old[1]
            if size > self.capacity_bytes:
                return False
            _freeze(value)
            self._entries[key] = (value, size)
            self.total_bytes += size
            while self.total_bytes > self.capacity_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.total_bytes -= evicted
                self.evictions += 1
            return True

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.total_bytes,
                    "capacity_bytes": self.capacity_bytes, "hits": self.hits,
                    "misses": self.misses, "evictions": self.evictions}
