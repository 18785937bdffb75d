"""Memory plan for a profile: weights per partition, activation peaks, KV bytes, blocks that fit.

Works from the config alone (a meta-device model: shapes, no weights), so the full-size
Qwen3-VL-4B plan can be computed on any machine.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from exporter.profiles import Profile
from runtime.kv_cache.pool import KVShape
from runtime.media.image import smart_resize

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}
SCALE_BYTES = 4            # per-token, per-head float32 scales for INT8 K and V


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    profile: str
    dtype: str
    params: dict[str, int]            # parameter counts per partition
    weights_bytes: dict[str, int]     # bytes per partition in the profile dtype
    device_weights_bytes: int         # what lives on the decoder's device
    host_weights_bytes: int           # vision_cpu partition + embedding table
    largest_image: tuple[int, int]    # pixels (h, w) after resizing, the largest admitted
    vision_patches: int
    vision_activation_bytes: int
    decoder_activation_bytes: int
    decoder_past_bytes: int           # one layer's gathered past at max_batch x max_context
    activation_peak_bytes: int
    kv_bytes_per_token: int
    kv_bytes_per_token_fp16: int
    kv_block_bytes: int
    kv_budget_bytes: int
    kv_blocks: int
    kv_tokens: int
    weights_quantization: str = ""    # the profile's `weights:` section, described ("" = none)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        def gb(n: int) -> str:
            return f"{n / GiB:8.3f} GiB"
        what = self.weights_quantization or f"{self.dtype} weights"
        rows = [f"memory plan for profile {self.profile} ({what})"]
        for part, n in self.weights_bytes.items():
            rows.append(f"  weights {part:<14} {gb(n)}  ({self.params[part]:,} params)")
        rows += [
            f"  on the decoder's device {gb(self.device_weights_bytes)}   on the host {gb(self.host_weights_bytes)}",
            f"  activation peak         {gb(self.activation_peak_bytes)}  (vision {gb(self.vision_activation_bytes)}"
            f" for {self.largest_image[0]}x{self.largest_image[1]} px = {self.vision_patches} patches;"
            f" decoder step {gb(self.decoder_activation_bytes)}, of which one layer's past"
            f" at max batch x max context {gb(self.decoder_past_bytes)})",
            f"  KV bytes per token      {self.kv_bytes_per_token:,} INT8 (+scales) vs "
            f"{self.kv_bytes_per_token_fp16:,} FP16 ({self.kv_bytes_per_token / self.kv_bytes_per_token_fp16:.2f}x)",
            f"  KV budget               {gb(self.kv_budget_bytes)} -> {self.kv_blocks:,} blocks of "
            f"{self.kv_block_bytes:,} B = {self.kv_tokens:,} tokens",
        ]
        return "\n".join(rows)


def meta_model(config: dict[str, Any]):
    """The transformers model on the meta device: real shapes, no memory."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration._from_config(cfg)


def partition_params(model, cut: int) -> dict[str, int]:
    visual = model.model.visual
    lm = model.model.language_model
    count = lambda mods: sum(p.numel() for m in mods for p in m.parameters())  # noqa: E731
    cut = min(cut, len(visual.blocks))
    return {
        "vision_cpu": count([visual.patch_embed, visual.pos_embed, *visual.blocks[:cut]]),
        "vision_gpu": count([*visual.blocks[cut:], visual.merger, visual.deepstack_merger_list]),
        "decoder": count([*lm.layers, lm.norm]) + model.lm_head.weight.numel(),
        "embed_tokens": lm.embed_tokens.weight.numel(),
    }


def quantized_matrix_bytes(k: int, n: int, bits: int, block: int, symmetric: bool,
                           scale_bytes: int) -> int:
    """Bytes of one [K, N] weight as MatMulNBits stores it: per column, ceil(K / block) blocks of
    block * bits / 8 bytes, one scale per block in the profile dtype and, unless symmetric, one
    zero point per block of `bits` bits packed into bytes per column."""
    blocks = -(-k // block)
    zero_points = 0 if symmetric else n * -(-blocks * bits // 8)
    return n * blocks * block * bits // 8 + n * blocks * scale_bytes + zero_points


def quantized_bytes(modules, bits: int, spec, wbytes: int) -> int:
    """Bytes of `modules` with every nn.Linear weight quantised (and the vision patch embedding's
    Conv3d, a [patch dim, hidden] matmul in the graph); biases, norms and other parameters stay
    in the profile dtype: what exporter/quantize.py leaves in the graph."""
    from torch import nn
    weights = {id(m.weight): m.weight for mod in modules for m in mod.modules()
               if isinstance(m, (nn.Linear, nn.Conv3d))}
    params = {id(p): p for mod in modules for p in mod.parameters()}
    total = sum(p.numel() * wbytes for i, p in params.items() if i not in weights)
    return total + sum(quantized_matrix_bytes(w[0].numel(), w.shape[0], bits, spec.block_size,
                                              spec.symmetric, wbytes) for w in weights.values())


def quantized_weights(model, profile: Profile, wbytes: int) -> dict[str, int]:
    """Per partition bytes under the profile's `weights:` section (only the partitions it
    quantises): the decoder layers at `bits`, the LM head at `lm_head_bits` (0: unquantised)."""
    spec = profile.weights
    if spec is None:
        return {}
    lm, visual = model.model.language_model, model.model.visual
    head = model.lm_head
    head_bytes = (quantized_bytes([head], spec.lm_head_bits, spec, wbytes) if spec.lm_head_bits
                  else head.weight.numel() * wbytes)
    out = {"decoder": quantized_bytes([*lm.layers, lm.norm], spec.bits, spec, wbytes) + head_bytes}
    if spec.vision:
        cut = min(profile.vision_cut, len(visual.blocks))
        out["vision_cpu"] = quantized_bytes([visual.patch_embed, visual.pos_embed, *visual.blocks[:cut]],
                                            spec.bits, spec, wbytes)
        out["vision_gpu"] = quantized_bytes([*visual.blocks[cut:], visual.merger,
                                             visual.deepstack_merger_list], spec.bits, spec, wbytes)
    return out


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, kv_dtype: str) -> int:
    """The pool's own formula (runtime/kv_cache/pool.py), so plan and pool never disagree."""
    return KVShape(layers, kv_heads, head_dim, 1).bytes_per_token(kv_dtype)


def decoder_past_bytes(rows: int, ctx: int, kv_heads: int, head_dim: int, kv_dtype: str,
                       wbytes: int) -> int:
    """Peak bytes of ONE layer's past in a decoder step (the graph gathers layer by layer): per
    token and head, K and V (one gather) dequantized to float32 and cast to the activation dtype
    (the int8 gather and the scales are freed by then), or, for a float pool, gathered and
    rearranged for the attention (two copies)."""
    if kv_dtype == "int8":
        per_head = 2 * (head_dim * (4 + wbytes) + SCALE_BYTES)
    else:
        per_head = 2 * 2 * head_dim * DTYPE_BYTES[kv_dtype]
    return rows * ctx * kv_heads * per_head


def make_plan(config: dict[str, Any], preprocessor: dict[str, Any], profile: Profile,
              model=None) -> MemoryPlan:
    model = model if model is not None else meta_model(config)
    text, vision = config["text_config"], config["vision_config"]
    wbytes = DTYPE_BYTES[profile.dtype]
    params = partition_params(model, profile.vision_cut)
    weights = {k: n * wbytes for k, n in params.items()} | quantized_weights(model, profile, wbytes)
    device_w = weights["vision_gpu"] + weights["decoder"]
    host_w = weights["vision_cpu"] + weights["embed_tokens"]

    patch, merge = vision["patch_size"], vision["spatial_merge_size"]
    size = preprocessor.get("size", {})
    max_pixels = int(size.get("longest_edge", preprocessor.get("max_pixels", 16384 * 1024)))
    min_pixels = int(size.get("shortest_edge", preprocessor.get("min_pixels", 56 * 56)))
    side = profile.max_image_side
    h, w = smart_resize(side, side, patch * merge, min_pixels, max_pixels)
    n = (h // patch) * (w // patch)
    heads, vh, vi = vision["num_heads"], vision["hidden_size"], vision["intermediate_size"]
    # scores + probabilities + the block mask, plus the block's widest activations
    vision_act = (2 * heads + 1) * n * n * wbytes + n * (4 * vh + 2 * vi) * wbytes

    layers, kvh, hd = text["num_hidden_layers"], text["num_key_value_heads"], text["head_dim"]
    qh, hidden, vocab = text["num_attention_heads"], text["hidden_size"], text["vocab_size"]
    t, ctx, rows = profile.max_tokens_per_step, profile.max_context, profile.max_batch
    kv_tok = kv_bytes_per_token(layers, kvh, hd, profile.kv_dtype)
    past = decoder_past_bytes(rows, ctx, kvh, hd, profile.kv_dtype, wbytes)
    # a step at max_batch x max_context: one layer's gathered past (block tables are padded to the
    # longest, so every row gathers max_context), the step's t tokens' fp32 scores and
    # probabilities against it, their MLP activations, and a row of logits per sequence
    decoder_act = (past + 2 * qh * t * (ctx + t) * 4
                   + t * (4 * hidden + 3 * text["intermediate_size"]) * wbytes + rows * vocab * 4)
    peak = max(vision_act, decoder_act)
    block_bytes = kv_tok * profile.kv_block_size
    # on a CPU profile the "device" is host memory, so everything shares the one budget
    resident = device_w + (host_w if profile.device == "cpu" else 0)
    budget = int(profile.memory_budget_gb * GiB - profile.reserve_gb * GiB - resident - peak)
    blocks = max(0, budget // block_bytes)
    return MemoryPlan(
        profile=profile.name, dtype=profile.dtype, params=params, weights_bytes=weights,
        device_weights_bytes=device_w, host_weights_bytes=host_w, largest_image=(h, w),
        vision_patches=n, vision_activation_bytes=vision_act, decoder_activation_bytes=decoder_act,
        decoder_past_bytes=past,
        activation_peak_bytes=peak, kv_bytes_per_token=kv_tok,
        kv_bytes_per_token_fp16=kv_bytes_per_token(layers, kvh, hd, "float16"),
        kv_block_bytes=block_bytes, kv_budget_bytes=max(0, budget), kv_blocks=int(blocks),
        kv_tokens=int(blocks) * profile.kv_block_size,
        weights_quantization=profile.weights.describe() if profile.weights else "")
