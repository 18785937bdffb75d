"""Tokenizer, config and preprocessing for the embedded default model.

The default model is a real Qwen3VLForConditionalGeneration (DeepStack, interleaved MRoPE, patch
16, temporal patch 2, merge 2) at toy size, trained by `exporter.train` on the synthetic world in
`exporter.world`. Its tokenizer is a byte-level BPE with Qwen's special tokens, trained on the
world's questions and answers plus seed_model's general corpus (so arbitrary text still encodes),
with Qwen2's normalizer and pre-tokenizer (seed_model.use_qwen_pretokenizer): transformers'
Qwen2Tokenizer applies that rule whatever tokenizer.json says, so training always saw it, and the
runtime, which reads tokenizer.json, now tokenizes identically.
"""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

from exporter.seed_model import SPECIAL_TOKENS, preprocessor_configs, write_tokenizer_files
from exporter.seed_model import build_tokenizer as build_seed_tokenizer, corpus as seed_corpus
from exporter.world.clips import frame_timestamps
from exporter.world.qa import corpus_lines
from exporter.world.scenes import IMAGE_SIDE

# Images are few tokens: anything larger is resized down to about IMAGE_SIDE^2 pixels.
MAX_PIXELS = IMAGE_SIDE * IMAGE_SIDE
MIN_PIXELS = 64 * 64
VIDEO_MAX_PIXELS = MAX_PIXELS * 16      # total over frames (Qwen3-VL video smart_resize)


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """The free knobs of the architecture (everything else is fixed Qwen3-VL)."""
    hidden: int = 128
    intermediate: int = 256
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    vision_depth: int = 3
    vision_hidden: int = 64
    vision_intermediate: int = 192
    vision_heads: int = 4
    deepstack: tuple[int, ...] = (1, 2)
    vocab: int = 1024


SIZES = {
    "default": ModelSize(),
    "tiny": ModelSize(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, head_dim=32,
                      vision_depth=2, vision_hidden=32, vision_intermediate=64, vision_heads=2,
                      deepstack=(1,), vocab=512),
}


def tokenizer_corpus(seed: int = 0) -> list[str]:
    stamps = [f"<{t:.1f} seconds>" for t in frame_timestamps(64, 2.0)]
    return corpus_lines(3000, seed) + seed_corpus(seed, 1500) + stamps * 20


def build_tokenizer(vocab_size: int, seed: int = 0):
    return build_seed_tokenizer(seed, vocab_size, lines=tokenizer_corpus(seed))


def model_config(size: ModelSize, vocab_size: int, ids: dict[str, int]) -> dict:
    """Qwen3VLConfig kwargs. mrope_section sums to head_dim/2 (interleaved T/H/W)."""
    quarter = size.head_dim // 8
    text = dict(model_type="qwen3_vl_text", vocab_size=vocab_size, hidden_size=size.hidden,
                intermediate_size=size.intermediate, num_hidden_layers=size.layers,
                num_attention_heads=size.heads, num_key_value_heads=size.kv_heads,
                head_dim=size.head_dim, hidden_act="silu", rms_norm_eps=1e-6,
                max_position_embeddings=8192, rope_theta=10000.0, attention_bias=False,
                rope_scaling={"mrope_interleaved": True,
                              "mrope_section": [size.head_dim // 2 - 2 * quarter, quarter, quarter],
                              "rope_type": "default"},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                tie_word_embeddings=True, dtype="float32")
    vision = dict(model_type="qwen3_vl", depth=size.vision_depth, hidden_size=size.vision_hidden,
                  intermediate_size=size.vision_intermediate, num_heads=size.vision_heads,
                  in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  out_hidden_size=size.hidden, num_position_embeddings=64,
                  deepstack_visual_indexes=list(size.deepstack), hidden_act="gelu_pytorch_tanh")
    return dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl",
                text_config=text, vision_config=vision, tie_word_embeddings=True,
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


def write_preprocessor_configs(out: Path) -> tuple[dict, dict]:
    image_cfg, video_cfg = preprocessor_configs(max_pixels=MAX_PIXELS, min_pixels=MIN_PIXELS)
    video_cfg["size"] = {"longest_edge": VIDEO_MAX_PIXELS, "shortest_edge": MIN_PIXELS}
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    return image_cfg, video_cfg


def new_model(out: Path, size: ModelSize, seed: int = 0):
    """Write tokenizer + preprocessor files into `out`; return (model, tokenizer, image_cfg)."""
    import torch
    from transformers import AutoTokenizer, Qwen3VLConfig, Qwen3VLForConditionalGeneration
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(size.vocab, seed)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    write_tokenizer_files(tok, out)
    image_cfg, _ = write_preprocessor_configs(out)
    random.seed(seed)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**model_config(size, tok.get_vocab_size(), ids)))
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model, AutoTokenizer.from_pretrained(out), image_cfg
