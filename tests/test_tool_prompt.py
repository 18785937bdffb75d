"""Tools through the chat template: the default model's template renders them as Qwen3-VL's does
(the `# Tools` system block, `<tool_call>` blocks in assistant turns, `tool` messages as
`<tool_response>` in a user turn), transformers' apply_chat_template(tools=...) is the oracle, and
prompts without tools are byte-identical to what the earlier, tool-less template rendered."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from exporter.seed_model import CHAT_TEMPLATE
from runtime.api import ChatMessage, ImagePart, TextPart, ToolCall, VideoPart
from runtime.config import from_dict
from runtime.prompt import PromptBuilder, _compile_template, message_dicts
from runtime.server.openai_format import parse_chat_request

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "build" / "models" / "default"

# The template the default model shipped before tools (exporter/seed_model.py until this change).
PREVIOUS_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part or 'video_url' in part %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}{%- elif 'text' in part %}"
    "{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

TOOLS = [
    {"type": "function", "function": {"name": "zoom_in", "description": "Zoom into a quadrant — größer",
                                      "parameters": {"type": "object", "properties": {
                                          "quadrant": {"type": "string"}}, "required": ["quadrant"]}}},
    {"type": "function", "function": {"name": "click", "parameters": {"type": "object", "properties": {}}}},
]
IMG, VID = ImagePart(b"png"), VideoPart(b"mp4")


def msg(role, *parts, calls=(), call_id=None):
    return ChatMessage(role, tuple(TextPart(p) if isinstance(p, str) else p for p in parts), calls, call_id)


CONVERSATIONS = [
    [msg("user", "hi")],
    [msg("system", "You describe images."), msg("user", IMG, "What is this?")],
    [msg("system", "S"), msg("user", "a", VID), msg("assistant", "A red circle."), msg("user", "and?")],
    [msg("user", "x"), msg("assistant", ""), msg("user", IMG, IMG, "two")],
]
TOOL_CONVERSATIONS = [
    [msg("user", IMG, "Zoom into the top left.")],
    [msg("system", "You operate a GUI."), msg("user", "Click OK.")],
    [msg("system", "S"), msg("user", IMG, "look closer"),
     msg("assistant", calls=(ToolCall("c1", "zoom_in", '{"quadrant": "top left"}'),
                             ToolCall("c2", "click", "{}"))),
     msg("tool", "a red triangle", call_id="c1"), msg("tool", IMG, "clicked", call_id="c2"),
     msg("user", "thanks")],
    [msg("user", "w?"), msg("assistant", "Let me look.", calls=(ToolCall("c1", "click", "{}"),)),
     msg("tool", "done", call_id="c1")],
]


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def builder():
    cfg = json.loads((MODEL / "config.json").read_text())
    return PromptBuilder(str(MODEL / "tokenizer.json"), (MODEL / "chat_template.jinja").read_text(),
                         image_token_id=cfg["image_token_id"], video_token_id=cfg["video_token_id"],
                         vision_start_token_id=cfg["vision_start_token_id"],
                         vision_end_token_id=cfg["vision_end_token_id"], merge_size=2)


def hf_messages(messages):
    """The OpenAI form a client sends: content null beside tool calls."""
    out = message_dicts(messages)
    for d, m in zip(out, messages):
        if m.tool_calls and not m.parts:
            d["content"] = None
    return out


def test_the_default_model_ships_the_exporters_template():
    assert (MODEL / "chat_template.jinja").read_text() == CHAT_TEMPLATE


def media_count(messages, kind):
    return sum(isinstance(p, kind) for m in messages for p in m.parts)


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_prompts_without_tools_are_byte_identical_to_the_previous_template(builder, generation_prompt):
    """...when the conversation holds at most one image and one clip (more are numbered, below)."""
    old = _compile_template(PREVIOUS_TEMPLATE)
    for messages in CONVERSATIONS:
        want = old.render(messages=message_dicts(messages), tools=None, add_generation_prompt=generation_prompt)
        if media_count(messages, ImagePart) > 1:
            want = want.replace("<|vision_start|><|image_pad|>", "Picture {}: <|vision_start|><|image_pad|>")
            want = want.format(*range(1, media_count(messages, ImagePart) + 1))
        assert builder.render(messages, generation_prompt) == want
        assert builder.render(messages, generation_prompt, tools=()) == want


def test_several_pictures_are_numbered_over_the_conversation_as_qwen_numbers_them(builder, hf_tok):
    """Qwen3-VL's add_vision_id labels ("Picture 1: "), on whenever there is more than one image,
    counted across turns; the same text as transformers renders from the same template."""
    chat = [msg("user", IMG, "What is this?"), msg("assistant", "A red circle."),
            msg("user", "And these?", IMG, IMG), msg("user", VID, "and", VID)]
    text = builder.render(chat)
    assert text.count("Picture ") == 3
    assert "Picture 1: <|vision_start|><|image_pad|><|vision_end|>What is this?" in text
    assert "And these?Picture 2: <|vision_start|><|image_pad|><|vision_end|>Picture 3: " in text
    assert "Video 1: <|vision_start|><|video_pad|><|vision_end|>andVideo 2: " in text
    assert text == hf_tok.apply_chat_template(hf_messages(chat), tokenize=False, add_generation_prompt=True)
    one = builder.render([msg("user", IMG, "What is this?")])
    assert "Picture" not in one
    assert hf_tok.apply_chat_template(hf_messages([msg("user", IMG, "What is this?")]), tokenize=False,
                                      add_generation_prompt=True, add_vision_id=True).count("Picture 1: ") == 1


def test_tools_render_as_transformers_renders_them(builder, hf_tok):
    for messages in TOOL_CONVERSATIONS + CONVERSATIONS:
        for tools in (TOOLS, None):
            want = hf_tok.apply_chat_template(hf_messages(messages), tools=tools, tokenize=False,
                                              add_generation_prompt=True)
            assert builder.render(messages, tools=tools or ()) == want
    text = builder.render(TOOL_CONVERSATIONS[2], tools=TOOLS)
    assert text.startswith("<|im_start|>system\nS\n\n# Tools\n") and text.count("<|im_start|>system") == 1
    assert json.dumps(TOOLS[0], ensure_ascii=False) in text
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "zoom_in", "arguments": {"quadrant": "top left"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "click", "arguments": {}}\n</tool_call><|im_end|>') in text
    assert ("<|im_start|>user\n<tool_response>\na red triangle\n</tool_response>\n<tool_response>\n"
            "Picture 2: <|vision_start|><|image_pad|><|vision_end|>clicked\n</tool_response><|im_end|>") in text


def test_a_wire_request_with_tools_renders_as_transformers_does(builder, hf_tok):
    body = {"tools": TOOLS, "messages": [
        {"role": "system", "content": "You operate a GUI."},
        {"role": "user", "content": "Click OK, then zoom."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "click", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "ok"}]}]}
    params = parse_chat_request(body, from_dict({}))
    assert params.tools.choice == "auto" and params.tools.parse and params.sampling.grammar is None
    messages = [ChatMessage(m.role, m.parts, m.tool_calls, m.tool_call_id) for m in params.messages]
    want = hf_tok.apply_chat_template(body["messages"], tools=TOOLS, tokenize=True, add_generation_prompt=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert builder.tokenize(messages, tools=params.tools.tools)[0].tolist() == want
    off = parse_chat_request({**body, "tool_choice": "none"}, from_dict({}))
    assert off.tools.tools == () and not off.tools.parse       # "none": the tools are not rendered
