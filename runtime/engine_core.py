"""The synchronous engine core: one `step()` schedules, runs the decoder, samples and books.

    core = EngineCore.load(engine_dir, manifest, config)
    core.add(seq)                       # a prepared request (runtime.sequence.Sequence)
    result = core.step()                # StepResult: the new tokens and endings of this step
    core.abort(seq_id)                  # a client left; its KV blocks are free at once

It owns the scheduler, the model runner (ONNX Runtime decoder session), the sampler and the KV
cache (block manager + pool). It knows nothing of asyncio, threads, text or HTTP: it is driven
by one thread at a time (runtime.engine.AsyncEngine's loop thread, or a test), and is testable
with no event loop at all. A step that fails (the decoder raised) fails the requests it ran, with
the error in their outputs, and the core goes on serving the others.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from runtime import manifest as mf
from runtime.api import EngineStats
from runtime.constrained import Constraints
from runtime.engine_config import EngineConfig
from runtime.kv_cache import BlockManager, KVPool, KVShape, blocks_for_budget
from runtime.logprobs import RawLogprob, log_softmax, raw_logprob
from runtime.runner import ModelRunner
from runtime.sampling import Sampler, adjust_logits, adjusts_logits
from runtime.scheduler import Scheduler, StepPlan
from runtime.sequence import Sequence
from runtime.gpu_memory import gpu_memory_bytes
from runtime.sessions import make_session, session_device

log = logging.getLogger("runtime.engine")


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step did for one request: the tokens it sampled (at most one), and how it ended
    when it ended (finish_reason "stop", "length", "cancelled" or "error", with `error` text)."""
    seq_id: int
    new_token_ids: tuple[int, ...]
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[RawLogprob, ...] | None = None   # one per new token, when the request asked


@dataclasses.dataclass(frozen=True)
class StepResult:
    outputs: tuple[RequestOutput, ...]
    num_scheduled_tokens: int = 0            # tokens the decoder computed this step

    @property
    def ran(self) -> bool:
        return self.num_scheduled_tokens > 0


class EngineCore:
    """Not thread-safe: one caller at a time (the async front's loop thread)."""

    def __init__(self, manifest: mf.Manifest, runner: ModelRunner, scheduler: Scheduler,
                 pool: KVPool, max_context: int, device: str, kv_mode: str,
                 constraints: Constraints | None = None):
        self.manifest, self.runner, self.scheduler, self.pool = manifest, runner, scheduler, pool
        self.block_manager = scheduler.bm
        self.sampler = Sampler()
        self.constraints = constraints           # grammars (response_format, forced tool calls)
        self.max_context = max_context           # prompt + answer tokens, pool capacity included
        self.device, self.kv_mode = device, kv_mode
        self.step_count = 0
        self._logprob_rows: dict[int, np.ndarray] = {}    # this step's, for requests that asked

    @classmethod
    def load(cls, engine_dir: Path, manifest: mf.Manifest, config: EngineConfig, device: str,
             session_options: dict) -> "EngineCore":
        """Create the decoder session, size the KV pool and wire the scheduler (slow: seconds)."""
        m, profile = manifest, manifest.profile
        kv_mode = config.kv_mode or m.kv.dtype
        key = "decoder" if kv_mode == m.kv.dtype else f"decoder_{kv_mode}"
        if key not in m.partitions:
            built = ", ".join(k for k in m.partitions if k.startswith("decoder"))
            raise mf.EngineError(f"KV mode {kv_mode!r} needs {key}.onnx, which this engine lacks "
                                 f"(it has {built}); rebuild with a profile whose kv_modes include it")
        decoder = make_session(engine_dir / m.partitions[key].file, m.partitions[key].device,
                               session_options, force_cpu=config.device == "cpu")
        max_context = min(config.max_context or profile["max_context"], profile["max_context"])
        block_size = config.block_size or m.kv.block_size
        shape = KVShape(m.kv.num_layers, m.kv.num_kv_heads, m.kv.head_dim, block_size)
        pool_mode = "int8" if kv_mode == "int8" else m.dtype
        max_batch = min(config.max_batch or profile["max_batch"], profile["max_batch"])
        blocks = config.kv_blocks or default_blocks(shape, pool_mode, max_batch, max_context,
                                                    profile.get("memory_plan", {}))
        pool = KVPool(shape, blocks, pool_mode, device=session_device(decoder))   # where the graph runs
        # one context limit: what the profile allows, and what the whole pool holds
        max_context = min(max_context, blocks * block_size)
        scheduler = Scheduler(BlockManager(blocks, block_size), max_batch=max_batch,
                              max_tokens_per_step=config.max_tokens_per_step
                              or profile["max_tokens_per_step"],
                              eos_token_ids=tuple(m.special_tokens.eos_token_ids),
                              max_model_len=max_context)
        table = np.load(engine_dir / m.embed_tokens, mmap_mode="r")
        runner = ModelRunner(decoder, m, table, pool)
        constraints = Constraints((engine_dir / m.tokenizer).read_text(), m.vocab_size,
                                  m.special_tokens.eos_token_ids)
        log.info("engine %s: %d KV blocks of %d tokens (%s, on %s), %.1f MiB; max context %d, batch %d",
                 m.name, blocks, block_size, pool_mode, pool.device, pool.nbytes() / 2**20,
                 max_context, max_batch)
        return cls(m, runner, scheduler, pool, max_context, device, kv_mode, constraints)

    # --- requests ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a prepared request; its prompt was checked against `max_context` already."""
        self.scheduler.add(seq)

    def abort(self, seq_id: int, reason: str = "cancelled", error: str | None = None) -> bool:
        """End a request at once, whatever its state; frees its KV blocks. False if it ended."""
        if reason == "error":
            return self.scheduler.fail(seq_id, error or "failed")
        if reason == "cancelled":
            return self.scheduler.cancel(seq_id)
        return self.scheduler.finish(seq_id, reason)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def take_ended(self) -> list[RequestOutput]:
        """Endings decided outside a step: the unforked answers of an n > 1 request whose
        parent was aborted or failed (they end with it)."""
        return [RequestOutput(s.seq_id, (), s.finish_reason or "error", s.error)
                for s in self.scheduler.take_family_endings()]

    # --- the step ------------------------------------------------------------------------------
    def step(self, on_launch: Callable[[], None] | None = None) -> StepResult:
        """schedule -> run -> sample -> postprocess; what happened to each request touched.
        `on_launch` is called once, just before the decoder graph runs (ModelRunner.execute), or
        not at all when this step runs no graph."""
        plan = self.scheduler.schedule()
        if plan is None:
            return StepResult(())
        ended = [RequestOutput(s.seq_id, (), s.finish_reason or "error", s.error)
                 for s in plan.finished]
        if plan.copies:                  # copy-on-write of the blocks n > 1 answers forked from
            self.pool.copy_blocks(plan.copies)
        if not plan.entries:
            return StepResult(tuple(ended))
        try:
            sampled = self._run(plan, on_launch)
        except Exception as e:           # a failed step fails its requests, never the engine
            log.exception("decoder step failed")
            error = f"decoder step failed: {type(e).__name__}: {e}"
            for entry in plan.entries:
                if self.scheduler.fail(entry.seq_id, error):
                    ended.append(RequestOutput(entry.seq_id, (), "error", error))
            return StepResult(tuple(ended + self.take_ended()), plan.num_tokens)
        self.step_count += 1
        self.scheduler.postprocess(plan, sampled)
        if self.constraints is not None:         # a complete grammar ends its request
            self.constraints.finish(plan.logit_entries, self.scheduler)
        outputs = [RequestOutput(e.seq_id, (sampled[e.seq_id],), e.seq.finish_reason, e.seq.error,
                                 self._logprobs_of(e.seq, sampled[e.seq_id]))
                   for e in plan.logit_entries]
        return StepResult(tuple(ended + outputs), plan.num_tokens)

    def _logprobs_of(self, seq: Sequence, token: int) -> tuple[RawLogprob, ...] | None:
        row = self._logprob_rows.pop(seq.seq_id, None)
        if row is None:
            return None
        return (raw_logprob(row, token, seq.sampling.top_logprobs),)

    def _run(self, plan: StepPlan, on_launch: Callable[[], None] | None = None) -> dict[int, int]:
        entries = plan.logit_entries
        if self.constraints is not None:         # grammar masks compute while the decoder runs
            self.constraints.begin(entries)
        logits = self.runner.execute(plan.entries, on_launch)
        missing = [e.seq.request_id for e in entries if e.seq_id not in logits]
        if missing:
            raise RuntimeError(f"the runner returned no logits for {missing}")
        if not entries:
            return {}
        # log-probabilities of the raw logits (before any sampling adjustment or mask)
        self._logprob_rows = {e.seq_id: log_softmax(logits[e.seq_id])
                              for e in entries if e.seq.sampling.logprobs}
        batch = np.stack([logits[e.seq_id] for e in entries])
        for i, e in enumerate(entries):          # penalties and logit_bias, where asked
            if adjusts_logits(e.seq.sampling):
                adjust_logits(batch[i], e.seq.sampling, e.seq.output_token_ids)
        if self.constraints is not None:         # forbidden tokens -> -inf, just before sampling
            for seq_id, error in self.constraints.apply(entries, batch):
                self.scheduler.fail(seq_id, error)
        tokens = self.sampler(batch, [e.seq.sampling for e in entries], [e.seq.rng for e in entries])
        if self.constraints is not None:
            self.constraints.advance(entries, tokens)
        return {e.seq_id: int(t) for e, t in zip(entries, tokens)}

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_blocks_used=self.block_manager.num_used_blocks,
            kv_blocks_total=self.block_manager.num_blocks,
            requests_running=len(self.scheduler.running),
            requests_waiting=len(self.scheduler.waiting),
            generated_tokens_total=self.scheduler.generated_tokens_total,
            kv_bytes_per_token=self.pool.bytes_per_token(), device=self.device,
            gpu_memory_bytes=gpu_memory_bytes() if self.pool.device == "cuda" else None)


def default_blocks(shape: KVShape, mode: str, max_batch: int, max_context: int,
                   memory_plan: dict) -> int:
    """Enough blocks for max_batch full contexts, capped by the profile's memory plan, and never
    fewer than one full context needs."""
    want = -(-max_batch * max_context // shape.block_size) + max_batch
    budget = memory_plan.get("kv_budget_bytes")
    if budget:
        want = min(want, blocks_for_budget(shape, budget, mode))
    return max(want, -(-max_context // shape.block_size) + 1)
