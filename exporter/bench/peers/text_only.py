"""The bandwidth-bound model's text decoder as a text-only Qwen3 checkpoint (Qwen3ForCausalLM),
which llama.cpp's converter reads. The Qwen3-VL text decoder is the Qwen3 architecture: for text
tokens its interleaved MRoPE gets equal t/h/w positions, i.e. plain 1-D RoPE, and the deepstack
visual inputs only touch image tokens. So for a text prompt the two are the same function of the
same weights (the peer benchmark checks greedy tokens agree)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

PREFIX = "model.language_model."
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def text_config(vl_config: dict) -> dict:
    t = vl_config["text_config"]
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "max_position_embeddings",
            "vocab_size", "attention_bias", "bos_token_id", "eos_token_id")
    cfg = {k: t[k] for k in keep if k in t}
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", torch_dtype="float32",
               rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 10000.0))),
               tie_word_embeddings=bool(vl_config.get("tie_word_embeddings", t.get("tie_word_embeddings"))))
    return cfg


def write_text_only(vl_dir: Path, out: Path) -> Path:
    """Write out/ (config.json, model.safetensors, tokenizer files) from the Qwen3-VL checkpoint."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    if (out / ".complete").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    vl = json.loads((vl_dir / "config.json").read_text())
    cfg = text_config(vl)
    tensors = {}
    with safe_open(str(vl_dir / "model.safetensors"), "np") as f:
        for key in f.keys():
            if key.startswith(PREFIX):
                tensors["model." + key[len(PREFIX):]] = f.get_tensor(key)
            elif key == "lm_head.weight" and not cfg["tie_word_embeddings"]:
                tensors[key] = f.get_tensor(key)
    if not cfg["tie_word_embeddings"] and "lm_head.weight" not in tensors:
        raise ValueError(f"{vl_dir}: untied embeddings but no lm_head.weight")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (vl_dir / name).exists():
            shutil.copy(vl_dir / name, out / name)
    (out / ".complete").write_text("")
    return out
