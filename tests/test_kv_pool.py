"""The device-resident KV pool: per-layer values [NB+1, BS, 2*KVH, D] (keys, then values; + scales
[NB+1, BS, 2*KVH, 1]), zeroed where they live, read back through the debug accessor, and sized
from a budget.

The writes themselves happen inside the decoder graph (tests/test_decoder_parity.py checks that
they land in place, at the right slots, with transformers' values)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from runtime import manifest as mf
from runtime.kv_cache import KVPool, KVShape, blocks_for_budget
from runtime.kv_cache import device_ops

SHAPE = KVShape(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4)


def test_int8_pool_has_one_value_per_layer_and_kind_zeroed_with_a_scratch_block():
    pool = KVPool(SHAPE, num_blocks=11)
    assert set(pool.values) == {"kv.0", "kv.1", "kv.2", "kv_scale.0", "kv_scale.1", "kv_scale.2"}
    kv0, s0 = pool.values["kv.0"], pool.values["kv_scale.0"]
    assert kv0.shape() == [12, 4, 4, 8] and kv0.data_type() == "tensor(int8)"   # 11 blocks + scratch
    assert s0.shape() == [12, 4, 4, 1] and s0.data_type() == "tensor(float)"
    assert kv0.device_name() == "cpu"
    assert pool.scratch_slot == 44 == pool.num_slots
    every = pool.read_slots(np.arange(pool.scratch_slot + 1))
    assert every["k"].shape == every["v"].shape == (45, 3, 2, 8)
    assert every["k_scale"].shape == every["v_scale"].shape == (45, 3, 2, 1)
    assert not any(a.any() for a in every.values())
    for name, out, value in pool.bindings():
        assert out == name + ".out" and pool.values[name] is value


def test_the_accessor_reads_keys_from_the_first_heads_and_values_from_the_last():
    pool = KVPool(SHAPE, num_blocks=2)
    kv = np.arange(3 * 4 * 4 * 8).reshape(3, 4, 4, 8).astype(np.int8)   # [NB+1, BS, 2*KVH, D]
    scale = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4, 1)
    pool.values["kv.1"].update_inplace(kv)
    pool.values["kv_scale.1"].update_inplace(scale)
    got = pool.read_slots(np.array([5, 0]))                               # block 1 offset 1, block 0
    np.testing.assert_array_equal(got["k"][:, 1], kv[[1, 0], [1, 0], :2])
    np.testing.assert_array_equal(got["v"][:, 1], kv[[1, 0], [1, 0], 2:])
    np.testing.assert_array_equal(got["v_scale"][:, 1], scale[[1, 0], [1, 0], 2:])
    assert not got["k"][:, 0].any() and not got["k_scale"][:, 2].any()


def test_fill_zero_works_in_place_on_an_existing_buffer():
    host = np.full((5, 4, 2, 8), 7, np.int8)
    value = ort.OrtValue.ortvalue_from_numpy(host, "cpu", 0)
    ptr = value.data_ptr()
    device_ops.fill_zero(value, "cpu")
    assert value.data_ptr() == ptr and not value.numpy().any()
    picked = device_ops.gather_slots(ort.OrtValue.ortvalue_from_numpy(np.arange(40, dtype=np.float32).reshape(5, 4, 2)),
                                     "cpu", np.array([1, 4]), np.array([3, 0]))
    np.testing.assert_array_equal(picked, [[14, 15], [32, 33]])


@pytest.mark.parametrize("mode,dtype", [("float16", "tensor(float16)"), ("float32", "tensor(float)")])
def test_float_modes_have_no_scales(mode, dtype):
    pool = KVPool(SHAPE, num_blocks=4, mode=mode)
    assert set(pool.values) == {"kv.0", "kv.1", "kv.2"}
    assert pool.values["kv.2"].data_type() == dtype and pool.values["kv.2"].shape() == [5, 4, 4, 8]
    assert set(pool.read_slots(np.array([0, 15]))) == {"k", "v"}


def test_bad_requests_are_refused():
    pool = KVPool(SHAPE, num_blocks=2)
    with pytest.raises(IndexError):
        pool.read_slots(np.array([0, 9]))           # 2 blocks * 4 + the scratch slot 8
    with pytest.raises(IndexError):
        pool.read_slots(np.array([[0]]))
    with pytest.raises(ValueError):
        KVPool(SHAPE, num_blocks=2, mode="int4")
    with pytest.raises(ValueError):
        KVPool(SHAPE, num_blocks=0)


def test_sizing_counts_the_scratch_block():
    for mode in ("int8", "float16", "float32"):
        pool = KVPool(SHAPE, num_blocks=7, mode=mode)
        assert pool.bytes_per_token() * (pool.num_slots + SHAPE.block_size) == pool.nbytes()
    # int8: 2 (k, v) * L * KVH * (D bytes + 4 scale bytes) = 2 * 3 * 2 * 12
    assert SHAPE.bytes_per_token("int8") == 144
    assert SHAPE.bytes_per_token("float16") == 2 * 3 * 2 * 16
    per_block = 144 * 4
    assert blocks_for_budget(SHAPE, 11 * per_block + per_block - 1) == 10   # + 1 scratch block
    assert blocks_for_budget(SHAPE, 100 * per_block, max_blocks=11) == 11
    pool = KVPool.from_budget(SHAPE, 6 * per_block)
    assert pool.num_blocks == 5 and pool.nbytes() <= 6 * per_block
    with pytest.raises(ValueError):
        blocks_for_budget(SHAPE, 2 * per_block - 1)
    layout = mf.KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype="int8",
                         scale_dtype="float32", scale_granularity="per-token-per-head",
                         pool_layout=mf.POOL_LAYOUT)
    assert KVShape.from_layout(layout) == SHAPE
