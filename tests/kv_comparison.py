"""(Test helper; not served.) INT8 KV against FP KV, teacher-forced: the same tokens through both decoder graphs.

For a request and a continuation (e.g. the FP engine's greedy answer), each continuation token
is fed one decode step at a time, so every step reads its past from the KV pool exactly as
generation does. Compares the next-token distributions position by position.
"""
from __future__ import annotations

import numpy as np

from exporter.agreement import compare  # noqa: F401  (re-exported for the tests)
from runtime.api import GenerationRequest
from runtime.kv_cache import KVPool
from runtime.runner import ModelRunner
from runtime.scheduler import ScheduledChunk
from runtime.sequence import Sequence


def teacher_forced_logits(engine, request: GenerationRequest, continuation: list[int]) -> np.ndarray:
    """Logits [len(continuation) + 1, V]: after the prompt, then after each continuation token."""
    prompt = engine.preparer.prepare(request)
    seq = Sequence(prompt.token_ids.tolist() + list(continuation), inputs=prompt.inputs)
    bs = engine.pool.shape.block_size
    blocks = -(-seq.num_tokens // bs) + 1
    pool = KVPool(engine.pool.shape, blocks, engine.pool.mode, device=engine.pool.device)
    runner = ModelRunner(engine.runner.session, engine.manifest, engine.runner.table, pool)
    seq.block_table = list(range(blocks))

    def chunk(start: int, n: int) -> ScheduledChunk:
        return ScheduledChunk(seq, start, n, tuple(seq.token_ids[start:start + n]), tuple(seq.block_table),
                              seq.slot_mapping(start, start + n, bs), True, n > 1)

    p = len(prompt.token_ids)
    out = [runner.execute([chunk(0, p)])[seq.seq_id]]
    for i in range(len(continuation)):
        out.append(runner.execute([chunk(p + i, 1)])[seq.seq_id])
    return np.stack(out).astype(np.float64)
