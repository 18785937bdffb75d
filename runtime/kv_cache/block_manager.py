"""KV block bookkeeping: block ids, reference counts, a free list and prefix hashes.

Pure bookkeeping: the KV tensors live in the pool (runtime/kv_cache/pool.py) or on the device;
this module only decides which block ids a sequence owns.

Invariants (checked by check_integrity):
  * every block is either free (ref_count 0, on the free list exactly once) or used (ref > 0);
  * the free list is ordered: blocks freed earlier are reused earlier (a deterministic LRU), so a
    freed block keeps its prefix hash, and can be revived by a prefix hit, until it is reused;
  * hash_to_block maps a content hash to a block that carries that hash.

Prefix reuse: a full block's hash chains the previous block's hash, its token ids and "extra
keys": the content hash (and placement) of every image/video whose placeholder tokens fall in
the block, since all image pad tokens share one id. A block is only published in the hash map
once its keys/values have been computed (cache_computed_blocks), so a prefix hit never reads a
block still being written.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from runtime.sequence import Sequence


class KVIntegrityError(AssertionError):
    """The block bookkeeping broke one of its invariants (a bug, never a user error)."""


class NoFreeBlocks(RuntimeError):
    """allocate/may_append was called without can_allocate/can_append saying yes."""


@dataclasses.dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None            # set once the block is full and computed
    token_ids: tuple[int, ...] = ()      # the tokens behind `hash` (guards against collisions)


def block_hash(parent: bytes | None, token_ids: list[int], extra: tuple = ()) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"root")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra:
        h.update(repr(extra).encode())
    return h.digest()


def media_keys(seq: Sequence, index: int, block_size: int) -> tuple:
    """Extra hash keys for block `index`: (start, end relative to the block, content hash) of
    every media span overlapping it."""
    lo, hi = index * block_size, (index + 1) * block_size
    return tuple((m.start - lo, m.end - lo, m.content_hash)
                 for m in seq.media if m.start < hi and m.end > lo)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Ordered set used as a FIFO free list with O(1) removal (a prefix hit revives a free block).
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[bytes, int] = {}
        self.num_prefix_hits = 0          # blocks reused, for stats
        self.num_prefix_queries = 0       # full blocks looked up

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def free_block_ids(self) -> list[int]:
        """The free list in reuse order (for tests and debugging)."""
        return list(self._free)

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    # --- hashing -----------------------------------------------------------------------------
    def _hash_of(self, seq: Sequence, index: int) -> bytes:
        """Hash of full block `index` of seq, computing (and memoising on seq) the chain."""
        while len(seq.block_hashes) <= index:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[i - 1] if i else None
            seq.block_hashes.append(block_hash(parent, seq.block_tokens(i, self.block_size),
                                               media_keys(seq, i, self.block_size)))
        return seq.block_hashes[index]

    def _prefix_hits(self, seq: Sequence) -> list[int]:
        """Block ids holding seq's leading full blocks, as far as they are cached. The block
        holding the last token is never a hit: the model must compute at least one token."""
        hits = []
        for i in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.hash_to_block.get(self._hash_of(seq, i))
            if block_id is None or self.blocks[block_id].token_ids != tuple(seq.block_tokens(i, self.block_size)):
                break
            hits.append(block_id)
        return hits

    # --- allocation --------------------------------------------------------------------------
    def _needed_from_free(self, seq: Sequence, hits: list[int]) -> int:
        # Hits on free blocks are revived from the free list, so only hits on used blocks are free of charge.
        in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.blocks_needed(seq.num_tokens) - in_use

    def can_allocate(self, seq: Sequence, extra: int = 0) -> bool:
        """Whether seq's blocks fit, with `extra` free blocks to spare (its forks' last blocks)."""
        return self._needed_from_free(seq, self._prefix_hits(seq)) + extra <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its known tokens, reusing cached prefix blocks. Sets
        seq.num_cached_tokens and seq.num_computed_tokens to the reused length. All or nothing."""
        if seq.block_table:
            raise ValueError(f"{seq.request_id} already has blocks")
        hits = self._prefix_hits(seq)
        if self._needed_from_free(seq, hits) > self.num_free_blocks:
            raise NoFreeBlocks(f"{seq.request_id} needs more blocks than are free")
        table = []
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
            table.append(block_id)
        for _ in range(self.blocks_needed(seq.num_tokens) - len(hits)):
            table.append(self._take_free())
        self.num_prefix_queries += (seq.num_tokens - 1) // self.block_size
        self.num_prefix_hits += len(hits)
        seq.block_table = table
        seq.num_published_blocks = len(hits)
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def _take_free(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id

    def can_append(self, seq: Sequence, num_new_tokens: int = 1) -> bool:
        """Whether the blocks for num_new_tokens more computed tokens can be found."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_free_blocks

    def may_append(self, seq: Sequence, num_new_tokens: int = 1) -> None:
        """Grow seq's block table to hold num_computed_tokens + num_new_tokens tokens (a new
        block when the last one is full). Call can_append first."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_free_blocks:
            raise NoFreeBlocks(f"{seq.request_id} needs {need} blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def blocks_to_fork(self, parent: Sequence) -> int:
        """Fresh blocks one child forked from parent needs: all but the computed full ones."""
        return self.blocks_needed(parent.num_tokens) - parent.num_computed_tokens // self.block_size

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Give child (same tokens as parent) parent's computed full blocks, shared (ref + 1),
        and fresh blocks for the rest. Returns (src, dst) when the first fresh block must copy
        parent's partial block (copy-on-write; the caller copies the KV), else None."""
        if child.block_table:
            raise ValueError(f"{child.request_id} already has blocks")
        computed = parent.num_computed_tokens
        full = computed // self.block_size
        fresh = self.blocks_to_fork(parent)
        if fresh > self.num_free_blocks:
            raise NoFreeBlocks(f"forking {parent.request_id} needs {fresh} free blocks")
        table = list(parent.block_table[:full])
        for block_id in table:
            self.blocks[block_id].ref_count += 1
        table += [self._take_free() for _ in range(fresh)]
        child.block_table = table
        child.block_hashes = list(parent.block_hashes[:full])
        child.num_published_blocks = min(parent.num_published_blocks, full)
        child.num_computed_tokens = computed
        child.num_cached_tokens = parent.num_cached_tokens
        if computed % self.block_size:
            return parent.block_table[full], table[full]
        return None

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish the hashes of seq's full, computed blocks so later requests can reuse them."""
        full = seq.num_computed_tokens // self.block_size
        for i in range(seq.num_published_blocks, full):
            block = self.blocks[seq.block_table[i]]
            if block.hash is None:
                h = self._hash_of(seq, i)
                block.hash, block.token_ids = h, tuple(seq.block_tokens(i, self.block_size))
                self.hash_to_block.setdefault(h, block.block_id)
        seq.num_published_blocks = max(seq.num_published_blocks, full)

    def deallocate(self, seq: Sequence) -> None:
        """Drop seq's references. Blocks reaching ref 0 join the free list tail-first (a
        sequence's last blocks are reused before its shared prefix), keeping their hashes."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise KVIntegrityError(f"block {block_id} freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None
        seq.block_table = []
        seq.num_published_blocks = 0
        seq.num_computed_tokens = 0     # num_cached_tokens stays for usage; allocate() resets it

    # --- checks ------------------------------------------------------------------------------
    def check_integrity(self, live: list[Sequence] | None = None) -> None:
        """Raise KVIntegrityError if an invariant is broken. With `live` (every sequence that
        holds blocks), also check that the ref counts equal the block-table references."""
        for block in self.blocks:
            free = block.block_id in self._free
            if free != (block.ref_count == 0) or block.ref_count < 0:
                raise KVIntegrityError(f"block {block.block_id}: ref {block.ref_count}, free={free}")
        for h, block_id in self.hash_to_block.items():
            if self.blocks[block_id].hash != h:
                raise KVIntegrityError(f"hash map points at block {block_id} with another hash")
        if live is not None:
            refs = collections.Counter(b for seq in live for b in seq.block_table)
            for block in self.blocks:
                if refs.get(block.block_id, 0) != block.ref_count:
                    raise KVIntegrityError(f"block {block.block_id}: ref {block.ref_count}, "
                                           f"referenced {refs.get(block.block_id, 0)} times")
