"""Read and validate a Qwen3-VL checkpoint directory (the Hugging Face layout)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

REQUIRED = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
SUPPORTED_TYPES = ("qwen3_vl",)
# Family members transformers runs that this exporter does not build, and why (one line each).
REFUSED_TYPES = {
    "qwen3_vl_moe": "Qwen3-VL MoE checkpoints (e.g. Qwen3-VL-30B-A3B, -235B-A22B) route each token "
                    "through sparse experts, which the decoder graph does not implement; build a "
                    "dense Qwen3-VL (model_type qwen3_vl: 2B, 4B, 8B, 32B)",
    "qwen2_5_vl": "Qwen2.5-VL has no DeepStack and windowed vision attention; this exporter builds "
                  "Qwen3-VL (model_type qwen3_vl)",
    "qwen2_vl": "Qwen2-VL has no DeepStack and a different MRoPE; this exporter builds Qwen3-VL "
                "(model_type qwen3_vl)",
}


class CheckpointError(ValueError):
    """A checkpoint directory the exporter cannot build from; the message names the problem."""


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: Path
    config: dict[str, Any]
    preprocessor: dict[str, Any]
    video_preprocessor: dict[str, Any]
    chat_template: str
    weight_files: tuple[Path, ...]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def _chat_template(path: Path, tokenizer_config: dict[str, Any]) -> str:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return str(_read_json(path / "chat_template.json").get("chat_template", ""))
    template = tokenizer_config.get("chat_template")
    if isinstance(template, str) and template:
        return template
    raise CheckpointError(f"{path} has no chat template (chat_template.jinja, chat_template.json "
                          "or tokenizer_config.json's chat_template)")


def read_checkpoint(path: str | Path, require_weights: bool = True) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    config = _read_json(path / "config.json")
    model_type = config.get("model_type")
    if model_type in REFUSED_TYPES:
        raise CheckpointError(f"checkpoint {path} is model_type {model_type!r}: {REFUSED_TYPES[model_type]}")
    if model_type not in SUPPORTED_TYPES:
        raise CheckpointError(f"checkpoint {path} is model_type {model_type!r}; this exporter builds "
                              f"{', '.join(SUPPORTED_TYPES)} (Qwen3-VL) checkpoints")
    for key in ("text_config", "vision_config"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path}/config.json lacks {key}")
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights and require_weights:
        raise CheckpointError(f"checkpoint {path} has no *.safetensors weight files")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = set(_read_json(index).get("weight_map", {}).values())
        absent = sorted(s for s in shards if not (path / s).is_file())
        if absent:
            raise CheckpointError(f"checkpoint {path} is missing weight shards: {', '.join(absent)}")
    video = path / "video_preprocessor_config.json"
    return Checkpoint(
        path=path, config=config, preprocessor=_read_json(path / "preprocessor_config.json"),
        video_preprocessor=_read_json(video) if video.is_file() else {},
        chat_template=_chat_template(path, _read_json(path / "tokenizer_config.json")),
        weight_files=weights)


def load_model(ckpt: Checkpoint, dtype: str = "float32"):
    """Load the weights with transformers; a tensor missing from the files is an error, not a
    silently random-initialised parameter."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    try:
        model, info = Qwen3VLForConditionalGeneration.from_pretrained(
            ckpt.path, dtype=getattr(torch, dtype), output_loading_info=True)
    except Exception as e:  # safetensors/transformers raise many types for damaged files
        raise CheckpointError(f"cannot load the weights of {ckpt.path}: {e}") from e
    missing = [k for k in info.get("missing_keys", []) if "rotary" not in k and "inv_freq" not in k]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"checkpoint {ckpt.path} is missing {len(missing)} tensor(s): {shown}")
    mismatched = info.get("mismatched_keys", [])
    if mismatched:
        raise CheckpointError(f"checkpoint {ckpt.path} has tensors of the wrong shape: "
                              f"{', '.join(str(m[0] if isinstance(m, tuple) else m) for m in mismatched[:5])}")
    return model.eval()
