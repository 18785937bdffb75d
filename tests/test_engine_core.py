"""EngineCore without asyncio: step() in, StepResult out, on the real default engine."""
from __future__ import annotations

import pytest

from runtime import manifest as mf
from runtime.api import SamplingParams
from runtime.engine_config import EngineConfig
from runtime.engine_core import EngineCore
from runtime.prompt import PromptBuilder
from runtime.sequence import RequestInputs, Sequence


@pytest.fixture(scope="module")
def core_and_prompt(default_engine_dir):
    m = mf.load_manifest(default_engine_dir)
    core = EngineCore.load(default_engine_dir, m, EngineConfig(max_context=256, max_batch=2), "cpu",
                           dict(m.profile.get("session", {})))
    st = m.special_tokens
    builder = PromptBuilder(str(default_engine_dir / m.tokenizer),
                            (default_engine_dir / m.chat_template).read_text(),
                            image_token_id=st.image_token_id, video_token_id=st.video_token_id,
                            vision_start_token_id=st.vision_start_token_id,
                            vision_end_token_id=st.vision_end_token_id,
                            merge_size=m.preprocessing.merge_size)
    from runtime.api import ChatMessage, TextPart
    prompt = builder.build([ChatMessage("user", (TextPart("Hello"),))])
    return core, prompt


def new_seq(prompt, max_tokens, **kw) -> Sequence:
    return Sequence(prompt.token_ids.tolist(), SamplingParams(max_tokens=max_tokens, **kw),
                    inputs=RequestInputs(prompt.position_ids, prompt.rope_delta))


def run_to_end(core: EngineCore, limit: int = 500) -> dict[int, list]:
    outputs: dict[int, list] = {}
    for _ in range(limit):
        if not core.has_work:
            break
        for out in core.step().outputs:
            outputs.setdefault(out.seq_id, []).append(out)
    return outputs


def test_step_by_step_generation_and_endings(core_and_prompt):
    core, prompt = core_and_prompt
    a, b = new_seq(prompt, 5, ignore_eos=True), new_seq(prompt, 3, ignore_eos=True)
    core.add(a)
    core.add(b)
    first = core.step()
    assert first.ran and first.num_scheduled_tokens == 2 * len(prompt.token_ids)
    assert {o.seq_id for o in first.outputs} == {a.seq_id, b.seq_id}
    assert all(len(o.new_token_ids) == 1 for o in first.outputs)
    outs = run_to_end(core)
    assert outs[b.seq_id][-1].finish_reason == "length" and outs[a.seq_id][-1].finish_reason == "length"
    tokens_a = [t for o in first.outputs if o.seq_id == a.seq_id for t in o.new_token_ids] + \
               [t for o in outs[a.seq_id] for t in o.new_token_ids]
    assert tokens_a == a.output_token_ids and len(tokens_a) == 5
    assert core.block_manager.num_used_blocks == 0
    core.scheduler.check_integrity()


def test_abort_frees_blocks_at_once(core_and_prompt):
    core, prompt = core_and_prompt
    seq = new_seq(prompt, 100, ignore_eos=True)
    core.add(seq)
    core.step()
    assert core.block_manager.num_used_blocks > 0
    assert core.abort(seq.seq_id)
    assert core.block_manager.num_used_blocks == 0 and not core.has_work
    assert not core.abort(seq.seq_id)


def test_a_failing_step_fails_its_requests_and_the_core_goes_on(core_and_prompt):
    core, prompt = core_and_prompt
    real = core.runner.session

    class Broken:
        def __getattr__(self, name):
            if name.startswith("run"):
                def boom(*a, **k):
                    raise RuntimeError("injected")
                return boom
            return getattr(real, name)
    seq = new_seq(prompt, 4)
    core.add(seq)
    core.runner.session = Broken()
    try:
        result = core.step()
    finally:
        core.runner.session = real
    (out,) = result.outputs
    assert out.finish_reason == "error" and "injected" in out.error
    assert core.block_manager.num_used_blocks == 0 and not core.has_work
    again = new_seq(prompt, 2)
    core.add(again)
    assert run_to_end(core)[again.seq_id][-1].finish_reason in ("stop", "length")


def test_on_launch_runs_once_just_before_each_steps_graph_call(core_and_prompt):
    """The engine loop hands the previous step's tokens over in on_launch: it must come after the
    step's inputs are built and before the graph runs, once per step (a step with a prefill and
    decode rows makes two graph calls), and never for a step that runs no graph."""
    core, prompt = core_and_prompt
    binding = core.runner.binding
    events: list[str] = []
    real_run = binding.session.run_with_iobinding
    binding.session.run_with_iobinding = lambda io: (events.append("graph"), real_run(io))[1]
    try:
        a = new_seq(prompt, 4, ignore_eos=True)
        core.add(a)
        core.step(on_launch=lambda: events.append("launch"))        # a's prefill
        core.add(new_seq(prompt, 2, ignore_eos=True))
        core.step(on_launch=lambda: events.append("launch"))        # b's prefill + a's decode
        assert events == ["launch", "graph", "launch", "graph", "graph"]
        while core.has_work:
            core.step()
        events.clear()
        assert core.step(on_launch=lambda: events.append("launch")).outputs == () and events == []
    finally:
        del binding.session.run_with_iobinding
    assert core.block_manager.num_used_blocks == 0
