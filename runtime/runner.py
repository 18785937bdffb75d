"""The model runner: executes one scheduled step of the decoder graph over the paged KV pool.

It only executes what it is handed: for each scheduled chunk of a sequence it builds the input
embeddings (token table + the request's visual embeddings at its placeholder positions), the
MRoPE positions, the DeepStack features and the new tokens' flat slots, and runs decoder.onnx for
the batch through I/O binding. The pool's device values are bound once, as both the graph's pool
inputs and its updated-pool outputs, so the graph writes the new tokens' keys/values in place and
nothing of the pool's size crosses the host: a step moves the small per-step inputs in and the
logits out (`DecoderBinding.last_io` counts those bytes).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable

import numpy as np
import onnxruntime as ort

from runtime import manifest as mf
from runtime.kv_cache import KVPool
from runtime.scheduler import ScheduledChunk as Chunk
from runtime.sequence import Sequence


@dataclasses.dataclass
class Visual:
    """A request's visual inputs, aligned with its prompt: row index per prompt token (-1 = text)."""
    index: np.ndarray            # i64[num_prompt_tokens]
    embeds: np.ndarray           # [n_visual, H]
    deepstack: np.ndarray        # [NDS, n_visual, H]


def positions_for(seq: Sequence, start: int, n: int) -> np.ndarray:
    """MRoPE positions [3, n]: the prompt's from get_rope_index, then text positions after it."""
    prompt_pos: np.ndarray = seq.inputs.positions
    delta: int = seq.inputs.rope_delta
    p = prompt_pos.shape[1]
    out = np.empty((3, n), np.int64)
    k = max(0, min(n, p - start))
    out[:, :k] = prompt_pos[:, start:start + k]
    out[:, k:] = np.arange(start + k, start + n, dtype=np.int64) + delta
    return out


_I64 = np.dtype(np.int64)


@dataclasses.dataclass(frozen=True)
class StepIO:
    """Host bytes one decoder call moved: inputs bound from host arrays, outputs read back."""
    host_in_bytes: int
    host_out_bytes: int


class DecoderBinding:
    """A decoder session bound to a KV pool. The pool's values are bound once as the graph's pool
    inputs and (the same values) as its updated-pool outputs; each `run` binds only the small
    per-step host arrays and a host buffer for the logits, never copying any other output.

    The per-step inputs and the logits go through host buffers the binding owns, each wrapped in
    an OrtValue bound once per shape: a step whose shapes match the previous one's (every decode
    step of a running batch until its block tables grow) binds nothing (binding costs
    microseconds per name; at a tiny model's step that is a measurable share). The runner fills
    them in place (`host_inputs`, then `run_bound`); `run` copies caller-owned feeds into them."""

    def __init__(self, session, pool: KVPool):
        self.session, self.pool = session, pool
        self.input_names = {i.name for i in session.get_inputs()}
        self.vocab = int(next(o for o in session.get_outputs() if o.name == mf.LOGITS).shape[-1])
        self.io = session.io_binding()
        wanted = {n for n in self.input_names if mf.pool_kind(n)}
        bound = set()
        for name, out, value in pool.bindings():
            if name in self.input_names:
                self.io.bind_ortvalue_input(name, value)
                self.io.bind_ortvalue_output(out, value)
                bound.add(name)
        if wanted != bound:
            raise mf.EngineError(f"the decoder's pool inputs {sorted(wanted - bound)} have no "
                                 f"tensor in the {pool.mode} KV pool; rebuild the engine")
        self._inputs: dict[str, np.ndarray] = {}          # name -> the host buffer bound now
        self._logits: np.ndarray | None = None
        self.last_io = StepIO(0, 0)
        self.run_seconds_total = 0.0     # wall time inside the graph calls (the bench's step split)

    def host_inputs(self, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
        """The host buffers bound as these inputs, shaped as asked, for the caller to fill in
        place before `run_bound` (a buffer is replaced, and bound, only when its shape or dtype
        changes). A name the graph does not take gets a scratch array nobody reads."""
        out = {}
        for name, (shape, dtype) in shapes.items():
            held = self._inputs.get(name)
            if held is None or held.shape != shape or held.dtype != dtype:
                held = np.empty(shape, dtype)
                if name in self.input_names:
                    self.io.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(held))
                    self._inputs[name] = held
            out[name] = held
        return out

    def run(self, feeds: dict[str, np.ndarray], num_logits: int,
            on_launch: Callable[[], None] | None = None) -> np.ndarray:
        """One call; feeds are host arrays by input name (unused ones are skipped; the binding
        copies them, so the caller may reuse them). Returns logits f32[B, num_logits, V], an
        array of the caller's own (the bound output buffer is copied out). `on_launch` is called
        just before the graph runs (see ModelRunner.execute)."""
        used = {n: a for n, a in feeds.items() if n in self.input_names}
        for name, buf in self.host_inputs({n: (a.shape, a.dtype) for n, a in used.items()}).items():
            np.copyto(buf, used[name])
        return self.run_bound(len(feeds[mf.PAST_LENS]), num_logits, on_launch)

    def run_bound(self, batch: int, num_logits: int,
                  on_launch: Callable[[], None] | None = None) -> np.ndarray:
        """`run` over the host buffers as `host_inputs` last shaped them (filled by the caller)."""
        shape = (batch, num_logits, self.vocab)
        if self._logits is None or self._logits.shape != shape:
            self._logits = np.empty(shape, np.float32)
            self.io.bind_ortvalue_output(mf.LOGITS, ort.OrtValue.ortvalue_from_numpy(self._logits))
        if on_launch is not None:
            on_launch()
        start = time.perf_counter()
        self.session.run_with_iobinding(self.io)
        self.run_seconds_total += time.perf_counter() - start
        self.last_io = StepIO(sum(a.nbytes for a in self._inputs.values()), self._logits.nbytes)
        return self._logits.copy()


class ModelRunner:
    def __init__(self, session, manifest: mf.Manifest, embed_table: np.ndarray, pool: KVPool):
        # a memory-mapped table read as a plain array (same pages): indexing a np.memmap
        # builds a memmap object per lookup, several times the cost of the copy itself
        self.pool = pool
        self.table = embed_table.view(np.ndarray) if isinstance(embed_table, np.memmap) else embed_table
        self.binding = DecoderBinding(session, pool)
        self.dtype = np.dtype(manifest.dtype)
        self.hidden = manifest.hidden_size
        self.nds = len(manifest.preprocessing.deepstack_indexes)
        self.block_size = pool.shape.block_size

    @property
    def session(self):
        """The decoder session the binding runs (replaceable, e.g. by a test's failing one)."""
        return self.binding.session

    @session.setter
    def session(self, session) -> None:
        self.binding.session = session

    def execute(self, chunks: Iterable[Chunk],
                on_launch: Callable[[], None] | None = None) -> dict[int, np.ndarray]:
        """Run the chunks (decode rows and prefill chunks in separate graph calls, so a one-token
        decode is never padded to a prefill chunk's length). Returns logits [V] per seq_id for the
        chunks that need them. `on_launch` is called once, just before the first graph call, when
        the step's inputs are ready: the engine loop hands the previous step's tokens to the
        event loop there, so that work runs while the graph does (the graph call releases the
        GIL) instead of before the step, holding the GIL the step's Python needs."""
        chunks = list(chunks)
        decodes = [c for c in chunks if c.num_new_tokens == 1]
        prefills = [c for c in chunks if c.num_new_tokens > 1]
        out: dict[int, np.ndarray] = {}
        for group in (decodes, prefills):
            if group:
                out.update(self._run(group, on_launch))
                on_launch = None
        return out

    def _inputs(self, c: Chunk, x: np.ndarray, ds: np.ndarray, pos: np.ndarray, b: int) -> None:
        seq, n = c.seq, c.num_new_tokens
        visual: Visual | None = seq.inputs.visual
        if n == 1 and c.start >= seq.inputs.positions.shape[1] and (
                visual is None or c.start >= len(visual.index)):
            # a decode row past the prompt: one text token (a row copy, no index arrays)
            x[b, 0] = self.table[c.token_ids[0]]
            pos[:, b, 0] = c.start + seq.inputs.rope_delta
            return
        x[b, :n] = self.table[np.asarray(c.token_ids, np.int64)]
        if visual is not None and c.start < len(visual.index):
            idx = visual.index[c.start:c.start + n]
            rows = np.nonzero(idx >= 0)[0]
            if len(rows):
                x[b, rows] = visual.embeds[idx[rows]]
                ds[:, b, rows] = visual.deepstack[:, idx[rows]]
        pos[:, b, :n] = positions_for(seq, c.start, n)

    def _run(self, chunks: list[Chunk], on_launch: Callable[[], None] | None = None
             ) -> dict[int, np.ndarray]:
        b, s = len(chunks), max(c.num_new_tokens for c in chunks)
        m = max(1, max(len(c.block_table) for c in chunks))
        # filled in place in the buffers the binding has bound (no per-step arrays, no copies)
        bufs = self.binding.host_inputs({
            mf.INPUTS_EMBEDS: ((b, s, self.hidden), self.dtype),
            mf.POSITION_IDS: ((3, b, s), _I64), mf.DEEPSTACK_EMBEDS: ((self.nds, b, s, self.hidden), self.dtype),
            mf.PAST_LENS: ((b,), _I64), mf.BLOCK_TABLES: ((b, m), _I64), mf.SLOT_MAPPING: ((b, s), _I64),
            mf.LOGIT_POSITIONS: ((b, 1), _I64)})
        x, ds, pos = bufs[mf.INPUTS_EMBEDS], bufs[mf.DEEPSTACK_EMBEDS], bufs[mf.POSITION_IDS]
        tables, slots = bufs[mf.BLOCK_TABLES], bufs[mf.SLOT_MAPPING]
        past, last = bufs[mf.PAST_LENS], bufs[mf.LOGIT_POSITIONS]
        if s > 1:                          # padding rows of a prefill chunk
            x.fill(0)
            pos.fill(0)
        ds.fill(0)
        tables.fill(0)
        slots.fill(self.pool.scratch_slot)                             # padding rows: scratch
        for i, c in enumerate(chunks):
            self._inputs(c, x, ds, pos, i)
            tables[i, :len(c.block_table)] = c.block_table
            slots[i, :c.num_new_tokens] = c.slots
            past[i] = c.start
            last[i, 0] = c.num_new_tokens - 1
        logits = self.binding.run_bound(b, num_logits=1, on_launch=on_launch)
        return {c.seq.seq_id: logits[i, 0] for i, c in enumerate(chunks) if c.needs_logits}
