"""Chat messages -> prompt token ids with expanded visual placeholders and MRoPE positions.

Same result as transformers' `tokenizer.apply_chat_template(..., add_generation_prompt=True)`
followed by `Qwen3VLProcessor`'s placeholder expansion:
- the template is rendered with jinja2 in an immutable sandbox with what transformers provides
  (trim_blocks, lstrip_blocks, loopcontrols, `raise_exception`, `strftime_now`, a non-escaping
  `tojson`, `dict`, `namespace`) and the tokenizer's special tokens as variables;
- each `<|image_pad|>` becomes grid.prod() / merge**2 image pad tokens;
- each video becomes, per temporal group i, `<{timestamps[i]:.1f} seconds>` + vision_start +
  (h*w / merge**2) video pads + vision_end. Qwen's original processor (transformers 4.57,
  qwen-vl-utils) replaced the template's whole `<|vision_start|><|video_pad|><|vision_end|>` with
  that; transformers 5.x replaces only `<|video_pad|>` and so keeps an outer start/end pair.
  `video_outer_wrapper` picks the 5.x layout; the default is the original one the model was
  trained with.

Text is tokenized per segment between placeholders: every cut sits next to a special token, which
the tokenizer splits out before normalisation and pre-tokenisation, so the ids are those of the
whole expanded string, without tokenizing thousands of pad tokens.
"""
from __future__ import annotations

import dataclasses
import json
import re
from datetime import datetime
from typing import Mapping, Sequence

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from runtime.api import ChatMessage, ImagePart, InvalidRequest, PromptTooLong, TextPart, VideoPart
from runtime.rope_index import get_rope_index
from runtime.sequence import MediaSpan

IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclasses.dataclass(frozen=True)
class MediaLayout:
    """What the prompt needs to know about one image or video, in the order they appear."""
    kind: str                            # "image" or "video"
    grid_thw: tuple[int, int, int]       # patch grid from the preprocessor
    timestamps: tuple[float, ...] = ()   # videos: seconds of each temporal group (grid t of them)


@dataclasses.dataclass(frozen=True)
class Prompt:
    token_ids: np.ndarray                # i64[S]
    position_ids: np.ndarray             # i64[3, S] (MRoPE: temporal, height, width)
    rope_delta: int                      # decode position of token n is n + rope_delta
    media: tuple[MediaSpan, ...]         # one per MediaLayout, same order
    text: str                            # the rendered template before expansion

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)


def _compile_template(source: str) -> jinja2.Template:
    """transformers' chat-template environment (utils/chat_template_utils.py), minus the
    {% generation %} tracker, which only matters for training masks."""
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class Namespace(jinja2.utils.Namespace):
        def __setitem__(self, name, value):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")
            super().__setitem__(name, value)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=lambda *a, **k: dict(*a, **k), namespace=Namespace)
    return env.from_string(source)


def message_dicts(messages: Sequence[ChatMessage]) -> list[dict]:
    """The OpenAI/transformers message form the template reads. A message of text only becomes a
    plain string (parts joined with nothing, as Qwen templates join list parts); an assistant's
    tool calls and a tool message's call id travel in OpenAI's shape."""
    out = []
    for m in messages:
        if all(isinstance(p, TextPart) for p in m.parts):
            d = {"role": m.role, "content": "".join(p.text for p in m.parts)}
        else:
            content = []
            for p in m.parts:
                if isinstance(p, TextPart):
                    content.append({"type": "text", "text": p.text})
                elif isinstance(p, ImagePart):
                    content.append({"type": "image"})
                elif isinstance(p, VideoPart):
                    content.append({"type": "video"})
                else:
                    raise InvalidRequest(f"unsupported message part {type(p).__name__}")
            d = {"role": m.role, "content": content}
        if m.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in m.tool_calls]
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def media_kinds(messages: Sequence[ChatMessage]) -> list[str]:
    return [("image" if isinstance(p, ImagePart) else "video") for m in messages for p in m.parts
            if isinstance(p, (ImagePart, VideoPart))]


class PromptBuilder:
    """Renders, tokenizes and expands prompts for one engine. Thread-safe (no mutable state)."""

    def __init__(self, tokenizer_json_path: str, chat_template: str, *, image_token_id: int,
                 video_token_id: int, vision_start_token_id: int, vision_end_token_id: int,
                 merge_size: int, template_vars: Mapping[str, str] | None = None,
                 video_outer_wrapper: bool = False):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json_path))
        self.template = _compile_template(chat_template)
        self.image_token_id, self.video_token_id = image_token_id, video_token_id
        self.vision_start_token_id, self.vision_end_token_id = vision_start_token_id, vision_end_token_id
        self.merge_size = merge_size
        self.template_vars = dict(template_vars or {})
        self.video_outer_wrapper = video_outer_wrapper
        for token, tid in ((IMAGE_PAD, image_token_id), (VIDEO_PAD, video_token_id),
                           (VISION_START, vision_start_token_id), (VISION_END, vision_end_token_id)):
            if self.tokenizer.token_to_id(token) != tid:
                raise ValueError(f"tokenizer maps {token} to {self.tokenizer.token_to_id(token)}, "
                                 f"the engine says {tid}")
        video = re.escape(VIDEO_PAD) if video_outer_wrapper else \
            f"(?:{re.escape(VISION_START + VIDEO_PAD + VISION_END)}|{re.escape(VIDEO_PAD)})"
        self._placeholder = re.compile(f"(?P<image>{re.escape(IMAGE_PAD)})|(?P<video>{video})")

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True,
               tools: Sequence[dict] = ()) -> str:
        """The template's text; `tools` (OpenAI tool objects) go to the template as transformers'
        apply_chat_template(tools=...) passes them (None when there are none)."""
        try:
            return self.template.render(messages=message_dicts(messages), tools=list(tools) or None,
                                        documents=None, add_generation_prompt=add_generation_prompt,
                                        **self.template_vars)
        except jinja2.exceptions.TemplateError as e:
            raise InvalidRequest(f"the chat template rejected these messages: {e}") from e

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids if text else []

    def _video_pieces(self, layout: MediaLayout) -> list[list[int] | tuple[int, int]]:
        """Per temporal group: timestamp text ids, vision_start, (pad id, count), vision_end."""
        t, h, w = layout.grid_thw
        if len(layout.timestamps) != t:
            raise InvalidRequest(f"video grid has {t} temporal groups but {len(layout.timestamps)} "
                                 f"timestamps were given")
        per_group = h * w // self.merge_size ** 2
        pieces: list = []
        for ts in layout.timestamps:
            pieces += [self._encode(f"<{ts:.1f} seconds>"), [self.vision_start_token_id],
                       (self.video_token_id, per_group), [self.vision_end_token_id]]
        return pieces

    def tokenize(self, messages: Sequence[ChatMessage], media: Sequence[MediaLayout] = (),
                 tools: Sequence[dict] = ()) -> tuple[np.ndarray, tuple[MediaSpan, ...], str]:
        """(token ids i64[S], media spans, rendered text): `build` without positions."""
        kinds = media_kinds(messages)
        if kinds != [m.kind for m in media]:
            raise InvalidRequest(f"messages hold media {kinds} but layouts were given for "
                                 f"{[m.kind for m in media]}")
        text = self.render(messages, tools=tools)
        matches = list(self._placeholder.finditer(text))
        if [m.lastgroup for m in matches] != kinds:
            raise InvalidRequest(f"the rendered prompt has placeholders "
                                 f"{[m.lastgroup for m in matches]} for media {kinds} (is a "
                                 f"placeholder token typed in the text?)")
        chunks: list[np.ndarray] = []
        spans, pos, last = [], 0, 0

        def emit(piece) -> tuple[int, int]:
            """Append ids (a list) or a run of one id ((id, count)); return its [start, end)."""
            nonlocal pos
            arr = (np.full(piece[1], piece[0], np.int64) if isinstance(piece, tuple)
                   else np.asarray(piece, np.int64))
            chunks.append(arr)
            pos += arr.size
            return pos - arr.size, pos

        for match, layout in zip(matches, media):
            emit(self._encode(text[last:match.start()]))
            last = match.end()
            start = pos
            if layout.kind == "image":
                pieces = [(self.image_token_id, int(np.prod(layout.grid_thw)) // self.merge_size ** 2)]
            else:
                pieces = self._video_pieces(layout)
            runs = []
            for piece in pieces:
                span = emit(piece)
                if isinstance(piece, tuple):
                    runs.append(span)
            spans.append(MediaSpan(start, pos, kind=layout.kind, runs=tuple(runs)))
        emit(self._encode(text[last:]))
        return np.concatenate(chunks), tuple(spans), text

    def build(self, messages: Sequence[ChatMessage], media: Sequence[MediaLayout] = (),
              max_tokens: int | None = None, tools: Sequence[dict] = ()) -> Prompt:
        """Prompt for `messages`; `media` lists each image/video part's layout in message order.
        Raises InvalidRequest when they disagree, PromptTooLong above `max_tokens`."""
        token_ids, spans, text = self.tokenize(messages, media, tools)
        check_length(token_ids.size, max_tokens)
        position_ids, rope_delta = get_rope_index(
            token_ids, [m.grid_thw for m in media if m.kind == "image"],
            [m.grid_thw for m in media if m.kind == "video"], image_token_id=self.image_token_id,
            video_token_id=self.video_token_id, merge_size=self.merge_size)
        return Prompt(token_ids, position_ids, rope_delta, spans, text)

def check_length(num_prompt_tokens: int, max_tokens: int | None) -> None:
    """Raise PromptTooLong when a prompt exceeds what the engine accepts."""
    if max_tokens is not None and num_prompt_tokens > max_tokens:
        raise PromptTooLong(f"the prompt has {num_prompt_tokens} tokens, this engine takes at "
                            f"most {max_tokens}")
