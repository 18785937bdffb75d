"""Host KV pool: layout [NB, L, BS, KVH, D], scatter writes by flat slot, sizing."""
from __future__ import annotations

import numpy as np
import pytest

from runtime import manifest as mf
from runtime.kv_cache import KVPool, KVShape, blocks_for_budget

SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)


def new_tokens(n, rng, dtype=np.int8):
    s = SHAPE
    if dtype == np.int8:
        k = rng.integers(-127, 128, (n, s.num_layers, s.num_kv_heads, s.head_dim), dtype=np.int8)
        v = rng.integers(-127, 128, k.shape, dtype=np.int8)
    else:
        k = rng.standard_normal((n, s.num_layers, s.num_kv_heads, s.head_dim)).astype(dtype)
        v = rng.standard_normal(k.shape).astype(dtype)
    ks = rng.random((n, s.num_layers, s.num_kv_heads), dtype=np.float32)
    vs = rng.random(ks.shape, dtype=np.float32)
    return k, v, ks, vs


def test_int8_write_lands_in_the_documented_layout():
    rng = np.random.default_rng(0)
    pool = KVPool(SHAPE, num_blocks=11)
    assert pool.k.shape == (11, 3, 4, 2, 8) and pool.k.dtype == np.int8
    assert pool.k_scale.shape == (11, 3, 4, 2) and pool.k_scale.dtype == np.float32
    k_before, k_ptr = pool.k, pool.k.__array_interface__["data"][0]
    slots = np.array([13, 14, 15, 16, 2, 43])           # block 3 off 1..3, block 4 off 0, ...
    k, v, ks, vs = new_tokens(len(slots), rng)
    pool.write(slots, k, v, ks, vs)
    assert pool.k is k_before and pool.k.__array_interface__["data"][0] == k_ptr   # in place
    for j, slot in enumerate(slots):
        b, o = divmod(int(slot), 4)
        for layer in range(3):
            np.testing.assert_array_equal(pool.k[b, layer, o], k[j, layer])
            np.testing.assert_array_equal(pool.v[b, layer, o], v[j, layer])
            np.testing.assert_array_equal(pool.k_scale[b, layer, o], ks[j, layer])
            np.testing.assert_array_equal(pool.v_scale[b, layer, o], vs[j, layer])
    back = pool.read(slots)
    np.testing.assert_array_equal(back["k"], k)
    np.testing.assert_array_equal(back["v_scale"], vs)
    # Nothing else was touched.
    mask = np.ones((11, 4), bool)
    mask[slots // 4, slots % 4] = False
    assert not pool.k.transpose(0, 2, 1, 3, 4)[mask].any()
    assert not pool.v_scale.transpose(0, 2, 1, 3)[mask].any()


def test_overwrite_and_feeds_names():
    rng = np.random.default_rng(1)
    pool = KVPool(SHAPE, num_blocks=5)
    k, v, ks, vs = new_tokens(2, rng)
    pool.write(np.array([7, 8]), k, v, ks, vs)
    k2, v2, ks2, vs2 = new_tokens(1, rng)
    pool.write(np.array([8]), k2, v2, ks2, vs2)
    np.testing.assert_array_equal(pool.read(np.array([7, 8]))["k"], np.concatenate([k[:1], k2]))
    feeds = pool.feeds()
    assert set(feeds) == {mf.KV_K, mf.KV_V, mf.KV_K_SCALE, mf.KV_V_SCALE}
    assert feeds[mf.KV_K] is pool.k and feeds[mf.KV_V_SCALE] is pool.v_scale


@pytest.mark.parametrize("mode,dtype", [("float16", np.float16), ("float32", np.float32)])
def test_float_modes_have_no_scales(mode, dtype):
    rng = np.random.default_rng(2)
    pool = KVPool(SHAPE, num_blocks=4, mode=mode)
    assert pool.k.dtype == dtype and pool.k_scale is None
    assert set(pool.feeds()) == {mf.KV_K, mf.KV_V}
    k, v, _, _ = new_tokens(3, rng, dtype)
    pool.write(np.array([0, 5, 15]), k, v)
    np.testing.assert_array_equal(pool.read(np.array([0, 5, 15]))["v"], v)
    with pytest.raises(ValueError):
        pool.write(np.array([0, 5, 15]), k.astype(np.float64), v)


def test_write_from_padded_decoder_outputs():
    rng = np.random.default_rng(3)
    pool = KVPool(SHAPE, num_blocks=6)
    k, v, ks, vs = new_tokens(2 * 5, rng)
    outputs = {mf.NEW_K: k.reshape(2, 5, 3, 2, 8), mf.NEW_V: v.reshape(2, 5, 3, 2, 8),
               mf.NEW_K_SCALE: ks.reshape(2, 5, 3, 2), mf.NEW_V_SCALE: vs.reshape(2, 5, 3, 2)}
    # Row 0 has 3 real tokens, row 1 has 1 (the rest is right padding).
    rows, cols = np.array([0, 0, 0, 1]), np.array([0, 1, 2, 0])
    slots = np.array([4, 5, 6, 20])
    pool.write_outputs(slots, outputs, rows, cols)
    np.testing.assert_array_equal(pool.read(slots)["k"], k[[0, 1, 2, 5]])
    np.testing.assert_array_equal(pool.read(slots)["k_scale"], ks[[0, 1, 2, 5]])


def test_bad_writes_are_refused():
    rng = np.random.default_rng(4)
    pool = KVPool(SHAPE, num_blocks=2)
    k, v, ks, vs = new_tokens(2, rng)
    with pytest.raises(IndexError):
        pool.write(np.array([0, 8]), k, v, ks, vs)         # 2 blocks * 4 = slots 0..7
    with pytest.raises(ValueError):
        pool.write(np.array([0, 1, 2]), k, v, ks, vs)      # 3 slots, 2 tokens
    with pytest.raises(ValueError):
        pool.write(np.array([0, 1]), k, v)                 # int8 without scales
    with pytest.raises(ValueError):
        KVPool(SHAPE, num_blocks=2, mode="int4")


def test_sizing_matches_the_arrays():
    for mode in ("int8", "float16", "float32"):
        pool = KVPool(SHAPE, num_blocks=7, mode=mode)
        assert pool.bytes_per_token() * pool.num_slots == pool.nbytes()
    # int8: 2 (k, v) * L * KVH * (D bytes + 4 scale bytes) = 2 * 3 * 2 * 12
    assert SHAPE.bytes_per_token("int8") == 144
    assert SHAPE.bytes_per_token("float16") == 2 * 3 * 2 * 16
    per_block = 144 * 4
    assert blocks_for_budget(SHAPE, 10 * per_block + per_block - 1) == 10
    assert blocks_for_budget(SHAPE, 100 * per_block, max_blocks=11) == 11
    pool = KVPool.from_budget(SHAPE, 5 * per_block)
    assert pool.num_blocks == 5 and pool.nbytes() <= 5 * per_block
    with pytest.raises(ValueError):
        blocks_for_budget(SHAPE, per_block - 1)
    layout = mf.KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="int8",
                         scale_dtype="float32", scale_granularity="per-token-per-head",
                         pool_layout="[num_blocks, layers, block_size, kv_heads, head_dim]")
    assert KVShape.from_layout(layout) == SHAPE
