"""Export the Qwen3-VL text decoder as one ONNX graph over a paged KV pool (INT8 or float).

Contract (`runtime/manifest.py`): one step for B sequences of S new tokens each, right-padded.
  in : inputs_embeds f[B,S,H], position_ids i64[3,B,S], deepstack_embeds f[NDS,B,S,H],
       past_lens i64[B], block_tables i64[B,M], slot_mapping i64[B,S], logit_positions i64[B,K],
       per layer l: kv.l [NB,BS,2*KVH,D] (int8 | float; keys in heads 0..KVH-1, values in
                    KVH..2*KVH-1), kv_scale.l f32[NB,BS,2*KVH,1] (int8 only)
  out: logits f32[B,K,V], and per layer the same pool tensors updated: kv.l.out, ... (the runner
       binds ONE device OrtValue as both kv.l and kv.l.out, so the update is in place)

In the graph, per step:
- each layer first writes its new tokens' K/V (keys after QK-norm and RoPE, as the cache stores
  them; with an INT8 pool quantized, and their scales), keys and values joined as the pool holds
  them, into its pool tensors at slot_mapping with one ScatterND each (slot -> (slot // BS,
  slot % BS)); ONNX Runtime's ScatterND kernels (CPU and CUDA) skip their input-to-output copy
  when the two buffers are one, so the write costs the new tokens only;
- then it gathers, from the pool just written, only its own M*BS table slots (cost and transient
  grow with B*M, never with NB): keys and values in one GatherND, moved as they are stored and
  split into keys and values only then; an INT8 pool's scales are applied to the scores (keys)
  and to the probabilities (values) of a float32 graph, to K and V themselves (q * scale, in
  float32) in a float16 one; the past and the new tokens together, with no concatenation. New
  token i of row b (at position past_lens[b] + i, the slot its table names, which is where the
  runtime writes it) sees table slots j <= past_lens[b] + i; everything else is masked with a
  large finite negative, so garbage (padded) rows never become NaN; padding rows write to a
  scratch slot no sequence reads unmasked. New tokens therefore see each other exactly as later
  steps will read them (INT8: quantized), so an answer does not depend on chunk boundaries or on
  whether a prefix came from the cache;
- GQA without repeating K/V: a KV head's G query heads and S new tokens are G*S rows of one 4-D
  MatMul batch over [B,KVH] (no broadcast over a group axis); softmax in float32, as in HF;
- DeepStack: after layer i < NDS the dense deepstack_embeds[i] is added (zeros at text positions);
- the final norm and LM head run only at logit_positions;
- lean for a small model, where a step costs its node count: what every layer shares (the RoPE
  tables, the mask, the scatter index) is made once per step; q, k, v are one MatMul; RoPE is
  ONNX Runtime's RotaryEmbedding, one node for q and one for k (`rope.rotary_embedding`, exported
  through a custom translation); K and V are quantised, stored and read together (one pool
  tensor a layer), so the past and the new keys and values are one scatter and one gather; after
  export the RMSNorms become ONNX Runtime's SimplifiedLayerNormalization /
  SkipSimplifiedLayerNormalization (`fuse_norms`).
New K/V are quantized per token per head: scale = max|x| / 127 (>= 1e-8),
q = round_half_even(x / scale), within [-127, 127] (`quantize_kv`, mirrored by `quantize_kv_numpy`).

Why reading and writing one buffer in one run is safe: each layer's gather reads the output of
its scatter (a data dependency, so ONNX Runtime runs the write first). The only slots the
scatter changes are this step's new-token slots (and the scratch slot). A new-token slot
belongs to its own sequence alone (shared prefix blocks are full and never written), so no other
sequence's table reaches it; the scratch slot is never inside any sequence's unmasked range.

Exporter path: `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript) with dynamic
B, S, M, K, NB and BS; the key length M*BS+S is internal, never a declared input dim. The file is
stamped IR version 13 (the newest onnxruntime 1.31 loads).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from exporter.rope import InterleavedMRope, _onnx_translations, rope_tables, rotary_embedding
from runtime import manifest as mf
from runtime.manifest import (BLOCK_TABLES, DEEPSTACK_EMBEDS, INPUTS_EMBEDS, LOGIT_POSITIONS, LOGITS,
                              PAST_LENS, POSITION_IDS, SLOT_MAPPING, Partition, TensorSpec)

ONNX_IR_VERSION = 13              # onnxruntime 1.31 loads IR <= 13; onnx 1.23 writes 14
EXTERNAL_DATA_BYTES = 1 << 30     # weights above this go to <file>.data beside the graph
MASK_VALUE = torch.finfo(torch.float32).min * 0.5   # added in float32, before softmax
KV_QMAX = 127.0
KV_SCALE_MIN = 1e-8
# heads this wide read their keys as [T, D] rows (see DecoderLayer.forward); every Qwen3-VL
# checkpoint has head_dim 128
KEYS_AS_ROWS_MIN_HEAD_DIM = 128
DTYPES = {"float32": torch.float32, "float16": torch.float16}
KV_MODES = ("int8", "float")
# Example sizes for tracing: all distinct and > 1, so no dynamic dim is specialised.
EXAMPLE = dict(B=2, S=7, M=3, K=5, NB=11, BS=6)


class DecoderExportError(ValueError):
    """A decoder export request that cannot be honoured (bad mode, dtype or model)."""


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (int8 [..., D], f32 scale [..., 1]): symmetric, one scale per leading index
    (what the graph writes to the pool; the scale keeps its axis so that it broadcasts over D,
    as the pool stores it). No clip after
    the rounding: |x| / scale <= 127 * (1 + 2**-23) for scale = fl(max|x| / 127) (and < 127 when
    the 1e-8 floor applies), which rounds to at most 127, so the clip could never change a value
    and would cost the graph one node a layer."""
    x32 = x.float()
    scale = torch.clamp(x32.abs().amax(dim=-1, keepdim=True) / KV_QMAX, min=KV_SCALE_MIN)
    return torch.round(x32 / scale).to(torch.int8), scale


def quantize_kv_numpy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference of `quantize_kv` in numpy (float32 arithmetic, round half to even)."""
    x32 = np.asarray(x, dtype=np.float32)
    scale = np.maximum(np.abs(x32).max(axis=-1, keepdims=True) / np.float32(KV_QMAX),
                       np.float32(KV_SCALE_MIN))
    q = np.clip(np.round(x32 / scale), -KV_QMAX, KV_QMAX).astype(np.int8)
    return q, scale.astype(np.float32)


def text_parts(hf_model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(Qwen3VLTextModel, lm_head) of a Qwen3VLForConditionalGeneration."""
    text = getattr(getattr(hf_model, "model", None), "language_model", None)
    head = getattr(hf_model, "lm_head", None)
    if text is None or head is None or not hasattr(text, "layers"):
        raise DecoderExportError(f"{type(hf_model).__name__} is not a Qwen3-VL model with an LM head")
    return text, head


class DecoderLayer(nn.Module):
    """One HF `Qwen3VLTextDecoderLayer` (same weights) over [past ; new] keys.

    Lean for the graph: q, k and v come from one MatMul (their weights concatenated once here),
    RoPE is one RotaryEmbedding node each for q and k, the new keys and values are joined once
    (and with an INT8 pool quantised together) and stay joined in the pool; the norms stay HF's
    modules (the exporter fuses them into ONNX Runtime's
    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization afterwards)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        attn = layer.self_attn
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.mlp = layer.mlp
        self.o_proj = attn.o_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.split = [p.out_features // self.head_dim for p in projections]     # heads: N, KVH, KVH
        self.qkv_weight = nn.Parameter(torch.cat([p.weight.detach() for p in projections]),
                                       requires_grad=False)
        biases = [p.bias for p in projections]
        self.qkv_bias = None if all(b is None for b in biases) else nn.Parameter(torch.cat(
            [torch.zeros(p.out_features, dtype=p.weight.dtype) if b is None else b.detach()
             for p, b in zip(projections, biases)]), requires_grad=False)
        self.int8_kv = False          # attend to the new tokens' keys/values as the pool stores them

    def forward(self, x, rope, pool, tables, blk, off, bias):
        """x [B,S,H]; rope: (position_ids, cos, sin) for `rotary_embedding`; pool: this layer's pool
        tensors (kv [NB,BS,2*KVH,D], and with an INT8 pool kv_scale [NB,BS,2*KVH,1]); tables
        [B,M]; (blk, off) [B,S]: each new token's pool block and offset;
        bias f32[B,1,G*S,M*BS] (query row g*S + i: token i). Returns (x, the pool tensors with the new tokens written).

        The new tokens' keys (after norm and RoPE) and values are written into the pool first,
        then every key, new ones included, is read back through the block table: new tokens see
        each other exactly as the pool stores them (INT8: quantised), so an answer does not depend
        on chunk boundaries or on whether a prefix came from the cache, and no concatenation of
        past and new is needed."""
        b, s, _ = x.shape
        h = self.input_layernorm(x)
        qkv = F.linear(h, self.qkv_weight, self.qkv_bias).view(b, s, -1, self.head_dim)
        q, k, v = qkv.split(self.split, dim=2)
        n, kvh = self.split[0], self.split[1]
        # RoPE as ONNX Runtime's RotaryEmbedding: q in its [B,N,S,D] layout (the attention's),
        # k in [B,S,KVH*D] (the pool's [B,S,KVH,D] order)
        pos, cos, sin = rope
        q = rotary_embedding(self.q_norm(q).transpose(1, 2), pos, cos, sin)          # [B,N,S,D]
        k = rotary_embedding(self.k_norm(k).reshape(b, s, -1), pos, cos, sin).view(b, s, kvh, self.head_dim)
        kv_new = torch.cat((k, v), dim=2)                           # [B,S,2KVH,D], the pool's heads
        # quantised per token per head, keys and values in one pass; the scales [B,S,2KVH,1]
        news = quantize_kv(kv_new) if self.int8_kv else (kv_new,)
        # in place in ONNX Runtime when the runner binds one buffer as input and output
        updated = [t.index_put((blk, off), new) for t, new in zip(pool, news)]
        t = tables.shape[1] * pool[0].shape[1]                       # T = M*BS key slots
        kv, scales = updated[0][tables], None                       # [B,M,BS,2KVH,D]
        if self.int8_kv and x.dtype == torch.float32:
            # the data moves as int8 (a quarter of the bytes) and is cast once it is split; the
            # per-token scales go to the scores (keys) and the probabilities (values), T numbers
            # a head, instead of to every element of K and V: (q . k_q) s_k = q . (k_q s_k),
            # sum_t (p_t s_v,t) v_q,t = sum_t p_t (s_v,t v_q,t). Not in float16, where q . k_q
            # (|k_q| up to 127) could overflow: there K and V are dequantised first, in float32.
            scales = updated[1][tables].permute(0, 3, 4, 1, 2).reshape(b, 2 * kvh, 1, t)
        elif self.int8_kv:
            kv = (kv.float() * updated[1][tables]).to(x.dtype)      # scales [B,M,BS,2KVH,1]
        # one Transpose and one Reshape for keys and values together, then one Split. Below
        # KEYS_AS_ROWS_MIN_HEAD_DIM straight to the keys' [D,T] layout that q @ k^T wants (the
        # values' transpose back for probs @ v folded into that MatMul by ONNX Runtime:
        # FusedMatMul, transB); from it, whole D-rows move and both transposes are folded into
        # the MatMuls: the int8 element-by-element transpose to [D,T] grows far faster than the
        # row copy (one layer at Qwen3-VL-4B's heads of 128, 1 thread: 110 -> 98 us at 128 keys,
        # 604 -> 539 at 512, 6.35 -> 2.77 ms at 2,048), while at heads of 32 [D,T] stays faster
        # (32 vs 42 us at 512 keys)
        rows_layout = self.head_dim >= KEYS_AS_ROWS_MIN_HEAD_DIM
        if rows_layout:
            kv = kv.permute(0, 3, 1, 2, 4).reshape(b, 2 * kvh, t, self.head_dim)
        else:
            kv = kv.permute(0, 3, 4, 1, 2).reshape(b, 2 * kvh, self.head_dim, t)
        kpart, vpart = (part.to(x.dtype) for part in kv.split(kvh, dim=1))  # [B,KVH,T,D] | [B,KVH,D,T]
        kt = kpart.transpose(-1, -2) if rows_layout else kpart                  # [B,KVH,D,T]
        v = vpart if rows_layout else vpart.transpose(-1, -2)                  # [B,KVH,T,D]
        # a KV head's G query heads and S tokens are one batch of G*S rows (rows g-major, as
        # [B,N,S,D] stores them), so every MatMul is a plain 4-D one over [B,KVH]: no broadcast
        # over a group axis, which ONNX Runtime's CPU FusedMatMul (the scale folded in) runs
        # 2.5-3x slower (17 vs 6.5 us a layer on the bandwidth-bound shapes, 347 vs 109 us at
        # Qwen3-VL-4B's 32/8 heads and 512 keys)
        rows = self.groups * s
        qg = q.reshape(b, kvh, rows, self.head_dim)                               # [B,KVH,G*S,D]
        scores = torch.matmul(qg, kt).float() * self.scaling                      # [B,KVH,G*S,T]
        if scales is not None:
            sk, sv = scales.split(kvh, dim=1)                       # [B,KVH,1,T] each
            scores = scores * sk
        probs = torch.softmax(scores + bias, dim=-1)                # bias [B,1,G*S,T]
        if scales is not None:
            probs = probs * sv
        out = torch.matmul(probs.to(x.dtype), v)                                  # [B,KVH,G*S,D]
        out = out.reshape(b, kvh, self.groups, s, self.head_dim).permute(0, 3, 1, 2, 4).reshape(b, s, -1)
        x = x + self.o_proj(out)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, updated


class PagedDecoder(nn.Module):
    """The text decoder + LM head over a paged KV pool; see the module docstring."""

    def __init__(self, hf_model: nn.Module, kv_mode: str, num_deepstack: int):
        super().__init__()
        text, head = text_parts(hf_model)
        rope = text.config.rope_parameters
        self.rope = InterleavedMRope(text.rotary_emb, rope.get("mrope_section", [24, 20, 20]))
        self.layers = nn.ModuleList(DecoderLayer(layer) for layer in text.layers)
        self.norm, self.lm_head = text.norm, head
        self.int8 = kv_mode == "int8"
        for layer in self.layers:
            layer.int8_kv = self.int8
        self.num_deepstack = num_deepstack

    @property
    def pool_per_layer(self) -> int:
        return len(mf.pool_names(0, self.int8))

    def pool_input_names(self) -> list[str]:
        return [n for i in range(len(self.layers)) for n in mf.pool_names(i, self.int8)]

    def input_names(self) -> list[str]:
        return [INPUTS_EMBEDS, POSITION_IDS, DEEPSTACK_EMBEDS, PAST_LENS, BLOCK_TABLES,
                SLOT_MAPPING, LOGIT_POSITIONS] + self.pool_input_names()

    def output_names(self) -> list[str]:
        return [LOGITS] + [n + mf.UPDATED for n in self.pool_input_names()]

    @staticmethod
    def attention_bias(past_lens, table_slots: int, s: int) -> torch.Tensor:
        """f32[B,S,T]: 0 where the key at table slot j is visible to new token i (j <= past_lens[b]
        + i: the past and the new tokens up to i, which this step has just written there),
        MASK_VALUE elsewhere."""
        last = past_lens[:, None] + torch.arange(s, device=past_lens.device)[None, :]   # [B,S]
        ok = torch.arange(table_slots, device=past_lens.device)[None, None, :] <= last[:, :, None]
        zero = torch.zeros((), dtype=torch.float32)
        return torch.where(ok, zero, torch.full((), MASK_VALUE, dtype=torch.float32))

    def forward(self, inputs_embeds, position_ids, deepstack_embeds, past_lens, block_tables,
                slot_mapping, logit_positions, *pool):
        dtype = inputs_embeds.dtype
        b, s, hidden = inputs_embeds.shape
        m = block_tables.shape[1]
        bs = pool[0].shape[1]
        # shared by every layer, computed once per step
        rope = rope_tables(*self.rope(position_ids, dtype, half=True))   # rows [B,S], [B*S,D/2]
        # [B,1,G*S,M*BS]: the mask of every query row (g, s) of a KV head's batch
        groups = self.layers[0].groups
        bias = self.attention_bias(past_lens, m * bs, s)[:, None, None].expand(
            b, 1, groups, s, m * bs).reshape(b, 1, groups * s, m * bs)
        bs_t = torch.full((), bs, dtype=torch.int64)                    # a tensor: symbolic BS
        blk = torch.div(slot_mapping, bs_t, rounding_mode="floor")     # [B,S]
        off = slot_mapping - blk * bs_t
        x = inputs_embeds
        updated = []
        per = self.pool_per_layer
        for i, layer in enumerate(self.layers):
            x, new_pool = layer(x, rope, pool[per * i:per * (i + 1)], block_tables, blk, off, bias)
            updated += new_pool
            if i < self.num_deepstack:
                x = x + deepstack_embeds[i]
        idx = logit_positions[:, :, None].expand(-1, -1, hidden)
        picked = torch.gather(x, 1, idx)                            # [B,K,H]
        logits = self.lm_head(self.norm(picked)).float()
        return (logits, *updated)


def _example_args(module: PagedDecoder, text_config, num_deepstack: int, dtype: torch.dtype) -> tuple:
    e = EXAMPLE
    h = text_config.hidden_size
    kvh, d = text_config.num_key_value_heads, module.layers[0].head_dim
    pool_shape = (e["NB"], e["BS"], 2 * kvh, d)
    pool = []
    for _ in module.layers:
        if module.int8:
            pool += [torch.randint(-127, 128, pool_shape, dtype=torch.int8),
                     torch.rand(pool_shape[:3] + (1,)) * 0.01]
        else:
            pool.append(torch.randn(pool_shape).to(dtype))
    slots = torch.randperm(e["NB"] * e["BS"])[:e["B"] * e["S"]].reshape(e["B"], e["S"])
    args = [torch.randn(e["B"], e["S"], h).to(dtype),
            torch.arange(e["S"]).expand(3, e["B"], e["S"]).contiguous(),
            torch.zeros(num_deepstack, e["B"], e["S"], h).to(dtype),
            torch.randint(0, e["M"] * e["BS"] + 1, (e["B"],)),
            torch.randint(0, e["NB"], (e["B"], e["M"])),
            slots,
            torch.randint(0, e["S"], (e["B"], e["K"])), *pool]
    return tuple(args)


def _dynamic_shapes(module: PagedDecoder) -> tuple:
    D = torch.export.Dim
    B, S, M, K = D("B", min=1, max=4096), D("S", min=1, max=1 << 20), D("M", min=1, max=1 << 20), D("K", min=1, max=1 << 20)
    NB, BS = D("NB", min=1, max=1 << 24), D("BS", min=1, max=4096)
    pool = {0: NB, 1: BS}
    shapes = [{0: B, 1: S}, {1: B, 2: S}, {1: B, 2: S}, {0: B}, {0: B, 1: M}, {0: B, 1: S}, {0: B, 1: K}]
    return tuple(shapes) + (tuple([pool] * (module.pool_per_layer * len(module.layers))),)   # *pool


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        specs.append(TensorSpec(name=v.name, dtype=str(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)),
                                shape=dims))
    return specs


def _weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    return total


def build_decoder_module(hf_model: nn.Module, kv_mode: str = "int8", dtype: str = "float32") -> PagedDecoder:
    """The torch module that `export_decoder` traces (useful for eager checks). Copies the text
    weights only when a dtype cast is needed; the caller's model is never modified."""
    if kv_mode not in KV_MODES:
        raise DecoderExportError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
    if dtype not in DTYPES:
        raise DecoderExportError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    nds = len(hf_model.config.vision_config.deepstack_visual_indexes)
    module = PagedDecoder(hf_model, kv_mode, nds).eval()
    if next(module.parameters()).dtype != DTYPES[dtype]:
        module = copy.deepcopy(module).to(DTYPES[dtype])
        # .to() cast the float32 rotary buffer too; restore it from the source (no fp16 rounding)
        module.rope.inv_freq = text_parts(hf_model)[0].rotary_emb.inv_freq.detach().float().clone()
    return module


def export_decoder(hf_model: nn.Module, out_path: Path, kv_mode: str = "int8", dtype: str = "float32",
                   opset: int = 18, device: str = "cuda") -> Partition:
    """Write the decoder graph to out_path (and out_path + '.data' when the weights exceed
    EXTERNAL_DATA_BYTES); return its partition (placed on `device`), I/O read back from the file."""
    module = build_decoder_module(hf_model, kv_mode, dtype)
    text_config = hf_model.config.text_config
    args = _example_args(module, text_config, module.num_deepstack, DTYPES[dtype])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        program = torch.onnx.export(module, args, dynamo=True, input_names=module.input_names(),
                                    output_names=module.output_names(), opset_version=opset,
                                    dynamic_shapes=_dynamic_shapes(module), optimize=True,
                                    custom_translation_table=_onnx_translations(),
                                    verbose=False)
    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    external = _weight_bytes(module) > EXTERNAL_DATA_BYTES
    program.save(out_path, external_data=external)
    fuse_norms(out_path, external)
    model = onnx.load(str(out_path), load_external_data=False)
    model.ir_version = ONNX_IR_VERSION
    onnx.save(model, str(out_path))
    check_in_place_writes(model)
    return Partition(file=out_path.name, device=device, inputs=_tensor_specs(model.graph.input),
                     outputs=_tensor_specs(model.graph.output))


def fuse_norms(path: Path, external: bool) -> dict[str, int]:
    """Rewrite the exported graph's RMSNorms (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul:
    HF's formula, in float32) into ONNX Runtime's SimplifiedLayerNormalization, and a residual
    Add feeding one into SkipSimplifiedLayerNormalization, with onnxscript's ORT fusion rules
    (the library torch's exporter is built on). One kernel instead of seven per norm: on a small
    model the graph's cost is its node count. Returns the number of each fusion applied."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    model = ir.load(path)
    if external:                        # read the weights before <file>.data is rewritten
        ir.external_data.load_to_model(model)
    counts = {"rms_norm": fuse_rms_normalization(model),
              "skip_rms_norm": fuse_skip_rms_normalization(model)}
    RemoveUnusedNodesPass()(model)     # the fused norms' epsilon constants
    ir.save(model, path, external_data=path.name + ".data" if external else None)
    return counts


def check_in_place_writes(model: onnx.ModelProto) -> None:
    """Every updated pool output must come straight from a ScatterND whose data input is that
    pool's graph input: anything in between (a Reshape, Expand, Identity) would make ONNX Runtime
    copy the whole pool tensor every step instead of writing the new tokens in place."""
    producers = {out: node for node in model.graph.node for out in node.output}
    inputs = {i.name for i in model.graph.input}
    for out in model.graph.output:
        if not out.name.endswith(mf.UPDATED):
            continue
        node = producers.get(out.name)
        source = out.name[:-len(mf.UPDATED)]
        if node is None or node.op_type != "ScatterND" or node.input[0] != source or source not in inputs:
            got = "nothing" if node is None else f"{node.op_type}({', '.join(node.input)})"
            raise DecoderExportError(f"pool output {out.name} is produced by {got}, not by an "
                                     f"in-place ScatterND over the graph input {source}")
