"""Transformers as the oracle: the same messages through Qwen3VLForConditionalGeneration."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from runtime.api import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart


def png(color, size=(96, 64), shape=None) -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    if shape is not None:
        from PIL import ImageDraw
        ImageDraw.Draw(img).ellipse([10, 10, size[0] - 10, size[1] - 10], fill=color)
    else:
        img.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), color), (size[0] // 4, size[1] // 4))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def request(messages, max_tokens=12, **kw) -> GenerationRequest:
    return GenerationRequest(tuple(messages), SamplingParams(max_tokens=max_tokens, **kw))


def user(*parts) -> ChatMessage:
    return ChatMessage("user", tuple(TextPart(p) if isinstance(p, str) else ImagePart(p) for p in parts))


def to_hf_messages(messages) -> list[dict]:
    """runtime.api messages in transformers' chat-template form (media parts as placeholders)."""
    out = []
    for m in messages:
        content = []
        for p in m.parts:
            if isinstance(p, TextPart):
                content.append({"type": "text", "text": p.text})
            else:
                content.append({"type": "image" if isinstance(p, ImagePart) else "video"})
        out.append({"role": m.role, "content": content})
    return out


class Oracle:
    """Greedy generation in transformers (fp32) for runtime.api messages."""

    def __init__(self, model_dir: Path):
        import torch
        from transformers import AutoTokenizer, Qwen2VLImageProcessorPil, Qwen3VLForConditionalGeneration
        torch.set_num_threads(1)
        self.torch = torch
        self.model = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        cfg = json.loads((model_dir / "preprocessor_config.json").read_text())
        self.proc = Qwen2VLImageProcessorPil(**{k: v for k, v in cfg.items()
                                                if k not in ("image_processor_type", "processor_class")})
        self.image_token_id = self.model.config.image_token_id
        self.merge = int(cfg.get("merge_size", 2))

    def inputs(self, messages):
        hf_msgs = to_hf_messages(messages)
        images = [Image.open(io.BytesIO(p.data)).convert("RGB")
                  for m in messages for p in m.parts if isinstance(p, ImagePart)]
        text = self.tok.apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=True)
        kwargs = {}
        if images:
            out = self.proc(images=images, return_tensors="np")
            grids = out["image_grid_thw"]
            pieces = text.split("<|image_pad|>")
            text = pieces[0] + "".join("<|image_pad|>" * (int(g.prod()) // self.merge ** 2) + rest
                                       for g, rest in zip(grids, pieces[1:]))
            kwargs = dict(pixel_values=self.torch.from_numpy(out["pixel_values"]),
                          image_grid_thw=self.torch.from_numpy(grids))
        ids = np.asarray(self.tok(text)["input_ids"], np.int64)
        if images:
            kwargs["mm_token_type_ids"] = self.torch.from_numpy((ids == self.image_token_id).astype(np.int64))[None]
        return ids, kwargs

    def generate(self, messages, max_new_tokens: int) -> list[int]:
        ids, kwargs = self.inputs(messages)
        with self.torch.no_grad():
            out = self.model.generate(input_ids=self.torch.from_numpy(ids)[None], do_sample=False,
                                      max_new_tokens=max_new_tokens, **kwargs)
        return out[0, len(ids):].tolist()
