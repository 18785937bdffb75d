"""Random-weight checkpoints of the real Qwen3-VL architecture for `make gpu-check`.

`4b` is Qwen3-VL-4B-Instruct's own config (../shared/reference/, copied here as REFERENCE_4B so a
bare GPU machine needs nothing else), `2b` the 2B member's text and vision sizes, `tiny` a
CPU-sized variant with the same vocabulary. The tokenizer is the seed's byte-level BPE with its
vocabulary padded to 151,936 ids and Qwen's special tokens at Qwen's ids (151643...), so the
config's image/video/vision token ids, the LM head and the embedding table are the real sizes.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

QWEN_SPECIAL_BASE = 151_643
REFERENCE_4B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": True,
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2560,
                    "initializer_range": 0.02, "intermediate_size": 9728,
                    "max_position_embeddings": 262144, "model_type": "qwen3_vl_text",
                    "num_attention_heads": 32, "num_hidden_layers": 36, "num_key_value_heads": 8,
                    "rms_norm_eps": 1e-06, "rope_scaling": {"mrope_interleaved": True,
                                                            "mrope_section": [24, 20, 20],
                                                            "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "use_cache": True,
                    "vocab_size": 151936},
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024, "in_channels": 3,
                      "initializer_range": 0.02, "intermediate_size": 4096, "model_type": "qwen3_vl",
                      "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
SIZES = {
    "4b": ({}, {}),
    "2b": (dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                intermediate_size=6144), dict(out_hidden_size=2048)),
    "tiny": (dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=64, intermediate_size=768,
                  rope_scaling={"mrope_interleaved": True, "mrope_section": [12, 10, 10],
                                "rope_type": "default"}),
             dict(depth=3, hidden_size=128, num_heads=2, intermediate_size=256, out_hidden_size=256,
                  deepstack_visual_indexes=[0, 1, 2], num_position_embeddings=256)),
}
PREPROCESSOR = {"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
                "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                "image_std": [0.5, 0.5, 0.5], "processor_class": "Qwen3VLProcessor",
                "image_processor_type": "Qwen2VLImageProcessorFast"}
VIDEO_PREPROCESSOR = {"size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16,
                      "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                      "image_std": [0.5, 0.5, 0.5], "fps": 2, "min_frames": 4, "max_frames": 768,
                      "do_sample_frames": True, "processor_class": "Qwen3VLProcessor",
                      "video_processor_type": "Qwen3VLVideoProcessor"}


def config_for(size: str) -> dict:
    text, vision = SIZES[size]
    cfg = copy.deepcopy(REFERENCE_4B)
    cfg["text_config"].update(text)
    cfg["vision_config"].update(vision)
    return cfg


def qwen_id_tokenizer(out: Path, vocab_size: int) -> None:
    """The seed tokenizer, its vocabulary padded with unreachable fillers up to Qwen's special
    ids and its special tokens moved there (tokenizer.json edited as JSON)."""
    from exporter import seed_model as sm

    tok = sm.build_tokenizer(0, 1024)
    sm.write_tokenizer_files(tok, out)
    data = json.loads((out / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    specials = {t["content"]: t for t in data["added_tokens"]}
    for content in specials:
        vocab.pop(content, None)
    used = set(vocab.values())
    free = (i for i in range(QWEN_SPECIAL_BASE) if i not in used)
    for n, i in enumerate(free):
        vocab[f"<|filler_{n}|>"] = i
    for n, content in enumerate(sm.SPECIAL_TOKENS):
        specials[content]["id"] = QWEN_SPECIAL_BASE + n
    data["added_tokens"] = sorted(specials.values(), key=lambda t: t["id"])
    (out / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "rstrip",
                                                                     "normalized", "single_word", "special")}
                                   for t in data["added_tokens"]}
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    assert vocab_size >= QWEN_SPECIAL_BASE + len(sm.SPECIAL_TOKENS)


def build_random_checkpoint(out: Path, size: str, dtype: str = "float16", device: str = "cpu",
                            seed: int = 0) -> Path:
    """A Hugging Face checkpoint directory with random weights (written once, reused)."""
    if (out / ".complete").exists():
        return out
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(size)
    qwen_id_tokenizer(out, cfg["text_config"]["vocab_size"])
    (out / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR, indent=2))
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**cfg)).to(getattr(torch, dtype)).eval()
    model.generation_config.eos_token_id = [151645, 151643]
    model.generation_config.pad_token_id = 151643
    model.save_pretrained(out)
    (out / ".complete").write_text("ok")
    return out
