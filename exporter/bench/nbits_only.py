"""The decode step's weight GEMVs alone: every MatMulNBits node of a quantised decoder graph, each
fed a random [1, K] row, in one graph of their own; the median (and 10th percentile) of 200 runs
at 1 and 2 threads is what the step spends in the quantised weights, to set against the whole step.

    python -m exporter.bench.nbits_only PATH/decoder.onnx [...]
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from exporter.quantize import NBITS_OP


def nbits_graph(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[int]]:
    inits = {t.name: t for t in model.graph.initializer}
    nodes, used, outs, ks = [], set(), [], set()
    for n in model.graph.node:
        if n.op_type != NBITS_OP:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        ks.add(attrs["K"])
        out = f"y{len(nodes)}"
        nodes.append(helper.make_node(NBITS_OP, [f"x{attrs['K']}", *n.input[1:]], [out],
                                      domain="com.microsoft", **attrs))
        used |= {i for i in n.input[1:] if i in inits}
        outs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
    if not nodes:
        raise SystemExit("no MatMulNBits node in this graph")
    g = helper.make_graph(nodes, "nbits_only",
                          [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in sorted(ks)],
                          outs, [inits[u] for u in sorted(used)])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = model.ir_version
    return m, ks


def main(paths: list[str]) -> None:
    for path in paths:
        m, ks = nbits_graph(onnx.load(path))
        rng = np.random.default_rng(0)
        feed = {f"x{k}": rng.standard_normal((1, k), dtype=np.float32) for k in ks}
        for threads in (1, 2):
            so = ort.SessionOptions()
            so.intra_op_num_threads = threads
            sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            for _ in range(20):
                sess.run(None, feed)
            ms = []
            for _ in range(200):
                t = time.perf_counter()
                sess.run(None, feed)
                ms.append(1e3 * (time.perf_counter() - t))
            print(f"{path}: {len(m.graph.node)} {NBITS_OP}, {threads} thread(s): median "
                  f"{statistics.median(ms):.3f} ms, p10 {np.percentile(ms, 10):.3f} ms")


if __name__ == "__main__":
    main(sys.argv[1:])
