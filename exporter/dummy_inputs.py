"""Dummy inputs for each partition, in optimum's exporter conventions.

optimum has no Qwen3-VL export config (and optimum-onnx pins transformers < 4.58), so the graphs
are exported by our own modules; what optimum does give us is its vocabulary for describing a
model to an exporter: a NormalizedConfig reads the text config's sizes under stable names, and
DummyInputGenerator subclasses produce inputs for any input name a partition declares. The build
uses them for a shape check of every exported graph at sizes other than the ones it was traced
with (batch 3, odd lengths, more blocks), so a dimension accidentally baked in fails the build.
"""
from __future__ import annotations

import numpy as np
from optimum.utils.input_generators import DummyInputGenerator
from optimum.utils.normalized_config import NormalizedConfig, NormalizedTextConfigWithGQA

from runtime import manifest as mf


class NormalizedQwen3VLTextConfig(NormalizedTextConfigWithGQA):
    HEAD_DIM = "head_dim"


class NormalizedQwen3VLVisionConfig(NormalizedConfig):
    HIDDEN_SIZE = "hidden_size"
    NUM_ATTENTION_HEADS = "num_heads"
    OUT_HIDDEN_SIZE = "out_hidden_size"
    PATCH_SIZE = "patch_size"
    TEMPORAL_PATCH_SIZE = "temporal_patch_size"
    SPATIAL_MERGE_SIZE = "spatial_merge_size"
    NUM_POSITION_EMBEDDINGS = "num_position_embeddings"


def _np_float(dtype: str):
    return np.float16 if dtype in ("fp16", "float16") else np.float32


class PagedDecoderDummyInputGenerator(DummyInputGenerator):
    """Inputs of decoder.onnx: B sequences of S new tokens over a pool of NB blocks."""
    SUPPORTED_INPUT_NAMES = (mf.INPUTS_EMBEDS, mf.POSITION_IDS, mf.DEEPSTACK_EMBEDS, mf.PAST_LENS,
                             mf.BLOCK_TABLES, mf.SLOT_MAPPING, mf.LOGIT_POSITIONS, mf.KV, mf.KV_SCALE)

    def __init__(self, text: NormalizedQwen3VLTextConfig, num_deepstack: int, kv_mode: str,
                 batch_size: int = 3, sequence_length: int = 5, num_blocks: int = 7, block_size: int = 4,
                 blocks_per_seq: int = 2, num_logits: int = 2):
        self.t, self.nds, self.kv_mode = text, num_deepstack, kv_mode
        self.b, self.s, self.nb, self.bs = batch_size, sequence_length, num_blocks, block_size
        self.m, self.k = blocks_per_seq, num_logits
        self.rng = np.random.default_rng(0)

    def supports_input(self, input_name: str) -> bool:
        return input_name in self.SUPPORTED_INPUT_NAMES or bool(mf.pool_kind(input_name))

    def generate(self, input_name: str, framework: str = "np", int_dtype: str = "int64",
                 float_dtype: str = "fp32"):
        t, f = self.t, _np_float(float_dtype)
        pool = (self.nb, self.bs, 2 * t.num_key_value_heads, t.head_dim)     # one layer's tensor
        rnd = lambda shape, dt: self.rng.standard_normal(shape).astype(dt)  # noqa: E731
        kind = mf.pool_kind(input_name)
        if input_name == mf.INPUTS_EMBEDS:
            return rnd((self.b, self.s, t.hidden_size), f)
        if input_name == mf.POSITION_IDS:
            return np.broadcast_to(np.arange(self.s, dtype=np.int64), (3, self.b, self.s)).copy()
        if input_name == mf.DEEPSTACK_EMBEDS:
            return np.zeros((self.nds, self.b, self.s, t.hidden_size), f)
        if input_name == mf.PAST_LENS:
            return self.rng.integers(0, self.m * self.bs, self.b).astype(np.int64)
        if input_name == mf.BLOCK_TABLES:
            return self.rng.integers(0, self.nb, (self.b, self.m)).astype(np.int64)
        if input_name == mf.SLOT_MAPPING:     # distinct slots: no two new tokens write one slot
            return self.rng.permutation(self.nb * self.bs)[:self.b * self.s].reshape(self.b, self.s)
        if input_name == mf.LOGIT_POSITIONS:
            return self.rng.integers(0, self.s, (self.b, self.k)).astype(np.int64)
        if kind == mf.KV:
            if self.kv_mode == "int8":
                return self.rng.integers(-127, 128, pool).astype(np.int8)
            return rnd(pool, f)
        if kind == mf.KV_SCALE:
            return np.abs(rnd(pool[:3] + (1,), np.float32)) * 0.01
        raise ValueError(f"no dummy input for {input_name}")

    def expected_outputs(self, input_names) -> dict[str, tuple[int, ...]]:
        """Output shapes: logits, and every pool tensor updated at its own shape."""
        t = self.t
        out = {mf.LOGITS: (self.b, self.k, t.vocab_size)}
        for name in input_names:
            if mf.pool_kind(name):
                out[name + mf.UPDATED] = self.generate(name).shape
        return out


def check_decoder_shapes(session, text_config, num_deepstack: int, kv_mode: str, dtype: str) -> list[str]:
    """Run the decoder graph on dummy inputs of untraced sizes; problems with the output shapes."""
    gen = PagedDecoderDummyInputGenerator(NormalizedQwen3VLTextConfig(text_config), num_deepstack, kv_mode)
    float_dtype = "fp16" if dtype == "float16" else "fp32"
    feeds = {i.name: gen.generate(i.name, float_dtype=float_dtype) for i in session.get_inputs()}
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    problems = [f"{name}: shape {outs[name].shape}, expected {shape}"
                for name, shape in gen.expected_outputs(feeds).items() if outs[name].shape != shape]
    problems += [f"{name}: not finite" for name, v in outs.items()
                 if v.dtype.kind == "f" and not np.isfinite(v).all()]
    return problems
