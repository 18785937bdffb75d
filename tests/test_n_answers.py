"""n > 1 answers from one prompt: one prefill, children sharing the prompt's full KV blocks by
reference count, a device-side copy of the partial block, independent seeded sampling streams,
preemption and cancellation. Scheduler bookkeeping with the fake runner first, then the real
engine core (the copy must be right, or the children's answers would differ from the parent's)."""
from __future__ import annotations

import random

import numpy as np
import onnxruntime as ort
import pytest

from runtime import manifest as mf
from runtime.api import ChatMessage, SamplingParams, TextPart
from runtime.engine_config import EngineConfig
from runtime.engine_core import EngineCore
from runtime.kv_cache import BlockManager, device_ops
from runtime.prompt import PromptBuilder
from runtime.scheduler import Scheduler
from runtime.sequence import RequestInputs, RequestState, Sequence
from tests.test_scheduler import BS, assert_all_free, drain, step


def family(prompt_len: int, n: int, max_tokens: int = 5, first: int = 1, **kw) -> list[Sequence]:
    ids = [first] + [10 + i % 40 for i in range(prompt_len - 1)]
    return Sequence.family(ids, SamplingParams(max_tokens=max_tokens, n=n, ignore_eos=True, **kw))


def test_fork_shares_the_prompt_blocks_and_copies_the_partial_one():
    sched = Scheduler(BlockManager(40, BS), max_batch=4, max_tokens_per_step=64)
    seqs = family(18, 4)                      # 18 tokens: 4 full blocks + 2 tokens
    sched.add(seqs[0])
    plan, _ = step(sched)
    # one prefill of all but the last prompt token, nothing sampled yet
    assert [(e.start, e.num_new_tokens, e.needs_logits) for e in plan.entries] == [(0, 17, False)]
    plan, _ = step(sched)
    # the fork: the 4 full blocks shared, the partial block (tokens 16..16 computed) copied
    parent_table = seqs[0].block_table
    assert len(plan.copies) == 3 and {src for src, _ in plan.copies} == {parent_table[4]}
    assert sorted(e.seq_id for e in plan.entries) == sorted(s.seq_id for s in seqs)
    assert all((e.start, e.num_new_tokens, e.needs_logits) == (17, 1, True) for e in plan.entries)
    for s in seqs:
        assert s.block_table[:4] == parent_table[:4] and s.state is RequestState.DECODING
    assert len({s.block_table[4] for s in seqs}) == 4
    assert [sched.bm.blocks[b].ref_count for b in parent_table[:4]] == [4] * 4
    assert sched.bm.num_used_blocks == 4 + 4          # 4 separate requests would hold 4 * 5
    sched.bm.check_integrity(live=sched.running)
    drain(sched)
    assert_all_free(sched)
    assert len({tuple(s.output_token_ids) for s in seqs}) == 1      # the scripted model
    assert all(s.num_output_tokens == 5 for s in seqs)


def test_a_fork_at_a_block_boundary_copies_nothing():
    sched = Scheduler(BlockManager(40, BS), max_batch=4, max_tokens_per_step=64)
    seqs = family(9, 3)                       # the last prompt token starts block 2
    sched.add(seqs[0])
    step(sched)
    plan, _ = step(sched)
    assert plan.copies == () and len(plan.entries) == 3
    assert sched.bm.num_used_blocks == 2 + 3
    drain(sched)
    assert_all_free(sched)


def test_a_one_token_prompt_forks_at_once():
    sched = Scheduler(BlockManager(10, BS), max_batch=2, max_tokens_per_step=8)
    seqs = family(1, 2, max_tokens=3)
    sched.add(seqs[0])
    drain(sched)
    assert_all_free(sched)
    assert [s.num_output_tokens for s in seqs] == [3, 3]


def test_admission_reserves_batch_slots_and_blocks_for_every_answer():
    sched = Scheduler(BlockManager(40, BS), max_batch=3, max_tokens_per_step=64)
    single = family(5, 1, max_tokens=30)[0]
    sched.add(single)
    step(sched)
    fam = family(6, 3)
    sched.add(fam[0])
    for _ in range(5):                        # 1 running + 3 answers > max_batch 3: it waits
        step(sched)
        assert fam[0].state is RequestState.WAITING and len(sched.running) == 1
    drain(sched)
    assert_all_free(sched)
    assert all(s.num_output_tokens == 5 for s in fam)
    with pytest.raises(ValueError, match="max_batch"):
        sched.add(family(4, 4)[0])


def test_cancelling_the_parent_before_the_fork_ends_every_answer():
    sched = Scheduler(BlockManager(40, BS), max_batch=4, max_tokens_per_step=8)
    seqs = family(30, 3)
    sched.add(seqs[0])
    step(sched)                               # prefill chunk 1 of 4
    assert sched.cancel(seqs[0].seq_id)
    assert all(s.state is RequestState.CANCELLED for s in seqs)
    assert {s.seq_id for s in sched.take_family_endings()} == {s.seq_id for s in seqs[1:]}
    assert not sched.cancel(seqs[1].seq_id)
    assert sched.schedule() is None
    assert_all_free(sched)


def test_answers_survive_preemption_and_cancellation_with_straight_books():
    rnd = random.Random(1)
    sched = Scheduler(BlockManager(12, BS), max_batch=4, max_tokens_per_step=12)
    everyone: list[Sequence] = []
    for _ in range(600):
        if rnd.random() < 0.3 and len(sched.waiting) < 3:
            fam = family(rnd.randint(1, 14), rnd.randint(1, 3), max_tokens=rnd.randint(1, 24),
                         first=rnd.randint(0, 5))
            sched.add(fam[0])
            everyone += fam
        live = [s for s in everyone if not s.is_finished]
        if live and rnd.random() < 0.04:
            sched.cancel(rnd.choice(live).seq_id)
        plan, _ = step(sched)                 # check_integrity(live=running) every step
        sched.take_family_endings()
    drain(sched)
    assert_all_free(sched)
    assert sched.num_preemptions > 0
    assert any(s.num_preemptions and s.fork_children == [] and s.sampling.n == 1
               and s.request_id.count("#") for s in everyone), "no child was preempted"
    for seq in everyone:
        assert seq.is_finished
        if seq.state is RequestState.FINISHED:
            for n in range(seq.num_prompt_tokens, seq.num_tokens):
                assert seq.token_ids[n] == 100 + (seq.token_ids[0] * 31 + n * 7) % 50
            assert seq.num_output_tokens == seq.sampling.max_tokens


def test_copy_blocks_copies_whole_blocks_in_place():
    rng = np.random.default_rng(0)
    for data in (rng.standard_normal((6, 4, 2, 3)).astype(np.float32),
                 rng.integers(-128, 127, (6, 4, 2, 3)).astype(np.int8),
                 rng.standard_normal((6, 4, 2, 1)).astype(np.float32)):    # a scale tensor
        value = ort.OrtValue.ortvalue_from_numpy(data.copy())
        ptr = value.data_ptr()
        device_ops.copy_blocks(value, "cpu", np.array([1, 4]), np.array([5, 0]))
        want = data.copy()
        want[5], want[0] = data[1], data[4]
        assert np.array_equal(value.numpy(), want) and value.data_ptr() == ptr
    with pytest.raises(ValueError, match="distinct"):
        device_ops.copy_blocks(value, "cpu", np.array([1, 2]), np.array([2, 3]))


# ---- the real engine core ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def core_and_builder(default_engine_dir):
    m = mf.load_manifest(default_engine_dir)
    core = EngineCore.load(default_engine_dir, m, EngineConfig(max_context=256, max_batch=4), "cpu",
                           dict(m.profile.get("session", {})))
    st = m.special_tokens
    builder = PromptBuilder(str(default_engine_dir / m.tokenizer),
                            (default_engine_dir / m.chat_template).read_text(),
                            image_token_id=st.image_token_id, video_token_id=st.video_token_id,
                            vision_start_token_id=st.vision_start_token_id,
                            vision_end_token_id=st.vision_end_token_id,
                            merge_size=m.preprocessing.merge_size)
    return core, builder


def run_family(core: EngineCore, builder, text: str, **sampling) -> tuple[list[Sequence], int]:
    """Generate to the end, checking the KV books after every step; the peak of used blocks."""
    prompt = builder.build([ChatMessage("user", (TextPart(text),))])
    seqs = Sequence.family(prompt.token_ids.tolist(), SamplingParams(**sampling),
                           inputs=RequestInputs(prompt.position_ids, prompt.rope_delta))
    core.add(seqs[0])
    peak = 0
    for _ in range(500):
        if not core.has_work:
            break
        core.step()
        core.scheduler.check_integrity()
        peak = max(peak, core.block_manager.num_used_blocks)
    assert not core.has_work and core.block_manager.num_used_blocks == 0
    core.block_manager.check_integrity()
    return seqs, peak


LONG = "Describe the picture of a red circle on a white background, in a few words, " * 5


def test_greedy_answers_are_identical_and_share_the_prompt_blocks(core_and_builder):
    core, builder = core_and_builder
    (one,), peak1 = run_family(core, builder, LONG, max_tokens=12, ignore_eos=True)
    core.block_manager.hash_to_block.clear()          # no prefix hits from the first run
    for b in core.block_manager.blocks:
        b.hash, b.token_ids = None, ()
    four, peak4 = run_family(core, builder, LONG, max_tokens=12, ignore_eos=True, n=4)
    assert [s.output_token_ids for s in four] == [one.output_token_ids] * 4
    assert four[0].num_cached_tokens == 0
    prompt_full = (one.num_prompt_tokens - 1) // core.block_manager.block_size
    assert prompt_full >= 5
    # the prompt's full blocks once, plus each answer's own blocks
    assert peak4 == peak1 + 3 * (peak1 - prompt_full)
    assert peak4 < 2 * peak1 < 4 * peak1


def test_seeded_answers_reproduce_and_differ_from_each_other(core_and_builder):
    core, builder = core_and_builder
    kw = dict(max_tokens=16, ignore_eos=True, temperature=1.0, n=3)
    a, _ = run_family(core, builder, "Tell me about shapes.", seed=1234, **kw)
    b, _ = run_family(core, builder, "Tell me about shapes.", seed=1234, **kw)
    c, _ = run_family(core, builder, "Tell me about shapes.", seed=99, **kw)
    outs = [[s.output_token_ids for s in fam] for fam in (a, b, c)]
    assert outs[0] == outs[1]
    assert len({tuple(o) for o in outs[0]}) > 1, "three seeded answers came out identical"
    assert outs[2] != outs[0]


def test_preempted_answers_recompute_the_same_tokens_on_the_real_core(default_engine_dir,
                                                                      core_and_builder):
    _, builder = core_and_builder
    m = mf.load_manifest(default_engine_dir)
    small = EngineCore.load(default_engine_dir, m,
                            EngineConfig(max_context=256, max_batch=4, kv_blocks=9), "cpu",
                            dict(m.profile.get("session", {})))
    (one,), _ = run_family(small, builder, "Say something.", max_tokens=60, ignore_eos=True)
    assert small.scheduler.num_preemptions == 0
    three, peak = run_family(small, builder, "Say something.", max_tokens=60, ignore_eos=True, n=3)
    assert small.scheduler.num_preemptions > 0 and peak <= 9
    assert any(s.num_preemptions for s in three[1:])
    assert [s.output_token_ids for s in three] == [one.output_token_ids] * 3
