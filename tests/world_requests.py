"""World samples (exporter.world.qa.Sample) as the appliance's GenerationRequests: every image as
a PNG part, a clip as a lossless MP4, parts in the sample's order (media first, or the text first),
and an earlier exchange as two more turns."""
from __future__ import annotations

import io

from runtime.api import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart, VideoPart
from tests.media_fixtures import encode_frames


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def to_request(sample, max_tokens: int = 24) -> GenerationRequest:
    if sample.modality == "image":
        media = [ImagePart(png(img)) for img in sample.images()]
    elif sample.modality == "video":
        media = [VideoPart(encode_frames(sample.media(), sample.clip.fps))]
    else:
        media = []
    text = TextPart(sample.earlier[0] if sample.earlier else sample.question)
    parts = (text, *media) if sample.text_first else (*media, text)
    messages = [ChatMessage("user", tuple(parts))]
    if sample.earlier:
        messages += [ChatMessage("assistant", (TextPart(sample.earlier[1]),)),
                     ChatMessage("user", (TextPart(sample.question),))]
    return GenerationRequest(tuple(messages), SamplingParams(max_tokens=max_tokens))
