"""Constrained decoding with llguidance: grammars for structured output and tool calls, one
matcher per sequence, token masks computed off the decoder's critical path.

    grammar = json_schema_grammar(schema, "response_format.json_schema.schema")  # checked here
    constraints = Constraints(tokenizer_json, vocab_size, eos_token_ids)        # one per engine
    seq.constraint = constraints.matcher(grammar)      # per request, in the worker pool
    constraints.begin(entries)        # before the decoder runs: slow masks start in a thread
    ... the decoder runs (ONNX Runtime and llguidance both release the GIL) ...
    failed = constraints.apply(entries, logits)    # the masks (waited for, or computed inline)
    ... sample ...
    constraints.advance(entries, tokens)           # consume the sampled tokens
    ... scheduler.postprocess ...
    constraints.finish(entries, scheduler)         # a complete grammar ends its request ("stop")

Why llguidance: it needs no torch (numpy bitmasks, a Rust core with Python wheels), builds its
token trie from a `tokenizers` JSON, compiles JSON schemas and Lark grammars (with `%json` inside,
which the tool-call grammar uses) lazily without a per-schema precompilation pass, and is the
backend vLLM and llama.cpp use. xgrammar's Python package requires torch; outlines-core compiles a
schema to a regex-DFA index up front (seconds for large schemas) and has no Lark grammars.

Where a mask is computed: a matcher whose last mask took INLINE_BELOW_S or more (its first one,
which builds lexer state, and big grammars) gets its next mask computed in the grammar threads
while the decoder runs the step (queued just before the graph call, when the loop thread drops the
GIL for ONNX Runtime), and the step waits for it only where it samples that row. A cheaper mask
(llguidance needs 15-80 us for a JSON schema here, 25 us at a 152k vocabulary) is computed inline
just before sampling: a thread hand-off costs more than that (measured: ~1 ms per token on a busy
2-core machine). Rows without a grammar cost nothing either way. The masks use the RAW logits'
shape; anything computed from the raw logits (log-probabilities) must read them before apply().
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import threading
import time
from typing import TYPE_CHECKING, Any, Sequence as Seq

import llguidance as llg
import numpy as np
from llguidance.numpy import fill_next_token_bitmask

from runtime.api import Grammar, InvalidRequest

if TYPE_CHECKING:
    from runtime.scheduler import ScheduledChunk, Scheduler

# Fixed separators, no free whitespace: what json.dumps writes (and Qwen's tool-call example
# shows); a model cannot wander off into endless whitespace. A schema's own "x-guidance" wins.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ERROR_PREFIX = "constrained decoding failed: "
# A mask that took less than this last time is computed inline, just before sampling: handing it
# to a thread costs more (a wake-up and two GIL hand-overs, up to the 1 ms switch interval each on
# a busy CPU) than it hides. Slower ones (a first mask, big grammars) go to the grammar threads.
INLINE_BELOW_S = 0.25e-3
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


def _checked(source: str, where: str, description: str) -> Grammar:
    error = llg.LLMatcher.validate_grammar(source)
    if error:
        raise InvalidRequest(f"{where}: the grammar library refused it: {error.strip()}")
    return Grammar(source, description)


def _schema_options(schema: dict) -> dict:
    return {**schema, "x-guidance": {**JSON_OPTIONS, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: Any, where: str, name: str = "") -> Grammar:
    """A JSON value that validates against `schema` (an object); InvalidRequest names `where`."""
    if not isinstance(schema, dict):
        raise InvalidRequest(f"{where} must be a JSON Schema object")
    try:
        source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"{where}: {e}") from None
    return _checked(source, where, f"json_schema {name or '(unnamed)'}")


def json_object_grammar() -> Grammar:
    """Any JSON object (response_format json_object)."""
    return json_schema_grammar({"type": "object"}, "response_format", "json_object")


def tool_call_grammar(tools: Seq[tuple[str, dict]], parallel: bool, where: str) -> Grammar:
    """One `<tool_call>` block (or several, one per line, when `parallel`) calling one of `tools`
    ((name, parameters schema) pairs) in Qwen's format:
    `<tool_call>\\n{"name": "<name>", "arguments": <arguments>}\\n</tool_call>`."""
    if not tools:
        raise InvalidRequest(f"{where}: no tool to call")
    rules, alts = [], []
    for i, (name, params) in enumerate(tools):
        head = TOOL_CALL_OPEN + '{"name": ' + json.dumps(name) + ', "arguments": '
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + TOOL_CALL_CLOSE)}")
        rules.append(f"args_{i}: %json {json.dumps(_schema_options(params))}")
        alts.append(f"call_{i}")
    start = "start: call (\"\\n\" call)*" if parallel else "start: call"
    lark = "\n".join([start, "call: " + " | ".join(alts), *rules])
    return _checked(llg.LLMatcher.grammar_from_lark(lark), where, "tool call")


@dataclasses.dataclass
class ConstraintStats:
    """Where constrained decoding spends time (seconds, summed; written by the loop thread only):
    `mask_s` computing masks in the worker threads, `wait_s` the loop thread blocked on a mask that
    was not ready, `loop_s` all the loop thread spent in apply + advance (wait included)."""
    masks: int = 0
    mask_s: float = 0.0
    wait_s: float = 0.0
    loop_s: float = 0.0


class Matcher:
    """One sequence's grammar state and its next-token mask (computed in a worker thread).

    The loop thread touches the llguidance matcher only when no mask computation is pending."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int, description: str):
        self._m = matcher
        self.vocab_size = vocab_size
        self.description = description
        self._words = np.zeros((1, (vocab_size + 31) // 32), dtype=np.int32)
        self._pending: concurrent.futures.Future | None = None
        self.stopped = False                  # the grammar is complete: nothing more may follow
        self.error: str | None = None
        self.mask_s = float("inf")            # time of the last mask computation

    def _compute(self) -> np.ndarray:
        """Off the loop thread: the forbidden tokens of the next position, as a bool [V]."""
        t = time.perf_counter()
        fill_next_token_bitmask(self._m, self._words, 0)          # releases the GIL
        allowed = np.unpackbits(self._words.view(np.uint8), bitorder="little")[:self.vocab_size]
        self.mask_s = time.perf_counter() - t
        return allowed == 0

    def schedule(self, pool: concurrent.futures.Executor) -> None:
        """Queue the next mask in the grammar threads, unless it is cheap (INLINE_BELOW_S)."""
        if self._pending is None and not self.stopped and self.error is None \
                and self.mask_s >= INLINE_BELOW_S:
            self._pending = pool.submit(self._compute)

    def forbidden(self) -> np.ndarray | None:
        """Wait for the pending mask; None when the matcher failed (it holds the error)."""
        if self._pending is None:
            self._pending = concurrent.futures.Future()
            self._pending.set_result(self._compute())
        forbidden, self._pending = self._pending.result(), None
        if self._m.is_error():
            self.error = self._m.get_error() or "the matcher failed"
            return None
        if forbidden.all():
            self.error = "the grammar allows no token here"
            return None
        return forbidden

    def consume(self, token: int) -> None:
        if self._pending is not None:        # never consume while a mask is being computed
            self._pending.result()
            self._pending = None
        if not self._m.consume_token(int(token)):
            self.error = self._m.get_error() or f"token {token} was refused"
        elif self._m.is_stopped():
            self.stopped = True

    def fork(self) -> "Matcher":
        """An independent copy (n > 1 choices sharing a prompt)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
        return Matcher(self._m.deep_copy(), self.vocab_size, self.description)


class Constraints:
    """The engine-wide part: llguidance's tokenizer (built once, lazily: ~1 s for a 150k vocab)
    and the mask worker threads."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Seq[int],
                 threads: int = 2):
        self._tokenizer_json, self.vocab_size = tokenizer_json, vocab_size
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self._tokenizer: llg.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="grammar")
        self.stats = ConstraintStats()

    @property
    def tokenizer(self) -> llg.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llg.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                  eos_token=self.eos_token_ids)
                # start the mask threads now (in a worker), not on the loop thread's first submit
                for _ in range(self._pool._max_workers):
                    self._pool.submit(time.sleep, 0.01)
            return self._tokenizer

    def matcher(self, grammar: Grammar) -> Matcher:
        """A fresh matcher for one request, its first mask already computing. Raises
        InvalidRequest when the grammar does not fit this tokenizer. Thread-safe."""
        m = llg.LLMatcher(self.tokenizer, grammar.source, log_level=0)
        if m.is_error():
            raise InvalidRequest(f"{grammar.description}: {m.get_error()}")
        out = Matcher(m, self.vocab_size, grammar.description)
        out.schedule(self._pool)
        return out

    # --- the step hooks (loop thread) ------------------------------------------------------------
    def begin(self, entries: Seq["ScheduledChunk"]) -> None:
        """Queue the masks of constrained rows that have none coming yet (a new or resumed one)."""
        for e in entries:
            if e.seq.constraint is not None:
                e.seq.constraint.schedule(self._pool)

    def apply(self, entries: Seq["ScheduledChunk"], logits: np.ndarray) -> list[tuple[int, str]]:
        """Set each constrained row's forbidden tokens to -inf, in place (logits [B, V], rows in
        `entries` order). Returns (seq_id, error) of rows whose matcher failed; their rows are left
        as they were, and the caller fails those requests."""
        failed, st, t0 = [], self.stats, time.perf_counter()
        for row, e in zip(logits, entries):
            m = e.seq.constraint
            if m is None:
                continue
            t = time.perf_counter()
            forbidden = m.forbidden()
            st.wait_s += time.perf_counter() - t
            st.masks += 1
            st.mask_s += m.mask_s
            if forbidden is None:
                failed.append((e.seq_id, ERROR_PREFIX + str(m.error)))
                continue
            width = min(row.shape[0], forbidden.shape[0])
            np.copyto(row[:width], -np.inf, where=forbidden[:width])
            row[width:] = -np.inf
        st.loop_s += time.perf_counter() - t0
        return failed

    def advance(self, entries: Seq["ScheduledChunk"], tokens: Seq[int]) -> None:
        """Consume each constrained row's sampled token (its next mask is queued by begin())."""
        t0 = time.perf_counter()
        for e, t in zip(entries, tokens):
            m = e.seq.constraint
            if m is not None and m.error is None:
                m.consume(int(t))
        self.stats.loop_s += time.perf_counter() - t0

    @staticmethod
    def finish(entries: Seq["ScheduledChunk"], scheduler: "Scheduler") -> None:
        """After postprocess: a complete grammar ends its request ("stop"), a failed one fails it
        (its KV blocks are freed either way)."""
        for e in entries:
            m = e.seq.constraint
            if m is None or e.seq.is_finished:
                continue
            if m.error is not None:
                scheduler.fail(e.seq_id, ERROR_PREFIX + m.error)
            elif m.stopped:
                scheduler.finish(e.seq_id, "stop")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
