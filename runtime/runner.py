"""The model runner: executes one scheduled step of the decoder graph over the paged KV pool.

It only executes what it is handed: for each scheduled chunk of a sequence it builds the input
embeddings (token table + the request's visual embeddings at its placeholder positions), the
MRoPE positions and the DeepStack features, runs decoder.onnx for the batch, and scatters the new
tokens' keys/values into the pool. What a step moves through Python grows with the new tokens:
the pool is handed to ONNX Runtime as it is and gathered by block table inside the graph.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

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


class ModelRunner:
    def __init__(self, session, manifest: mf.Manifest, embed_table: np.ndarray, pool: KVPool):
        self.session, self.pool, self.table = session, pool, embed_table
        self.dtype = np.dtype(manifest.dtype)
        self.hidden = manifest.hidden_size
        self.nds = len(manifest.preprocessing.deepstack_indexes)
        self.block_size = pool.shape.block_size
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.int8 = mf.KV_K_SCALE in self.input_names

    def execute(self, chunks: Iterable[Chunk]) -> dict[int, np.ndarray]:
        """Run the chunks (decode rows and prefill chunks in separate graph calls, so a one-token
        decode is never padded to a prefill chunk's length). Returns logits [V] per seq_id for the
        chunks that need them."""
        chunks = list(chunks)
        decodes = [c for c in chunks if c.num_new_tokens == 1]
        prefills = [c for c in chunks if c.num_new_tokens > 1]
        out: dict[int, np.ndarray] = {}
        for group in (decodes, prefills):
            if group:
                out.update(self._run(group))
        return out

    def _inputs(self, c: Chunk, x: np.ndarray, ds: np.ndarray, pos: np.ndarray, b: int) -> None:
        seq = c.seq
        x[b, :c.num_new_tokens] = self.table[np.asarray(c.token_ids, np.int64)]
        visual: Visual | None = seq.inputs.visual
        if visual is not None and c.start < len(visual.index):
            idx = visual.index[c.start:c.start + c.num_new_tokens]
            rows = np.nonzero(idx >= 0)[0]
            if len(rows):
                x[b, rows] = visual.embeds[idx[rows]]
                ds[:, b, rows] = visual.deepstack[:, idx[rows]]
        pos[:, b, :c.num_new_tokens] = positions_for(seq, c.start, c.num_new_tokens)

    def _run(self, chunks: list[Chunk]) -> dict[int, np.ndarray]:
        b, s = len(chunks), max(c.num_new_tokens for c in chunks)
        x = np.zeros((b, s, self.hidden), self.dtype)
        ds = np.zeros((self.nds, b, s, self.hidden), self.dtype)
        pos = np.zeros((3, b, s), np.int64)
        m = max(1, max(len(c.block_table) for c in chunks))
        tables = np.zeros((b, m), np.int64)
        for i, c in enumerate(chunks):
            self._inputs(c, x, ds, pos, i)
            tables[i, :len(c.block_table)] = c.block_table
        feeds = {mf.INPUTS_EMBEDS: x, mf.POSITION_IDS: pos, mf.DEEPSTACK_EMBEDS: ds,
                 mf.PAST_LENS: np.asarray([c.start for c in chunks], np.int64),
                 mf.BLOCK_TABLES: tables,
                 mf.LOGIT_POSITIONS: np.asarray([[c.num_new_tokens - 1] for c in chunks], np.int64),
                 **self.pool.feeds()}
        outs = dict(zip(self.output_names,
                        self.session.run(None, {n: feeds[n] for n in self.input_names})))
        # one scatter for the whole batch: token j of the step is outputs[rows[j], cols[j]]
        rows = np.concatenate([np.full(c.num_new_tokens, i) for i, c in enumerate(chunks)])
        cols = np.concatenate([np.arange(c.num_new_tokens) for c in chunks])
        self.pool.write_outputs(np.concatenate([c.slots for c in chunks]), outs, rows, cols)
        logits = outs[mf.LOGITS]
        result = {c.seq.seq_id: logits[i, 0] for i, c in enumerate(chunks) if c.needs_logits}
        return result
