"""What a newcomer sends, through the appliance (engine + runtime, INT8 KV): drawings from the
robustness evaluation's own generator (exporter.world.sketches: numpy-rasterised, styles and seeds
training never draws), asked with the image first and with the text first, several pictures in one
turn, and follow-up questions in a later turn (exporter.robustness). The model card's bar:
>= 95% on shape and colour questions in each order. Report: build/cache/robustness_report.json."""
from __future__ import annotations

import json

import pytest

from runtime.engine import Engine
from runtime.engine_config import EngineConfig
from tests.conftest import CACHE
from tests.world_requests import to_request

PER_CELL, MULTI_PER_TYPE = 4, 6           # 13 styles x 2 types x 2 orders x 4 + 5 x 2 x 6 = 268


@pytest.fixture(scope="module")
async def report(default_engine_dir):
    from exporter.robustness import robustness_set, score
    items = robustness_set(PER_CELL, MULTI_PER_TYPE)
    engine = Engine.load(default_engine_dir, EngineConfig(kv_mode="int8"))
    await engine.start()
    answers = []
    try:
        for it in items:
            deltas = [d async for d in engine.generate(to_request(it.sample))]
            answers.append("".join(d.text for d in deltas).strip())
    finally:
        await engine.stop()
    assert engine.block_manager.num_used_blocks == 0
    rep = score(items, answers)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "robustness_report.json").write_text(json.dumps(rep, indent=2))
    print("\n" + json.dumps({k: v for k, v in rep.items() if k != "failures"}, indent=2))
    return rep


# Floors under the shipped model's measured accuracy (README model card), so a regression fails;
# the issue's bar (95% in both orders) is not reached yet and is recorded as a strict xfail.
FLOORS = {"image first": 0.93, "text first": 0.91}     # measured: 95.2%, 93.3%


@pytest.mark.parametrize("order", ["image first", "text first"])
def test_shape_and_colour_in_either_part_order_hold_their_floor(report, order):
    assert report["shape_colour_order"][order] >= FLOORS[order], report["failures"][:10]


@pytest.mark.xfail(strict=True, reason="the default model is not yet at 95% with the text first "
                                       "(README model card: robustness)")
def test_shape_and_colour_reach_the_issue_bar_in_both_orders(report):
    assert min(report["shape_colour_order"].values()) >= 0.95


def test_a_follow_up_turn_about_an_earlier_image_is_answered(report):
    t = report["type"]
    assert (t["followup_shape"] + t["followup_colour"]) / 2 >= 0.9      # measured: 95.8%
