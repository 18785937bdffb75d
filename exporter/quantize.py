"""Weight-only quantisation of exported graphs: INT8 / INT4 block-wise MatMulNBits.

A post-export step on the ONNX file (the exporter traces fp graphs, then this rewrites them):
every MatMul whose weight is a constant initializer [K, N] becomes `com.microsoft::MatMulNBits`
through ONNX Runtime's own quantiser (`onnxruntime.quantization.matmul_nbits_quantizer`, round to
nearest, one scale per `block_size` weights along K, zero points unless symmetric). MLAS runs it
on the CPU (with int8 activations at accuracy_level 4), the CUDA provider has its own kernel.

What it touches, and what it must not:
- the decoder's linear layers (q/k/v/o, gate/up/down); attention MatMuls have no constant
  weight and are left alone by the quantiser;
- the LM head (the MatMul with N == vocab) at its own precision (`lm_head_bits`: 0 keeps it in
  the profile dtype), since its error reaches the logits undamped;
- never the KV pool writes: the in-place ScatterND contract (`check_in_place_writes`) is checked
  again on the rewritten graph, and the graph's inputs and outputs must be unchanged;
- embeddings live outside the graph (embed_tokens.npy) and stay in the profile dtype.
Weights above EXTERNAL_DATA_BYTES go to <file>.data beside the graph, as for the fp export.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import onnx

BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
NBITS_OP = "MatMulNBits"


class QuantizeError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    """The profile's `weights:` section."""
    bits: int                    # 8 or 4, the decoder's linear layers
    block_size: int = 32         # weights per scale, along the input (K) axis
    symmetric: bool = False      # False: a zero point per block too
    accuracy_level: int = 4      # MatMulNBits compute type: 0 fp32 (unset), 1 fp32, 2 fp16, 3 bf16, 4 int8
    lm_head_bits: int = 8        # 0: keep the LM head in the profile dtype
    vision: bool = False         # also quantise the vision partitions' linear layers

    def __post_init__(self):
        if self.bits not in BITS or self.lm_head_bits not in (0, *BITS):
            raise QuantizeError(f"weights: bits must be one of {BITS} and lm_head_bits one of "
                                f"{(0, *BITS)}, got {self.bits} and {self.lm_head_bits}")
        if self.block_size not in BLOCK_SIZES:
            raise QuantizeError(f"weights: block_size must be one of {BLOCK_SIZES}, got {self.block_size}")
        if self.accuracy_level not in range(5):
            raise QuantizeError(f"weights: accuracy_level must be 0..4, got {self.accuracy_level}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "WeightQuant":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise QuantizeError(f"weights: unknown keys {sorted(unknown)} (known: {sorted(known)})")
        if "bits" not in raw:
            raise QuantizeError("weights: the key 'bits' (8 or 4) is required")
        return cls(bits=int(raw["bits"]), block_size=int(raw.get("block_size", 32)),
                   symmetric=bool(raw.get("symmetric", False)),
                   accuracy_level=int(raw.get("accuracy_level", 4)),
                   lm_head_bits=int(raw.get("lm_head_bits", 8)), vision=bool(raw.get("vision", False)))

    def describe(self) -> str:
        head = "fp" if self.lm_head_bits == 0 else f"INT{self.lm_head_bits}"
        return (f"INT{self.bits} weights, block {self.block_size}, "
                f"{'symmetric' if self.symmetric else 'zero points'}, accuracy level "
                f"{self.accuracy_level}, LM head {head}" + (", vision too" if self.vision else ""))


@dataclasses.dataclass(frozen=True)
class QuantizeReport:
    file: str
    quantized: int               # MatMul nodes rewritten as MatMulNBits
    kept: int                    # MatMul nodes with a constant weight left in fp
    bytes_before: int
    bytes_after: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _weighted_matmuls(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.TensorProto]]:
    inits = {t.name: t for t in model.graph.initializer}
    return [(n, inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def lm_head_nodes(model: onnx.ModelProto, vocab_size: int | None) -> list[str]:
    """The LM head: the weighted MatMul nearest upstream of the `logits` output whose weight is
    [hidden, vocab] (walking back from the output, so a q/o projection that happens to be
    vocab wide, as when hidden == vocab, is never taken for it)."""
    from runtime.manifest import LOGITS

    if vocab_size is None:
        return []
    weighted = {n.name: w for n, w in _weighted_matmuls(model)}
    producers = {out: n for n in model.graph.node for out in n.output}
    frontier, seen = [LOGITS], set()
    while frontier:
        node = producers.get(frontier.pop(0))
        if node is None or node.name in seen:
            continue
        seen.add(node.name)
        if node.name in weighted:
            return [node.name] if weighted[node.name].dims[1] == vocab_size else []
        frontier += list(node.input)
    return []


def gemm_to_matmul(model: onnx.ModelProto) -> int:
    """Rewrite each Gemm(A, W, bias) with a constant W (alpha = beta = 1, no transA) as
    MatMul(A, W as [K, N]) + Add(bias), so the quantiser sees it: the vision partitions'
    linear layers come out of the exporter as Gemm. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    nodes, done = [], 0
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (n.op_type != "Gemm" or n.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = w.T.copy() if attrs.get("transB", 0) else w
        name = f"{n.input[1]}.KN"
        model.graph.initializer.append(numpy_helper.from_array(w, name))
        has_bias = len(n.input) > 2 and n.input[2]
        mm_out = f"{n.output[0]}.matmul" if has_bias else n.output[0]
        nodes.append(helper.make_node("MatMul", [n.input[0], name], [mm_out], name=f"{n.name}.matmul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [mm_out, n.input[2]], [n.output[0]], name=f"{n.name}.bias"))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return done


def _run_quantizer(model: onnx.ModelProto, bits: int, spec: WeightQuant,
                   exclude: list[str]) -> onnx.ModelProto:
    """Every MatMul with a constant 2-D weight, except the nodes named in `exclude`."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    cfg = DefaultWeightOnlyQuantConfig(block_size=spec.block_size, is_symmetric=spec.symmetric,
                                       accuracy_level=spec.accuracy_level or None,
                                       quant_format=QuantFormat.QOperator,
                                       op_types_to_quantize=("MatMul",), bits=bits)
    q = MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=cfg)
    level = logging.getLogger("onnxruntime.quantization").level
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    try:
        q.process()
    finally:
        logging.getLogger("onnxruntime.quantization").setLevel(level)
    return q.model.model


def _io(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    return [i.name for i in model.graph.input], [o.name for o in model.graph.output]


def _initializer_bytes(model: onnx.ModelProto) -> int:
    from onnx import numpy_helper
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


def quantize_model(model: onnx.ModelProto, spec: WeightQuant, vocab_size: int | None = None,
                   check_pool_writes: bool = True) -> tuple[onnx.ModelProto, int, int]:
    """(rewritten model, MatMuls quantised, MatMuls kept) for an in-memory graph whose external
    data is loaded. The LM head (N == vocab_size) gets `lm_head_bits`, the rest `bits`."""
    from exporter.decoder import ONNX_IR_VERSION, check_in_place_writes   # torch: lazily

    io_before = _io(model)
    gemm_to_matmul(model)
    head = lm_head_nodes(model, vocab_size)
    total = len(_weighted_matmuls(model))
    model = _run_quantizer(model, spec.bits, spec, exclude=head)
    if spec.lm_head_bits and head:         # what is left with a constant weight: the head alone
        rest = [n.name for n, _ in _weighted_matmuls(model) if n.name not in head]
        model = _run_quantizer(model, spec.lm_head_bits, spec, exclude=rest)
    model.ir_version = ONNX_IR_VERSION
    if _io(model) != io_before:
        raise QuantizeError("quantisation changed the graph's inputs or outputs")
    if check_pool_writes:
        check_in_place_writes(model)
    done = sum(1 for n in model.graph.node if n.op_type == NBITS_OP)
    return model, done, total - done


def quantize_file(path: Path, spec: WeightQuant, vocab_size: int | None = None,
                  check_pool_writes: bool = True) -> QuantizeReport:
    """Rewrite the graph at `path` in place (and its <file>.data: dropped, or rewritten when the
    quantised weights still exceed EXTERNAL_DATA_BYTES)."""
    from exporter.decoder import EXTERNAL_DATA_BYTES

    path = Path(path)
    data = path.with_name(path.name + ".data")
    model = onnx.load(str(path), load_external_data=True)
    before = _initializer_bytes(model)
    model, done, kept = quantize_model(model, spec, vocab_size, check_pool_writes)
    if done == 0:
        raise QuantizeError(f"{path.name}: no MatMul with a constant weight to quantise")
    after = _initializer_bytes(model)
    data.unlink(missing_ok=True)
    if after > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
    else:
        onnx.save(model, str(path))
    return QuantizeReport(file=path.name, quantized=done, kept=kept, bytes_before=before,
                          bytes_after=after)


def quantize_partitions(spec: WeightQuant | None, engine_dir: Path, partitions: dict[str, Any],
                        vocab_size: int, log=print) -> dict[str, Any]:
    """The build's step: quantise each decoder partition's file (and the vision partitions' when
    `spec.vision`) in place. Returns what goes into the manifest's profile ({} when spec is None)."""
    if spec is None:
        return {}
    reports = {}
    for key, part in partitions.items():
        if key.startswith("decoder") or (spec.vision and key.startswith("vision")):
            r = quantize_file(Path(engine_dir) / part.file, spec, vocab_size if key.startswith("decoder") else None,
                              check_pool_writes=key.startswith("decoder"))
            log(f"  quantised {key}: {r.quantized} MatMul -> {NBITS_OP} ({r.kept} kept), weights "
                f"{r.bytes_before / 2**20:.1f} -> {r.bytes_after / 2**20:.1f} MiB")
            reports[key] = r.to_dict()
    return {"spec": dataclasses.asdict(spec), "description": spec.describe(), "partitions": reports}
