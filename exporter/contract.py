"""The graph I/O each partition must have, derived from the config alone.

Used twice: by the planning path (a manifest for a checkpoint whose weights are never loaded, e.g.
the full-size reference config) and by the build, which checks that every exported graph has
exactly the outputs and a subset of the inputs the runtime's contract names.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from runtime import manifest as mf

T = mf.TensorSpec


def vision_specs(vision: dict[str, Any], text_hidden: int, cut: int, dtype: str
                 ) -> dict[str, tuple[list[T], list[T]]]:
    p, tp, c = vision["patch_size"], vision["temporal_patch_size"], vision.get("in_channels", 3)
    hv, dv = vision["hidden_size"], vision["hidden_size"] // vision["num_heads"]
    out_h = vision.get("out_hidden_size", text_hidden)
    taps = [i for i in vision["deepstack_visual_indexes"] if i < cut]
    nds = len(vision["deepstack_visual_indexes"])
    grid_inputs = [T(mf.ROT_COS, "float32", ["N", dv]), T(mf.ROT_SIN, "float32", ["N", dv]),
                   T(mf.SEGMENT_IDS, "int64", ["N"])]
    cpu_in = [T(mf.PIXEL_VALUES, dtype, ["N", c * tp * p * p]), T(mf.POS_IDX, "int64", [4, "N"]),
              T(mf.POS_WEIGHT, "float32", [4, "N"])] + grid_inputs
    cpu_out = [T(mf.HIDDEN, dtype, ["N", hv])] + [T(mf.tap_name(i), dtype, ["N", hv]) for i in taps]
    gpu_in = [T(mf.HIDDEN, dtype, ["N", hv])] + grid_inputs + [T(mf.tap_name(i), dtype, ["N", hv]) for i in taps]
    gpu_out = [T(mf.IMAGE_EMBEDS, dtype, ["N/4", out_h]), T(mf.DEEPSTACK_EMBEDS, dtype, [nds, "N/4", out_h])]
    return {"vision_cpu": (cpu_in, cpu_out), "vision_gpu": (gpu_in, gpu_out)}


def decoder_specs(text: dict[str, Any], nds: int, kv_mode: str, dtype: str) -> tuple[list[T], list[T]]:
    h, v = text["hidden_size"], text["vocab_size"]
    L, kvh, d = text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"]
    kv_dtype = "int8" if kv_mode == "int8" else dtype
    ins = [T(mf.INPUTS_EMBEDS, dtype, ["B", "S", h]), T(mf.POSITION_IDS, "int64", [3, "B", "S"]),
           T(mf.DEEPSTACK_EMBEDS, dtype, [nds, "B", "S", h]), T(mf.PAST_LENS, "int64", ["B"]),
           T(mf.BLOCK_TABLES, "int64", ["B", "M"]), T(mf.SLOT_MAPPING, "int64", ["B", "S"]),
           T(mf.LOGIT_POSITIONS, "int64", ["B", "K"])]
    pool = []
    for layer in range(L):
        for name in mf.pool_names(layer, kv_mode == "int8"):
            pool.append(T(name, "float32", ["NB", "BS", 2 * kvh, 1]) if mf.is_scale(name)
                        else T(name, kv_dtype, ["NB", "BS", 2 * kvh, d]))
    outs = [T(mf.LOGITS, "float32", ["B", "K", v])] + [dataclasses.replace(t, name=t.name + mf.UPDATED) for t in pool]
    return ins + pool, outs


def expected_partitions(config: dict[str, Any], cut: int, dtype: str, kv_modes, kv_dtype: str,
                        device: str = "cuda") -> dict[str, mf.Partition]:
    """The partitions' I/O; `device` is where the profile places vision_gpu and the decoder."""
    text, vision = config["text_config"], config["vision_config"]
    cut = min(cut, vision["depth"])
    parts = {name: mf.Partition(file=f"{name}.onnx", device="cpu" if name == "vision_cpu" else device,
                                inputs=i, outputs=o)
             for name, (i, o) in vision_specs(vision, text["hidden_size"], cut, dtype).items()}
    for mode in kv_modes:
        key = "decoder" if mode == kv_dtype else f"decoder_{mode}"
        i, o = decoder_specs(text, len(vision["deepstack_visual_indexes"]), mode, dtype)
        parts[key] = mf.Partition(file=f"{key}.onnx", device=device, inputs=i, outputs=o)
    return parts


def check_exported(expected: mf.Partition, exported: mf.Partition, name: str) -> list[str]:
    """Problems with an exported graph's I/O against the contract (empty when it conforms)."""
    problems = []
    want_in, got_in = {t.name for t in expected.inputs}, {t.name for t in exported.inputs}
    want_out, got_out = [t.name for t in expected.outputs], [t.name for t in exported.outputs]
    if not got_in <= want_in:
        problems.append(f"{name}: unexpected inputs {sorted(got_in - want_in)}")
    if sorted(got_out) != sorted(want_out):
        problems.append(f"{name}: outputs {got_out}, the contract names {want_out}")
    return problems
