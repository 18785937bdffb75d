"""Block manager bookkeeping on an 11-block pool: exact ids, free-list order, ref counts, prefix
hits (with image content hashes), all-or-nothing allocation, integrity."""
from __future__ import annotations

import pytest

from runtime.kv_cache import BlockManager, KVIntegrityError, NoFreeBlocks
from runtime.sequence import MediaSpan, Sequence

BS = 4
IMG = 900          # the image pad token id: every image's placeholders look the same


def make(tokens, media=()):
    return Sequence(list(tokens), media=list(media))


def computed(bm: BlockManager, seq: Sequence, n: int | None = None) -> None:
    """Pretend the runner computed the first n tokens (default: all but the last)."""
    seq.num_computed_tokens = seq.num_tokens - 1 if n is None else n
    bm.cache_computed_blocks(seq)


def refs(bm):
    return [b.ref_count for b in bm.blocks]


def test_fresh_pool_and_simple_allocation():
    bm = BlockManager(11, BS)
    assert bm.free_block_ids() == list(range(11))
    seq = make(range(10))                       # 3 blocks: 4 + 4 + 2
    assert bm.can_allocate(seq)
    bm.allocate(seq)
    assert seq.block_table == [0, 1, 2]
    assert seq.num_cached_tokens == seq.num_computed_tokens == 0
    assert bm.free_block_ids() == list(range(3, 11))
    assert bm.num_used_blocks == 3 and bm.num_free_blocks == 8
    assert refs(bm)[:4] == [1, 1, 1, 0]
    assert seq.slot_mapping(6, 10, BS).tolist() == [1 * 4 + 2, 1 * 4 + 3, 2 * 4 + 0, 2 * 4 + 1]
    bm.deallocate(seq)
    # Freed tail first: the last block is reused before the shared-prefix candidates.
    assert bm.free_block_ids() == list(range(3, 11)) + [2, 1, 0]
    assert seq.block_table == []
    bm.check_integrity(live=[])


def test_prefix_hit_shares_blocks_and_counts_refs():
    bm = BlockManager(11, BS)
    a = make(range(10))
    bm.allocate(a)
    computed(bm, a)                              # 9 computed: blocks 0, 1 are full
    b = make(list(range(8)) + [50, 51, 52])
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.block_table == [0, 1, 3]
    assert b.num_cached_tokens == b.num_computed_tokens == 8
    assert refs(bm)[:4] == [2, 2, 1, 1]
    bm.check_integrity(live=[a, b])
    bm.deallocate(a)
    assert refs(bm)[:4] == [1, 1, 0, 1]
    assert bm.free_block_ids() == list(range(4, 11)) + [2]
    bm.deallocate(b)
    assert bm.free_block_ids() == list(range(4, 11)) + [2, 3, 1, 0]
    bm.check_integrity(live=[])


def test_last_token_is_never_cached():
    bm = BlockManager(11, BS)
    a = make(range(8))
    bm.allocate(a)
    computed(bm, a, 8)                           # both blocks full and published
    same = make(range(8))
    bm.allocate(same)
    # Only block 0 is a hit: the block holding the last prompt token is recomputed.
    assert same.block_table == [0, 2]
    assert same.num_cached_tokens == 4
    longer = make(range(9))
    bm.allocate(longer)
    assert longer.block_table == [0, 1, 3] and longer.num_cached_tokens == 8


def test_freed_blocks_keep_their_hash_until_reused():
    bm = BlockManager(11, BS)
    a = make(range(12))
    bm.allocate(a)
    computed(bm, a, 12)
    bm.deallocate(a)
    assert bm.num_free_blocks == 11
    b = make(range(13))
    assert bm.can_allocate(b)
    bm.allocate(b)                               # revives 0, 1, 2 from the free list
    assert b.block_table == [0, 1, 2, 3]
    assert b.num_cached_tokens == 12
    assert bm.free_block_ids() == list(range(4, 11))
    bm.deallocate(b)
    # Now use up the free list in order so blocks 3, 2 (freed first) lose their hashes.
    fill = make(range(100, 100 + 4 * 9))
    bm.allocate(fill)
    assert fill.block_table == list(range(4, 11)) + [3, 2]
    assert bm.free_block_ids() == [1, 0]
    bm.deallocate(fill)
    assert bm.free_block_ids() == [1, 0, 2, 3] + list(range(10, 3, -1))
    c = make(range(13))
    bm.allocate(c)
    assert c.num_cached_tokens == 8                  # block 2 was reused, so its hash is gone
    assert c.block_table == [0, 1, 2, 3]
    bm.check_integrity(live=[c])


def test_blocks_are_published_only_once_computed():
    bm = BlockManager(11, BS)
    a = make(range(10))
    bm.allocate(a)                               # not computed yet
    b = make(range(10))
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.block_table == [3, 4, 5]
    computed(bm, a, 4)
    c = make(range(10))
    bm.allocate(c)
    assert c.block_table[0] == 0 and c.num_cached_tokens == 4


def test_image_content_hash_decides_prefix_hits():
    bm = BlockManager(11, BS)
    tokens = [1, 2] + [IMG] * 6 + [3, 4, 5]      # image placeholders at [2, 8)
    cat = make(tokens, [MediaSpan(2, 8, "sha-cat")])
    bm.allocate(cat)
    computed(bm, cat)
    same_cat = make(tokens, [MediaSpan(2, 8, "sha-cat")])
    bm.allocate(same_cat)
    assert same_cat.num_cached_tokens == 8 and same_cat.block_table[:2] == [0, 1]
    dog = make(tokens, [MediaSpan(2, 8, "sha-dog")])
    bm.allocate(dog)
    assert dog.num_cached_tokens == 0 and set(dog.block_table).isdisjoint({0, 1, 2})
    # The same image placed elsewhere is different content for the cache, too.
    moved = make([1, IMG, IMG, IMG, IMG, IMG, IMG, 2, 3, 4, 5], [MediaSpan(1, 7, "sha-cat")])
    bm.allocate(moved)
    assert moved.num_cached_tokens == 0
    bm.check_integrity(live=[cat, same_cat, dog, moved])


def test_failed_allocation_leaves_state_untouched():
    bm = BlockManager(11, BS)
    a = make(range(100, 100 + 4 * 8))            # 8 blocks
    bm.allocate(a)
    computed(bm, a)
    before = (bm.free_block_ids(), refs(bm), dict(bm.hash_to_block))
    big = make(list(range(100, 108)) + list(range(20)))   # 2 hit blocks + 5 new > 3 free
    assert not bm.can_allocate(big)
    with pytest.raises(NoFreeBlocks):
        bm.allocate(big)
    assert (bm.free_block_ids(), refs(bm), dict(bm.hash_to_block)) == before
    assert big.block_table == [] and big.num_cached_tokens == 0
    # A hit on used blocks costs nothing: 2 hits + 3 new blocks fit in 3 free blocks.
    fits = make(list(range(100, 108)) + list(range(12)))
    assert bm.can_allocate(fits)
    bm.allocate(fits)
    assert fits.block_table == [0, 1, 8, 9, 10] and bm.num_free_blocks == 0
    bm.check_integrity(live=[a, fits])


def test_append_allocates_a_block_when_the_last_is_full():
    bm = BlockManager(3, BS)
    seq = make(range(8))
    bm.allocate(seq)
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 7
    assert bm.can_append(seq)
    bm.may_append(seq)                          # token 7 fits in block 1
    assert seq.block_table == [0, 1]
    seq.num_computed_tokens = 8
    seq.token_ids.append(9)
    bm.may_append(seq)                          # token 8 starts block 2
    assert seq.block_table == [0, 1, 2] and bm.num_free_blocks == 0
    seq.num_computed_tokens = 12
    assert not bm.can_append(seq)
    with pytest.raises(NoFreeBlocks):
        bm.may_append(seq)
    assert seq.block_table == [0, 1, 2]


def test_integrity_check_catches_broken_bookkeeping():
    bm = BlockManager(11, BS)
    seq = make(range(5))
    bm.allocate(seq)
    bm.check_integrity(live=[seq])
    with pytest.raises(KVIntegrityError):
        bm.check_integrity(live=[])              # a leak: blocks held by nobody
    bm.blocks[0].ref_count = 0
    with pytest.raises(KVIntegrityError):
        bm.check_integrity()
    bm.blocks[0].ref_count = 1
    bm.deallocate(seq)
    with pytest.raises(KVIntegrityError):
        seq.block_table = [0]
        bm.deallocate(seq)                       # freeing a free block
