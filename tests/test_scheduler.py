"""Scheduler with a fake runner: chunked prefill, decode priority, admission, preemption,
cancellation. Every test ends with all KV blocks free again."""
from __future__ import annotations

import random

import numpy as np
import pytest

from runtime.api import SamplingParams
from runtime.kv_cache import BlockManager
from runtime.scheduler import Scheduler, StepPlan
from runtime.sequence import RequestState, Sequence

BS = 4
EOS = 7


def script(seq: Sequence) -> int:
    """The fake model: the next token is a function of the sequence and its length, so a
    recomputed (preempted) request produces the same tokens again."""
    return 100 + (seq.token_ids[0] * 31 + seq.num_tokens * 7) % 50


def step(sched: Scheduler, runner=script, check=True) -> tuple[StepPlan | None, list[Sequence]]:
    plan = sched.schedule()
    if plan is None:
        return None, []
    for e in plan.entries:
        # What the runner relies on: the chunk's tokens, slots inside its table, past = start.
        assert list(e.token_ids) == e.seq.token_ids[e.start:e.start + e.num_new_tokens]
        assert len(e.slots) == e.num_new_tokens
        assert all(s // BS in e.block_table for s in e.slots)
    done = sched.postprocess(plan, {e.seq_id: runner(e.seq) for e in plan.entries if e.needs_logits})
    if check:
        sched.check_integrity()
    return plan, done


def drain(sched: Scheduler, runner=script, limit=1000) -> list[StepPlan]:
    plans = []
    for _ in range(limit):
        plan, _ = step(sched, runner)
        if plan is None:
            return plans
        plans.append(plan)
    raise AssertionError("the scheduler did not drain")


def assert_all_free(sched: Scheduler) -> None:
    sched.check_integrity()
    assert sched.bm.num_free_blocks == sched.bm.num_blocks
    assert not sched.running and not sched.waiting


def entries(plan: StepPlan) -> list[tuple[int, int, int, bool]]:
    return [(e.seq_id, e.start, e.num_new_tokens, e.needs_logits) for e in plan.entries]


def new(prompt_len, first=1, max_tokens=5, **kw):
    return Sequence([first] + [10 + i % 40 for i in range(prompt_len - 1)],
                    SamplingParams(max_tokens=max_tokens, **kw))


def test_one_request_prefill_then_decode():
    sched = Scheduler(BlockManager(11, BS), max_batch=4, max_tokens_per_step=512)
    seq = new(10, max_tokens=3)
    sched.add(seq)
    plan, _ = step(sched)
    (e,) = plan.entries
    assert (e.start, e.num_new_tokens, e.needs_logits, e.is_prefill) == (0, 10, True, True)
    assert e.block_table == (0, 1, 2)
    assert e.slots.tolist() == list(range(10))
    assert seq.state is RequestState.DECODING and seq.num_output_tokens == 1
    plan, _ = step(sched)
    (e,) = plan.entries
    assert (e.start, e.num_new_tokens, e.token_ids, e.is_prefill) == (10, 1, (seq.token_ids[10],), False)
    assert e.slots.tolist() == [10]
    plan, done = step(sched)
    assert plan.entries[0].slots.tolist() == [11]
    assert done == [seq] and seq.finish_reason == "length" and seq.num_output_tokens == 3
    assert seq.state is RequestState.FINISHED and seq.first_token_time is not None
    assert step(sched)[0] is None
    assert_all_free(sched)


def test_chunked_prefill_interleaves_with_running_decodes():
    sched = Scheduler(BlockManager(11, BS), max_batch=4, max_tokens_per_step=8)
    a = new(4, first=1, max_tokens=10)
    sched.add(a)
    step(sched)                                   # a prefilled, first token sampled
    b = new(20, first=2, max_tokens=2)
    sched.add(b)
    p1, _ = step(sched)
    assert entries(p1) == [(a.seq_id, 4, 1, True), (b.seq_id, 0, 7, False)]
    assert b.state is RequestState.PREFILLING and b.num_output_tokens == 0
    p2, _ = step(sched)
    assert entries(p2) == [(a.seq_id, 5, 1, True), (b.seq_id, 7, 7, False)]
    p3, _ = step(sched)
    assert entries(p3) == [(a.seq_id, 6, 1, True), (b.seq_id, 14, 6, True)]
    assert b.state is RequestState.DECODING and b.num_output_tokens == 1
    p4, _ = step(sched)
    assert entries(p4) == [(a.seq_id, 7, 1, True), (b.seq_id, 20, 1, True)]
    drain(sched)
    assert a.num_output_tokens == 10 and b.num_output_tokens == 2
    assert_all_free(sched)


def test_admission_waits_for_blocks():
    sched = Scheduler(BlockManager(11, BS), max_batch=4, max_tokens_per_step=512)
    a = new(30, first=1, max_tokens=2)            # 8 blocks (+ 1 to decode)
    b = new(16, first=2, max_tokens=1)            # 4 blocks
    sched.add(a)
    sched.add(b)
    p1, _ = step(sched)
    assert [e.seq for e in p1.entries] == [a] and list(sched.waiting) == [b]
    assert sched.bm.num_free_blocks == 3
    p2, done = step(sched)                        # a decodes its last token and finishes
    assert [e.seq for e in p2.entries] == [a] and done == [a]
    p3, _ = step(sched)
    assert [e.seq for e in p3.entries] == [b]
    assert p3.entries[0].block_table == (8, 9, 10, 7) and b.num_cached_tokens == 0
    drain(sched)
    assert_all_free(sched)


def test_a_prompt_the_pool_can_never_hold_ends_without_blocks():
    """The engine checks prompts against its context (pool included) before `add`; should one
    reach the scheduler anyway, it ends with "length" at planning and never holds a block."""
    sched = Scheduler(BlockManager(11, BS), max_batch=1)
    seq = new(44)                                 # 44 + 1 > 11 * 4
    sched.add(seq)
    plan, _ = step(sched)
    assert plan is not None and plan.finished == (seq,) and seq.finish_reason == "length"
    assert seq.block_table == [] and not sched.has_work
    assert_all_free(sched)


def test_random_arrivals_and_departures_keep_the_books_straight():
    rnd = random.Random(0)
    sched = Scheduler(BlockManager(11, BS), max_batch=3, max_tokens_per_step=10)
    everyone = []
    for t in range(400):
        if rnd.random() < 0.3:
            seq = new(rnd.randint(1, 25), first=rnd.randint(0, 5), max_tokens=rnd.randint(1, 12))
            if len(sched.waiting) < 4:            # the engine's admission bound
                sched.add(seq)
                everyone.append(seq)
        live = [s for s in everyone if not s.is_finished]
        if live and rnd.random() < 0.05:
            sched.cancel(rnd.choice(live).seq_id)
        plan, _ = step(sched)
        if plan is not None:
            assert plan.num_tokens <= 10 and len({e.seq_id for e in plan.entries}) == len(plan.entries)
            assert len(sched.running) <= 3
            used = {b for s in sched.running for b in s.block_table}
            assert sched.bm.num_used_blocks == len(used)
    drain(sched)
    assert_all_free(sched)
    assert len(everyone) > 20
    for seq in everyone:
        assert seq.is_finished
        if seq.state is RequestState.FINISHED:
            # Each generated token is the scripted one for the tokens before it.
            for n in range(seq.num_prompt_tokens, seq.num_tokens):
                assert seq.token_ids[n] == 100 + (seq.token_ids[0] * 31 + n * 7) % 50
            assert seq.finish_reason == "length"
            assert seq.num_output_tokens == seq.sampling.max_tokens
    assert any(s.state is RequestState.CANCELLED for s in everyone)
    assert sched.num_preemptions > 0


def test_state_transitions_are_enforced():
    from runtime.sequence import InvalidTransition
    seq = new(3)
    with pytest.raises(InvalidTransition):
        seq.set_state(RequestState.DECODING)
    seq.set_state(RequestState.CANCELLED)
    with pytest.raises(InvalidTransition):
        seq.set_state(RequestState.WAITING)
    assert np.array_equal(Sequence([1, 2]).slot_mapping(0, 0, BS), np.zeros(0))
