"""The embedded default model through the appliance (engine + runtime, INT8 KV, default profile)
against the same weights in transformers (fp32) on held-out questions of the synthetic world.

Asserted: the appliance gives transformers' answers (per-question agreement), and INT8 KV agrees
with FP KV on >= 99% of greedy tokens (teacher-forced). Reported (build/cache/default_model_report.json
and stdout): task accuracy of both. The task bars of the default-model issue (>= 95% image, >= 80%
video) are not asserted here: the current model does not reach them (see the README's model card)."""
from __future__ import annotations

import io
import json

import av
import numpy as np
import pytest

from runtime.api import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart, VideoPart
from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from runtime.evaluation import compare, teacher_forced_logits
from tests.conftest import CACHE, ROOT

PER_TYPE_IMAGE, PER_TYPE_VIDEO = 8, 4
MODEL = ROOT / "build" / "models" / "default"


def png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def mp4(frames, fps) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = frames[0].width, frames[0].height, "yuv444p"
        stream.options = {"crf": "0", "preset": "ultrafast", "g": "1"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_image(f).reformat(format="yuv444p")))
        out.mux(stream.encode())
    return buf.getvalue()


def to_request(sample, max_tokens=24) -> GenerationRequest:
    media = sample.media()
    part = (ImagePart(png(media)) if sample.modality == "image"
            else VideoPart(mp4(media, sample.clip.fps)))
    return GenerationRequest((ChatMessage("user", (part, TextPart(sample.question))),),
                             SamplingParams(max_tokens=max_tokens))


@pytest.fixture(scope="module")
def samples():
    from exporter.world.qa import heldout_image_set, heldout_video_set
    return heldout_image_set(PER_TYPE_IMAGE) + heldout_video_set(PER_TYPE_VIDEO)


@pytest.fixture(scope="module")
def hf_answers(samples):
    from exporter.evaluate import answer, load
    from exporter.world.encode import image_processor
    model, tok, pre, vpre = load(MODEL, threads=1)
    improc = image_processor(pre)
    return [answer(model, tok, s, pre, vpre, improc) for s in samples]


@pytest.fixture(scope="module")
async def appliance(default_engine_dir, samples):
    engine = Engine.load(default_engine_dir, EngineConfig(kv_mode="int8"))
    fp = Engine.load(default_engine_dir, EngineConfig(kv_mode="float"))
    await engine.start()
    await fp.start()
    answers, fp_tokens = [], []
    for s in samples:
        req = to_request(s)
        deltas = [d async for d in engine.generate(req)]
        answers.append("".join(d.text for d in deltas).strip())
        fp_tokens.append([t async for d in fp.generate(req) for t in d.token_ids])
    yield engine, fp, answers, fp_tokens
    await engine.stop()
    await fp.stop()
    assert engine.block_manager.num_used_blocks == 0 and fp.block_manager.num_used_blocks == 0


def test_appliance_answers_like_transformers(samples, hf_answers, appliance):
    from exporter.world.qa import IMAGE_TYPES, is_correct
    _, _, answers, _ = appliance
    same = [a == h for a, h in zip(answers, hf_answers)]
    acc = lambda got, kind: float(np.mean([is_correct(g, s.answer) for g, s in zip(got, samples)  # noqa: E731
                                          if (s.qtype in IMAGE_TYPES) == (kind == "image")]))
    report = {"questions": len(samples), "agreement_with_transformers": float(np.mean(same)),
              "appliance_image_accuracy": acc(answers, "image"), "transformers_image_accuracy": acc(hf_answers, "image"),
              "appliance_video_accuracy": acc(answers, "video"), "transformers_video_accuracy": acc(hf_answers, "video")}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "default_model_report.json").write_text(json.dumps(report, indent=2))
    print("\n" + json.dumps(report, indent=2))
    image_same = [x for x, s in zip(same, samples) if s.qtype in IMAGE_TYPES]
    # images go through the same pixels both ways: the INT8 appliance must give transformers' answers
    assert np.mean(image_same) >= 0.95
    assert abs(report["appliance_image_accuracy"] - report["transformers_image_accuracy"]) <= 0.05


async def test_int8_kv_agrees_with_fp_kv_on_the_default_model(samples, appliance):
    engine, fp, _, fp_tokens = appliance
    fp_logits, q_logits = [], []
    for s, cont in list(zip(samples, fp_tokens))[::3]:
        req = to_request(s)
        fp_logits.append(teacher_forced_logits(fp, req, cont))
        q_logits.append(teacher_forced_logits(engine, req, cont))
    result = compare(fp_logits, q_logits)
    print(f"\nINT8 vs FP KV on the default model ({result.positions} positions): greedy agreement "
          f"{result.greedy_agreement:.2%}, mean KL {result.mean_kl:.2e}, max KL {result.max_kl:.2e}")
    assert result.greedy_agreement >= 0.99
