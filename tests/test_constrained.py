"""runtime.constrained without an engine: grammars are checked with errors naming the field, masks
forbid exactly what the grammar forbids (inline or from the grammar thread), the tool-call grammar
writes Qwen's format, and a complete grammar ends its request in the scheduler."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from runtime import constrained as C
from runtime.api import InvalidRequest, SamplingParams
from runtime.kv_cache import BlockManager
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence

TOKENIZER = Path(__file__).resolve().parents[1] / "build" / "models" / "default" / "tokenizer.json"
EOS = 1012
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["shape"],
          "properties": {"shape": {"enum": ["circle", "star"]}}}


@pytest.fixture(scope="module")
def cons():
    c = C.Constraints(TOKENIZER.read_text(), 1024, [EOS])
    yield c
    c.close()


def run(cons, grammar, pick, threaded: bool, limit: int = 200):
    """Drive one matcher the way EngineCore does; pick(allowed ids) chooses the token."""
    tok = Tokenizer.from_file(str(TOKENIZER))
    seq = Sequence([1, 2, 3], SamplingParams())
    seq.constraint = cons.matcher(grammar)

    class Entry:
        pass
    e = Entry()
    e.seq, e.seq_id = seq, seq.seq_id
    out = []
    for _ in range(limit):
        if threaded:
            seq.constraint.mask_s = 1.0                # force the grammar-thread path
        cons.begin([e])
        if threaded:
            assert seq.constraint._pending is not None
        logits = np.random.default_rng(len(out)).standard_normal((1, 1024)).astype(np.float32)
        assert cons.apply([e], logits) == []
        allowed = np.flatnonzero(np.isfinite(logits[0]))
        assert allowed.size >= 1
        t = pick(allowed, logits[0])
        cons.advance([e], [t])
        if t == EOS:
            break
        out.append(t)
        if seq.constraint.stopped:
            break
    return tok.decode(out), seq.constraint


@pytest.mark.parametrize("threaded", [False, True], ids=["inline", "grammar-thread"])
def test_masks_allow_only_what_the_schema_allows(cons, threaded):
    g = C.json_schema_grammar(SCHEMA, "response_format.json_schema.schema", "shape")
    rng = np.random.default_rng(0)
    for trial in range(3):              # random choices among the allowed tokens
        text, m = run(cons, g, lambda allowed, row: int(rng.choice(allowed)), threaded)
        assert m.stopped and m.error is None
        obj = json.loads(text)
        assert obj["shape"] in ("circle", "star") and set(obj) == {"shape"}
    text, _ = run(cons, g, lambda allowed, row: int(allowed[np.argmax(row[allowed])]), threaded)
    assert text in ('{"shape": "circle"}', '{"shape": "star"}')      # fixed separators


def test_the_tool_call_grammar_writes_qwens_format(cons):
    params = {"type": "object", "additionalProperties": False, "required": ["q"],
              "properties": {"q": {"enum": ["top left", "bottom right"]}}}
    g = C.tool_call_grammar([("zoom_in", params), ("click", {"type": "object", "properties": {},
                                                              "additionalProperties": False})],
                            parallel=False, where="tools")
    rng = np.random.default_rng(1)
    for _ in range(4):
        text, m = run(cons, g, lambda allowed, row: int(rng.choice(allowed)), False, limit=400)
        assert m.stopped, text
        assert text.startswith("<tool_call>\n{") and text.endswith("}\n</tool_call>")
        call = json.loads(text[len("<tool_call>\n"):-len("\n</tool_call>")])
        assert call["name"] in ("zoom_in", "click") and list(call) == ["name", "arguments"]
        if call["name"] == "zoom_in":
            assert call["arguments"]["q"] in ("top left", "bottom right")
        else:
            assert call["arguments"] == {}


@pytest.mark.parametrize("schema,needle", [
    ([1], "must be a JSON Schema object"), ({"type": "nope"}, "Invalid type"),
    ({"$ref": "#/missing"}, "missing"), ({"type": "string", "pattern": "(["}, "regex"),
])
def test_bad_schemas_name_the_field(schema, needle):
    with pytest.raises(InvalidRequest) as e:
        C.json_schema_grammar(schema, "response_format.json_schema.schema")
    assert str(e.value).startswith("response_format.json_schema.schema") and needle in str(e.value)


def test_a_complete_grammar_finishes_its_request_and_frees_its_blocks(cons):
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, max_batch=2, eos_token_ids=(EOS,))
    seq = Sequence([5, 6, 7], SamplingParams(max_tokens=50))
    seq.constraint = cons.matcher(C.json_object_grammar())
    sched.add(seq)
    plan = sched.schedule()
    for token in Tokenizer.from_file(str(TOKENIZER)).encode("{}", add_special_tokens=False).ids:
        logits = np.zeros((1, 1024), np.float32)
        cons.apply(plan.logit_entries, logits)
        assert np.isfinite(logits[0, token])
        cons.advance(plan.logit_entries, [token])
        sched.postprocess(plan, {seq.seq_id: token})
        cons.finish(plan.logit_entries, sched)
        if seq.is_finished:
            break
        plan = sched.schedule()
    assert seq.finish_reason == "stop" and seq.output_token_ids[-1] != EOS
    assert bm.num_used_blocks == 0


def test_fork_gives_an_independent_matcher(cons):
    m = cons.matcher(C.json_schema_grammar(SCHEMA, "x"))
    m.forbidden()
    ids = Tokenizer.from_file(str(TOKENIZER)).encode('{"shape": "circle"}', add_special_tokens=False).ids
    twin = m.fork()
    for t in ids:
        m.consume(t)
    assert m.stopped and not twin.stopped and twin.error is None
