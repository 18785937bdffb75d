"""The default model's accuracy bars with quantised weights (slow: 440 held-out questions per
profile through the appliance, plus transformers fp32 on the same questions).

For cpu-int8 and cpu-int4 (INT8 KV as served): image accuracy >= 95% and video accuracy >= 80%,
as for the fp32 engine, and neither more than 1 point below transformers fp32 on the same weights.
Report: build/cache/quantized_accuracy_<profile>.json."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.conftest import CACHE, build_cached_engine
from tests.test_default_model import MODEL, hf_answers, samples, to_request  # noqa: F401 (fixtures)


def accuracy(answers: list[str], samples, image: bool) -> float:
    from exporter.world.qa import IMAGE_TYPES, is_correct
    return float(np.mean([is_correct(a, s.answer) for a, s in zip(answers, samples)
                          if (s.qtype in IMAGE_TYPES) == image]))


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["cpu-int8", "cpu-int4"])
async def test_quantised_default_model_holds_the_accuracy_bars(profile, samples, hf_answers):  # noqa: F811
    engine = Engine.load(build_cached_engine(MODEL, profile), EngineConfig(kv_mode="int8"))
    await engine.start()
    try:
        answers = []
        for s in samples:
            answers.append("".join([d.text async for d in engine.generate(to_request(s))]).strip())
    finally:
        await engine.stop()
    assert engine.block_manager.num_used_blocks == 0
    report = {"profile": profile, "questions": len(samples),
              "weights": engine.manifest.profile["quantization"]["description"],
              "agreement_with_transformers": float(np.mean([a == h for a, h in zip(answers, hf_answers)])),
              "image_accuracy": accuracy(answers, samples, True),
              "transformers_image_accuracy": accuracy(hf_answers, samples, True),
              "video_accuracy": accuracy(answers, samples, False),
              "transformers_video_accuracy": accuracy(hf_answers, samples, False)}
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"quantized_accuracy_{profile}.json").write_text(json.dumps(report, indent=2))
    print("\n" + json.dumps(report, indent=2))
    assert report["image_accuracy"] >= 0.95 and report["video_accuracy"] >= 0.80
    # a loss of at most 1 point against fp32 (quantisation noise may also flip a few answers right)
    assert report["image_accuracy"] >= report["transformers_image_accuracy"] - 0.01
    assert report["video_accuracy"] >= report["transformers_video_accuracy"] - 0.01
