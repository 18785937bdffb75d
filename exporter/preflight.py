"""What the exporter can tell from a checkpoint's small files, checked before any weight is loaded.

`preflight` runs first in `make engine` (and in `python -m exporter plan`): the config as
transformers resolves it, the shapes the exported graphs and the runtime rely on, the MRoPE
sections and rope type, the preprocessor against the vision config, the special token ids against
the tokenizer and the chat template (through the runtime's own PromptBuilder, so an engine that
builds is one the runtime can load), and the context the engine may hold. A checkpoint the
exporter cannot build fails here in seconds, with one line that names the problem, instead of
after minutes of export.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

from exporter.checkpoint import Checkpoint, CheckpointError
from exporter.profiles import Profile
from exporter.rope import MRopeError, check_rope_parameters


@dataclasses.dataclass(frozen=True)
class Preflight:
    config: dict[str, Any]       # config.json as transformers resolves it (every default filled in)
    profile: Profile             # the profile with max_context capped to the model's
    notices: tuple[str, ...]     # what the build adjusted, to print


def resolve_config(ckpt: Checkpoint) -> dict[str, Any]:
    from transformers import Qwen3VLConfig
    raw = {k: v for k, v in ckpt.config.items() if k != "architectures"}
    try:
        return Qwen3VLConfig(**raw).to_dict()
    except Exception as e:  # transformers' config validation raises several types
        raise CheckpointError(f"{ckpt.path}/config.json is not a Qwen3-VL config transformers "
                              f"accepts: {e}") from e


def _fail(ckpt: Checkpoint, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {ckpt.path}: {what}")


def check_text(ckpt: Checkpoint, text: dict[str, Any]) -> None:
    heads, kv_heads, head_dim = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"]
    if min(heads, kv_heads, head_dim, text["hidden_size"], text["num_hidden_layers"]) < 1:
        raise _fail(ckpt, "text_config has a zero or negative size")
    if heads % kv_heads:
        raise _fail(ckpt, f"num_attention_heads {heads} is not a multiple of num_key_value_heads "
                          f"{kv_heads} (grouped-query attention needs whole groups)")
    if head_dim % 2:
        raise _fail(ckpt, f"text head_dim {head_dim} is odd; rotary embeddings rotate pairs")
    try:
        check_rope_parameters(text.get("rope_parameters"))
    except MRopeError as e:
        raise _fail(ckpt, str(e)) from e


def check_vision(ckpt: Checkpoint, vision: dict[str, Any], text_hidden: int) -> None:
    hidden, heads, depth = vision["hidden_size"], vision["num_heads"], vision["depth"]
    if min(hidden, heads, depth, vision["patch_size"], vision["spatial_merge_size"],
           vision["temporal_patch_size"]) < 1:
        raise _fail(ckpt, "vision_config has a zero or negative size")
    if hidden % heads or (hidden // heads) % 4:
        raise _fail(ckpt, f"vision hidden_size {hidden} over num_heads {heads} must give a head "
                          "dim that is a multiple of 4 (transformers' axial 2D rotary)")
    if vision["temporal_patch_size"] != 2:
        raise _fail(ckpt, f"vision temporal_patch_size {vision['temporal_patch_size']}: the runtime's "
                          "video path pairs frames, so it serves temporal_patch_size 2 (what every "
                          "Qwen3-VL checkpoint ships) only")
    taps = list(vision["deepstack_visual_indexes"])
    if not taps:
        raise _fail(ckpt, "vision_config.deepstack_visual_indexes is empty; the engine contract "
                          "needs at least one DeepStack tap")
    if len(set(taps)) != len(taps) or not all(isinstance(i, int) and 0 <= i < depth for i in taps):
        raise _fail(ckpt, f"deepstack_visual_indexes {taps} must be distinct block indexes in "
                          f"[0, {depth}) (vision depth {depth})")
    out = vision.get("out_hidden_size", text_hidden)
    if out != text_hidden:
        raise _fail(ckpt, f"vision out_hidden_size {out} differs from the text hidden_size "
                          f"{text_hidden}; the visual tokens would not fit the decoder")
    n = vision["num_position_embeddings"]
    if math.isqrt(n) ** 2 != n:
        raise _fail(ckpt, f"vision num_position_embeddings {n} is not a square (the learned "
                          "position table is a side x side grid)")


def check_preprocessors(ckpt: Checkpoint, vision: dict[str, Any]) -> None:
    """The patch geometry the processor cuts must be the one the vision tower was built for."""
    want = {"patch_size": vision["patch_size"], "merge_size": vision["spatial_merge_size"],
            "temporal_patch_size": vision["temporal_patch_size"]}
    for name, cfg in (("preprocessor_config.json", ckpt.preprocessor),
                      ("video_preprocessor_config.json", ckpt.video_preprocessor)):
        for key, value in want.items():
            if key in cfg and int(cfg[key]) != int(value):
                source = "spatial_merge_size" if key == "merge_size" else key
                raise _fail(ckpt, f"{name} has {key} {cfg[key]} but vision_config.{source} is "
                                  f"{value}; make them agree")


def check_tokens(ckpt: Checkpoint, config: dict[str, Any], text: dict[str, Any]) -> None:
    """Special token ids fit the embedding table and are the tokenizer's; the chat template
    renders an image turn. Uses the runtime's PromptBuilder, which makes the same checks on load."""
    from tokenizers import Tokenizer

    from runtime.api import ChatMessage, ImagePart, TextPart
    from runtime.prompt import PromptBuilder

    vocab = text["vocab_size"]
    try:
        size = Tokenizer.from_file(str(ckpt.path / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises its own exception type for a bad file
        raise _fail(ckpt, f"tokenizer.json does not load: {e}") from e
    if size > vocab:
        raise _fail(ckpt, f"the tokenizer has {size} token ids but the embedding table only "
                          f"{vocab} rows (text_config.vocab_size)")
    ids = {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                  "vision_end_token_id")}
    for key, tid in ids.items():
        if not isinstance(tid, int) or not 0 <= tid < vocab:
            raise _fail(ckpt, f"{key} {tid} is outside the vocabulary (vocab_size {vocab})")
    try:
        builder = PromptBuilder(str(ckpt.path / "tokenizer.json"), ckpt.chat_template,
                                merge_size=config["vision_config"]["spatial_merge_size"], **ids)
    except Exception as e:  # jinja2 and the id check raise different types
        raise _fail(ckpt, f"tokenizer or chat template unusable with this config: {e}") from e
    try:
        text_out = builder.render([ChatMessage("user", (ImagePart(b""), TextPart("hi")))])
    except Exception as e:
        raise _fail(ckpt, f"the chat template cannot render an image turn: {e}") from e
    if "<|image_pad|>" not in text_out:
        raise _fail(ckpt, "the chat template writes no <|image_pad|> for an image part")


def cap_context(profile: Profile, text: dict[str, Any]) -> tuple[Profile, tuple[str, ...]]:
    """The engine holds min(profile max_context, model max_position_embeddings) tokens."""
    model_max = int(text.get("max_position_embeddings") or profile.max_context)
    if profile.max_context <= model_max:
        return profile, ()
    notice = (f"notice: profile {profile.name} asks for a {profile.max_context:,}-token context; "
              f"the model's max_position_embeddings is {model_max:,}, so the engine holds {model_max:,}")
    return dataclasses.replace(profile, max_context=model_max), (notice,)


def preflight(ckpt: Checkpoint, profile: Profile, tokens: bool = True) -> Preflight:
    """All checks; `tokens=False` (the planning path, which never writes an engine) skips the
    tokenizer and chat template."""
    config = resolve_config(ckpt)
    text, vision = config["text_config"], config["vision_config"]
    check_text(ckpt, text)
    check_vision(ckpt, vision, text["hidden_size"])
    check_preprocessors(ckpt, vision)
    if tokens:
        check_tokens(ckpt, config, text)
    profile, notices = cap_context(profile, text)
    return Preflight(config=config, profile=profile, notices=notices)
