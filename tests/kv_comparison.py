"""(Test helper; not served.) INT8 KV against FP KV, teacher-forced: the same tokens through both decoder graphs.

For a request and a continuation (e.g. the FP engine's greedy answer), each continuation token
is fed one decode step at a time, so every step reads its past from the KV pool exactly as
generation does. Compares the next-token distributions position by position.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from runtime.api import GenerationRequest
from runtime.kv_cache import KVPool
from runtime.runner import ModelRunner
from runtime.scheduler import ScheduledChunk
from runtime.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class KVComparison:
    positions: int
    greedy_agreement: float          # fraction of positions whose argmax agrees
    mean_kl: float                   # mean KL(p_fp || p_int8), nats
    max_kl: float
    max_abs_logit_diff: float


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


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def compare(fp_logits: list[np.ndarray], q_logits: list[np.ndarray]) -> KVComparison:
    fp, q = np.concatenate(fp_logits), np.concatenate(q_logits)
    lp, lq = _log_softmax(fp), _log_softmax(q)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    return KVComparison(positions=int(fp.shape[0]),
                        greedy_agreement=float((fp.argmax(-1) == q.argmax(-1)).mean()),
                        mean_kl=float(kl.mean()), max_kl=float(kl.max()),
                        max_abs_logit_diff=float(np.abs(fp - q).max()))
