"""INT8 KV vs FP KV on the default model, teacher-forced on the FP engine's greedy answers:
greedy agreement and KL are reported (the bar is set by the trained default model's tests)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.kv_comparison import compare, teacher_forced_logits
from tests.conftest import CACHE
from tests.oracle_helpers import png, request, user

PROMPTS = [
    [user("Hello! What can you do?")],
    [user(png((255, 0, 0)), "What shape is this?")],
    [user(png((0, 0, 255), (64, 96), shape="circle"), "What colour is the shape?")],
    [user(png((0, 160, 0), (128, 96)), png((255, 255, 0)), "How many shapes are there?")],
]


@pytest.fixture(scope="module")
async def engines(default_engine_dir):
    fp = Engine.load(default_engine_dir, EngineConfig(kv_mode="float"))
    q = Engine.load(default_engine_dir, EngineConfig(kv_mode="int8"))
    await fp.start()
    yield fp, q
    await fp.stop()


async def answers(engine, n=16):
    out = []
    for messages in PROMPTS:
        out.append([t async for d in engine.generate(request(messages, n)) for t in d.token_ids])
    return out


@pytest.fixture(scope="module")
async def report(engines):
    fp, q = engines
    conts = await answers(fp)
    fp_logits, q_logits = [], []
    for messages, cont in zip(PROMPTS, conts):
        fp_logits.append(teacher_forced_logits(fp, request(messages), cont))
        q_logits.append(teacher_forced_logits(q, request(messages), cont))
    result = compare(fp_logits, q_logits)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "int8_kv_report.json").write_text(json.dumps(result.__dict__, indent=2))
    print(f"\nINT8 vs FP KV (teacher-forced, {result.positions} positions): greedy agreement "
          f"{result.greedy_agreement:.2%}, mean KL {result.mean_kl:.2e}, max KL {result.max_kl:.2e}, "
          f"max |logit diff| {result.max_abs_logit_diff:.2e}")
    return result, fp_logits, conts


async def test_teacher_forced_logits_follow_generation(report):
    """The FP teacher-forced argmax reproduces the FP engine's own greedy tokens."""
    _, fp_logits, conts = report
    for logits, cont in zip(fp_logits, conts):
        assert list(logits[:len(cont)].argmax(-1)) == cont


async def test_int8_report_is_well_formed(report):
    result, fp_logits, _ = report
    assert result.positions == sum(len(x) for x in fp_logits)
    assert np.isfinite(result.mean_kl) and result.mean_kl >= 0 and result.max_kl >= result.mean_kl
    assert 0.0 <= result.greedy_agreement <= 1.0
    # INT8 really quantises: the logits move, but only slightly
    assert 0 < result.max_abs_logit_diff < 1.0
