"""Build a small Qwen3-VL checkpoint directory from a seed: the real architecture at toy size.

It carries everything a real checkpoint ships (config, safetensors, tokenizer, chat template,
image and video preprocessor configs), so the exporter and the runtime take exactly the code path
they take for Qwen3-VL-4B-Instruct. The tokenizer is a small byte-level BPE with Qwen's special
tokens, trained on text from the synthetic visual world the default model learns.

    python -m exporter.seed_model --out build/models/seed --seed 0
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# A Qwen-style chat template: the Qwen3-VL Instruct layout, tool calling included. With tools it
# opens with Qwen3-VL's "# Tools" system block (the first system message's text inside it);
# assistant turns carry `<tool_call>` JSON blocks; `tool` messages become `<tool_response>` blocks
# in a user turn. Without tools, tool calls or tool messages it renders exactly what the earlier,
# tool-less template did (every message, the system one included, as <|im_start|>role ...).
# Pictures are numbered as Qwen3-VL's template numbers them with `add_vision_id` ("Picture 1: "
# before the first image's vision block, counted over the whole conversation; "Video 1: " for
# clips) whenever the conversation holds more than one image (or clip), so "which picture has the
# circle?" can be answered "The second."; one image alone is unlabelled, as before.
# `add_vision_id=True/False` passed to apply_chat_template forces it either way, as in Qwen's.
CHAT_TEMPLATE = """\
{%- set image_count = namespace(value=0, total=0) %}
{%- set video_count = namespace(value=0, total=0) %}
{%- for message in messages %}{%- if message['content'] is not string and message['content'] %}
{%- for part in message['content'] %}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}{%- set image_count.total = image_count.total + 1 %}
{%- elif part['type'] == 'video' or 'video' in part or 'video_url' in part %}{%- set video_count.total = video_count.total + 1 %}
{%- endif %}{%- endfor %}{%- endif %}{%- endfor %}
{%- set label_images = add_vision_id if add_vision_id is defined else image_count.total > 1 %}
{%- set label_videos = add_vision_id if add_vision_id is defined else video_count.total > 1 %}
{%- macro render_content(content) %}
{%- if content is string %}{{- content }}
{%- elif content %}{%- for part in content %}
{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}
{%- set image_count.value = image_count.value + 1 %}
{%- if label_images %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}
{{- '<|vision_start|><|image_pad|><|vision_end|>' }}
{%- elif part['type'] == 'video' or 'video' in part or 'video_url' in part %}
{%- set video_count.value = video_count.value + 1 %}
{%- if label_videos %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}
{{- '<|vision_start|><|video_pad|><|vision_end|>' }}
{%- elif 'text' in part %}{{- part['text'] }}
{%- endif %}{%- endfor %}{%- endif %}
{%- endmacro %}
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- render_content(messages[0]['content']) + '\\n\\n' }}{%- endif %}
{{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- endif %}
{%- for message in messages %}
{%- if tools and loop.first and message['role'] == 'system' %}
{%- elif message['role'] == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- render_content(message['content']) }}{{- '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- else %}
{{- '<|im_start|>' + message['role'] + '\\n' }}{{- render_content(message['content']) }}
{%- if message['tool_calls'] %}{%- for tool_call in message['tool_calls'] %}
{%- if (loop.first and message['content']) or (not loop.first) %}{{- '\\n' }}{%- endif %}
{%- if tool_call['function'] %}{%- set tool_call = tool_call['function'] %}{%- endif %}
{{- '<tool_call>\\n{"name": "' }}{{- tool_call['name'] }}{{- '", "arguments": ' }}
{%- if tool_call['arguments'] is string %}{{- tool_call['arguments'] }}
{%- else %}{{- tool_call['arguments'] | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}{%- endif %}
{{- '<|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond", "cross", "heart"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan"]
WORDS = ["the", "a", "an", "is", "are", "there", "one", "two", "three", "four", "five", "in",
         "on", "of", "and", "left", "right", "top", "bottom", "centre", "center", "middle",
         "image", "picture", "video", "shape", "shapes", "colour", "color", "what", "which",
         "how", "many", "where", "does", "say", "text", "word", "number", "changes", "turns",
         "moves", "at", "about", "seconds", "second", "from", "to", "I", "see", "can", "you",
         "describe", "this", "it", "yes", "no", "hello", "thanks", "help", "background",
         "plain", "striped", "dotted", "small", "large", "medium", "written", "printed"]


def corpus(seed: int, n: int = 4000) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        shape, colour = rng.choice(SHAPES), rng.choice(COLOURS)
        lines.append(rng.choice([
            f"There is a {colour} {shape} in the {rng.choice(['top left', 'bottom right', 'centre'])}.",
            f"How many {shape}s are there? {rng.randint(0, 9)}",
            f"The {shape} turns {colour} at about {rng.randint(0, 9)}.{rng.randint(0, 9)} seconds.",
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))),
            f"It says {rng.choice(['CAT', 'DOG', 'SUN', 'HELLO', 'STOP'])} {rng.randint(0, 999)}.",
            "def f(x):\n    return x * 2\n<b>bold</b> **markdown** `code` é ü 你好 🙂",
        ]))
    # made-up words, so that the BPE still learns a full vocabulary now that Qwen's rule keeps
    # digits apart (numbers no longer supply merges)
    syllables = ["ka", "lo", "mi", "ren", "sto", "va", "qu", "el", "tor", "un", "bri", "os", "zan"]
    lines += [" ".join("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4)))
                       for _ in range(8)) for _ in range(n // 4)]
    return lines


# Qwen2's pre-tokenisation rule (transformers' Qwen2Tokenizer, and the "pre_tokenizer" of the real
# Qwen2/2.5/3/3-VL tokenizer.json): contractions, letter runs with one leading non-letter, single
# digits, punctuation runs, newlines and whitespace runs; then byte-level mapping without GPT-2's
# own regex. With NFC normalisation in front, tokenizer.json tokenizes exactly as AutoTokenizer.
QWEN_PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                          r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


def use_qwen_pretokenizer(tok) -> None:
    """Give a byte-level BPE `tokenizers.Tokenizer` Qwen2's normalizer, pre-tokenizer, decoder
    and post-processor (in place; the vocabulary and merges are kept)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False,
                                              use_regex=False)


def upgrade_tokenizer_file(path: Path) -> bool:
    """Rewrite a tokenizer.json in place with Qwen2's pre-tokenisation (see above); returns
    whether it changed. Older default models shipped a plain ByteLevel pre-tokenizer."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(path))
    before = tok.to_str()
    use_qwen_pretokenizer(tok)
    if tok.to_str() == before:
        return False
    tok.save(str(path))
    return True


def build_tokenizer(seed: int, vocab_size: int, lines: list[str] | None = None):
    """A byte-level BPE trained on `lines` (default: the seed corpus), Qwen's special tokens last,
    pre-tokenized as Qwen2 does (so AutoTokenizer and tokenizer.json agree)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    use_qwen_pretokenizer(tok)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(seed) if lines is None else lines, trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def tiny_config(vocab_size: int, ids: dict[str, int]) -> dict:
    text = dict(model_type="qwen3_vl_text", vocab_size=vocab_size, hidden_size=128,
                intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, hidden_act="silu", rms_norm_eps=1e-6,
                max_position_embeddings=8192, rope_theta=10000.0, attention_bias=False,
                rope_scaling={"mrope_interleaved": True, "mrope_section": [8, 4, 4],
                              "rope_type": "default"},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                tie_word_embeddings=True, dtype="float32")
    vision = dict(model_type="qwen3_vl", depth=4, hidden_size=64, intermediate_size=128,
                  num_heads=4, in_channels=3, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=128, num_position_embeddings=64,
                  deepstack_visual_indexes=[1, 2, 3], hidden_act="gelu_pytorch_tanh")
    return dict(architectures=["Qwen3VLForConditionalGeneration"], model_type="qwen3_vl",
                text_config=text, vision_config=vision, tie_word_embeddings=True,
                image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"])


def preprocessor_configs(max_pixels: int = 512 * 512, min_pixels: int = 64 * 64):
    common = dict(patch_size=16, temporal_patch_size=2, merge_size=2,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                  processor_class="Qwen3VLProcessor")
    image = dict(common, size={"longest_edge": max_pixels, "shortest_edge": min_pixels},
                 image_processor_type="Qwen2VLImageProcessorFast")
    video = dict(common, size={"longest_edge": max_pixels * 4, "shortest_edge": min_pixels},
                 do_sample_frames=True, fps=2, min_frames=4, max_frames=64,
                 video_processor_type="Qwen3VLVideoProcessor")
    return image, video


def write_tokenizer_files(tok, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False,
                                       "normalized": False, "single_word": False, "special": True}
             for t in SPECIAL_TOKENS}
    (out / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="Qwen2Tokenizer", model_max_length=8192, errors="replace",
        eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None,
        add_prefix_space=False, clean_up_tokenization_spaces=False, split_special_tokens=False,
        added_tokens_decoder=added, extra_special_tokens={
            "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
    ), indent=2))
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def build(out: Path, seed: int = 0, vocab_size: int = 1024) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(seed, vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    write_tokenizer_files(tok, out)
    image_cfg, video_cfg = preprocessor_configs()
    (out / "preprocessor_config.json").write_text(json.dumps(image_cfg, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video_cfg, indent=2))
    return save_random_model(out, tiny_config(tok.get_vocab_size(), ids), ids, seed)


def save_random_model(out: Path, config: dict, ids: dict[str, int], seed: int = 0) -> Path:
    """Random weights for `config` (seeded), Qwen's end tokens in the generation config, saved as
    a Hugging Face checkpoint into out (beside the tokenizer files already there)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**config)).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/models/seed"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args()
    print(build(args.out, args.seed, args.vocab_size))


if __name__ == "__main__":
    main()
