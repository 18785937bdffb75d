"""Tiny ONNX graphs that act on device-resident pool tensors (no torch, no cupy needed).

ONNX Runtime allocates an OrtValue on a device but gives Python no kernel to touch it; these
one-node graphs do: `fill_zero` writes zeros into a bound output on its own device (no host
buffer of the pool's size is ever made), `copy_blocks` copies whole blocks to other blocks of the
same value in place (copy-on-write when n answers fork from one prompt), and `gather_slots` copies
a few slots back to the host (the debug accessor the tests and `make gpu-check` read the pool
through).
"""
from __future__ import annotations

import functools

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

_ONNX_TYPES = {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.float32): TensorProto.FLOAT,
               np.dtype(np.float16): TensorProto.FLOAT16}


def providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def _session(graph, device: str) -> ort.InferenceSession:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=providers(device))


@functools.lru_cache(maxsize=None)
def _zero_session(dtype: np.dtype, device: str) -> ort.InferenceSession:
    zero = numpy_helper.from_array(np.zeros(1, dtype), "value")
    node = helper.make_node("ConstantOfShape", ["shape"], ["out"], value=zero)
    graph = helper.make_graph([node], "fill_zero",
                              [helper.make_tensor_value_info("shape", TensorProto.INT64, [None])],
                              [helper.make_tensor_value_info("out", _ONNX_TYPES[dtype], None)])
    return _session(graph, device)


@functools.lru_cache(maxsize=None)
def _gather_session(dtype: np.dtype, device: str) -> ort.InferenceSession:
    node = helper.make_node("GatherND", ["pool", "index"], ["out"])
    graph = helper.make_graph([node], "gather_slots",
                              [helper.make_tensor_value_info("pool", _ONNX_TYPES[dtype], None),
                               helper.make_tensor_value_info("index", TensorProto.INT64, [None, 2])],
                              [helper.make_tensor_value_info("out", _ONNX_TYPES[dtype], None)])
    return _session(graph, device)


@functools.lru_cache(maxsize=None)
def _copy_session(dtype: np.dtype, device: str) -> ort.InferenceSession:
    # out = ScatterND(pool, dst[:, None], Gather(pool, src)); `out` is bound to the pool value
    # itself, so ScatterND (which skips its input copy when input and output share a buffer, as
    # the decoder's in-place KV writes rely on) writes just the destination blocks.
    t = _ONNX_TYPES[dtype]
    nodes = [helper.make_node("Gather", ["pool", "src"], ["rows"], axis=0),
             helper.make_node("Unsqueeze", ["dst", "axis"], ["dst_index"]),
             helper.make_node("ScatterND", ["pool", "dst_index", "rows"], ["out"])]
    graph = helper.make_graph(
        nodes, "copy_blocks",
        [helper.make_tensor_value_info("pool", t, None),
         helper.make_tensor_value_info("src", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("dst", TensorProto.INT64, [None])],
        [helper.make_tensor_value_info("out", t, None)],
        initializer=[numpy_helper.from_array(np.asarray([1], np.int64), "axis")])
    return _session(graph, device)


def copy_blocks(value: ort.OrtValue, device: str, src: np.ndarray, dst: np.ndarray) -> None:
    """value[dst[i]] = value[src[i]] along axis 0, in place on the value's device. The
    destinations must be distinct and none of them a source."""
    src, dst = np.asarray(src, np.int64), np.asarray(dst, np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError("src and dst must be 1-D arrays of the same length")
    if len(set(dst.tolist())) != len(dst) or set(dst.tolist()) & set(src.tolist()):
        raise ValueError("copy destinations must be distinct and not sources")
    if not len(src):
        return
    sess = _copy_session(_np_dtype(value), device)
    io = sess.io_binding()
    io.bind_ortvalue_input("pool", value)
    io.bind_cpu_input("src", src)
    io.bind_cpu_input("dst", dst)
    io.bind_ortvalue_output("out", value)
    sess.run_with_iobinding(io)


def fill_zero(value: ort.OrtValue, device: str) -> None:
    """Zero an OrtValue where it lives, in place."""
    sess = _zero_session(_np_dtype(value), device)
    io = sess.io_binding()
    io.bind_cpu_input("shape", np.asarray(value.shape(), np.int64))
    io.bind_ortvalue_output("out", value)
    sess.run_with_iobinding(io)


def gather_slots(value: ort.OrtValue, device: str, blocks: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Host copy of value[blocks[i], offsets[i]] for each i: [n, *value.shape[2:]]."""
    sess = _gather_session(_np_dtype(value), device)
    io = sess.io_binding()
    io.bind_ortvalue_input("pool", value)
    io.bind_cpu_input("index", np.stack([blocks, offsets], axis=-1).astype(np.int64))
    io.bind_output("out", "cpu")
    sess.run_with_iobinding(io)
    return io.get_outputs()[0].numpy()


_ELEMENT_TYPES = {"tensor(int8)": np.int8, "tensor(float)": np.float32, "tensor(float16)": np.float16}


def _np_dtype(value: ort.OrtValue) -> np.dtype:
    return np.dtype(_ELEMENT_TYPES[value.data_type()])
