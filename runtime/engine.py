"""The engine: one loop thread owns the model; requests reach it through the scheduler.

    engine = Engine.load("build/engines/default")
    await engine.start()
    async for delta in engine.generate(request): ...

CPU work for a request (media decoding, resizing, patchifying, vision encoding, templating and
tokenising) runs in a thread pool, never on the event loop. The loop thread runs the step
(schedule -> run -> sample -> postprocess) and posts token deltas back to each request's asyncio
queue. Closing a request's iterator (a client that left) cancels it and frees its KV blocks.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import tokenizers

from runtime import manifest as mf
from runtime.api import (EngineStats, GenerationRequest, InvalidRequest, NotReady,
                         PromptTooLong, TokenDelta, Usage)
from runtime.detokenizer import IncrementalDetokenizer
from runtime.engine_config import EngineConfig
from runtime.kv_cache import BlockManager, KVPool, KVShape
from runtime.preparation import Preparer, PreparedPrompt
from runtime.runner import ModelRunner
from runtime.sampling import Sampler, validate
from runtime.scheduler import Scheduler
from runtime.sequence import Sequence
from runtime.sessions import announce_placement, make_session

log = logging.getLogger("runtime.engine")


@dataclasses.dataclass
class _Stream:
    """The async side of one request: where the loop thread posts its deltas."""
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    detok: IncrementalDetokenizer
    prompt: PreparedPrompt
    submitted: float
    sent_final: bool = False
    held: tuple[int, ...] = ()       # sampled tokens whose text the detokenizer still holds


class Engine:
    def __init__(self, engine_dir: str | Path, config: EngineConfig = EngineConfig()):
        self.dir = Path(engine_dir)
        self.config = config
        self.manifest = mf.load_manifest(self.dir, verify_hashes=config.verify_hashes)
        m, profile = self.manifest, self.manifest.profile
        self.model_name = config.model_name or m.name
        kv_mode = config.kv_mode or m.kv.dtype
        key = "decoder" if kv_mode == m.kv.dtype else f"decoder_{kv_mode}"
        if key not in m.partitions:
            built = ", ".join(k for k in m.partitions if k.startswith("decoder"))
            raise mf.EngineError(f"KV mode {kv_mode!r} needs {key}.onnx, which this engine lacks "
                                 f"(it has {built}); rebuild with a profile whose kv_modes include it")
        self.kv_mode = kv_mode
        self.device = announce_placement(wanted_cuda=True)
        opts = dict(profile.get("session", {}))
        if config.intra_op_threads is not None:
            opts["intra_op_threads"] = config.intra_op_threads
        decoder = make_session(self.dir / m.partitions[key].file, m.partitions[key].device, opts)
        self.max_context = min(config.max_context or profile["max_context"], profile["max_context"])
        block_size = config.block_size or m.kv.block_size
        shape = KVShape(m.kv.num_layers, m.kv.num_kv_heads, m.kv.head_dim, block_size)
        pool_mode = "int8" if kv_mode == "int8" else m.dtype
        max_batch = config.max_batch or profile["max_batch"]
        blocks = config.kv_blocks or self._default_blocks(shape, pool_mode, max_batch)
        self.pool = KVPool(shape, blocks, pool_mode)
        self.block_manager = BlockManager(blocks, block_size)
        eos = tuple(m.special_tokens.eos_token_ids)
        self.scheduler = Scheduler(self.block_manager, max_batch=max_batch,
                                   max_tokens_per_step=config.max_tokens_per_step or profile["max_tokens_per_step"],
                                   max_waiting=config.max_queue, eos_token_ids=eos,
                                   max_model_len=self.max_context)
        table = np.load(self.dir / m.embed_tokens, mmap_mode="r")
        self.runner = ModelRunner(decoder, m, table, self.pool)
        self.tokenizer = tokenizers.Tokenizer.from_file(str(self.dir / m.tokenizer))
        self.preparer = Preparer(self.dir, m, config, opts, self.tokenizer)
        self.sampler = Sampler()
        self._pool = concurrent.futures.ThreadPoolExecutor(config.workers, thread_name_prefix="prep")
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._streams: dict[int, _Stream] = {}
        self._outbox: list[tuple[_Stream, TokenDelta]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.ready = False
        self.step_count = 0
        log.info("engine %s: %d KV blocks of %d tokens (%s), %.1f MiB; max context %d, batch %d",
                 m.name, blocks, block_size, pool_mode, self.pool.nbytes() / 2**20,
                 self.max_context, max_batch)

    @classmethod
    def load(cls, engine_dir: str | Path, config: EngineConfig = EngineConfig()) -> "Engine":
        return cls(engine_dir, config)

    def _default_blocks(self, shape: KVShape, mode: str, max_batch: int) -> int:
        """Enough blocks for max_batch full contexts, capped by the profile's memory plan."""
        want = -(-max_batch * self.max_context // shape.block_size) + max_batch
        plan = self.manifest.profile.get("memory_plan", {})
        budget = plan.get("kv_budget_bytes")
        if budget:
            want = min(want, max(1, int(budget // shape.bytes_per_block(mode))))
        return max(want, -(-self.max_context // shape.block_size) + 1)

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # The loop thread and the event loop hand the GIL back and forth every step; CPython's
        # default 5 ms switch interval would idle the decoder for most of a tiny model's step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        self.ready = True

    async def stop(self) -> None:
        """Cancel what is running, stop the loop thread, release the worker threads."""
        self.ready = False
        with self._lock:
            for seq_id in list(self._streams):
                self._end(seq_id, "cancelled")
            self._stopping = True
            self._wake.notify_all()
        self._flush()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # --- requests ----------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        if not self.ready:
            raise NotReady("the engine is not ready")
        validate_sampling(request)
        loop = asyncio.get_running_loop()
        submitted = time.monotonic()
        prompt = await loop.run_in_executor(self._pool, self.preparer.prepare, request)
        sampling = request.sampling
        room = self.max_context - len(prompt.token_ids)
        if room <= 0:
            raise PromptTooLong(f"the prompt has {len(prompt.token_ids)} tokens; the context holds "
                                f"{self.max_context} tokens (prompt and answer)")
        if sampling.max_tokens > room:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        seq = Sequence(prompt.token_ids.tolist(), sampling, media=prompt.media_spans,
                       request_id=request.request_id, arrival_time=submitted)
        seq.data.update(positions=prompt.position_ids, rope_delta=prompt.rope_delta,
                        visual=prompt.visual)
        stream = _Stream(loop, asyncio.Queue(), IncrementalDetokenizer(
            self.tokenizer, prompt.token_ids.tolist(), stop=sampling.stop), prompt, submitted)
        with self._lock:
            if self._stopping:
                raise NotReady("the engine is shutting down")
            self.scheduler.add(seq)          # QueueFull / PromptTooLong reach the caller
            self._streams[seq.seq_id] = stream
            self._wake.notify_all()
        try:
            while True:
                delta: TokenDelta = await stream.queue.get()
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            with self._lock:                 # a client that left: cancel, free blocks now
                if seq.seq_id in self._streams:
                    self._end(seq.seq_id, "cancelled", notify=False)
                    self._wake.notify_all()

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(
                kv_blocks_used=self.block_manager.num_used_blocks,
                kv_blocks_total=self.block_manager.num_blocks,
                requests_running=len(self.scheduler.running),
                requests_waiting=len(self.scheduler.waiting),
                generated_tokens_total=self.scheduler.generated_tokens_total,
                kv_bytes_per_token=self.pool.bytes_per_token(), device=self.device)

    # --- the loop thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._steps()
        except BaseException as e:  # a bug in scheduling: fail every request rather than hang them
            log.exception("engine loop stopped")
            with self._lock:
                self.ready = False
                for seq_id in list(self._streams):
                    self._end(seq_id, "error", error=f"engine loop stopped: {e}")
            self._flush()

    def _steps(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.has_work:
                    self._wake.wait()
                if self._stopping:
                    return
                plan = self.scheduler.schedule()
                for seq in plan.finished if plan else ():
                    self._end(seq.seq_id, seq.finish_reason or "error")
            self._flush()
            if plan is None or not plan.entries:
                continue
            try:
                logits = self.runner.execute(plan.entries)
                entries = [e for e in plan.logit_entries if e.seq_id in logits]
                tokens = self.sampler(np.stack([logits[e.seq_id] for e in entries]) if entries else
                                      np.zeros((0, 1), np.float32),
                                      [e.seq.sampling for e in entries], [e.seq.rng for e in entries])
            except Exception as e:  # a failed step fails its requests, never the engine
                log.exception("decoder step failed")
                with self._lock:
                    for entry in plan.entries:
                        self._end(entry.seq_id, "error", error=f"decoder step failed: {e}")
                self._flush()
                continue
            self.step_count += 1
            with self._lock:
                sampled = {e.seq_id: int(t) for e, t in zip(entries, tokens)}
                self.scheduler.postprocess(plan, sampled)
                for e in entries:
                    self._emit(e.seq, sampled[e.seq_id])
            self._flush()

    def _emit(self, seq: Sequence, token: int) -> None:
        """Post the new text of a sampled token (under the lock)."""
        stream = self._streams.get(seq.seq_id)
        if stream is None:
            return
        text = stream.detok.add(token)
        if stream.detok.stopped and not seq.is_finished:
            self.scheduler.finish(seq.seq_id, "stop")
        # a token whose text is held (part of a UTF-8 character) travels with the next delta, so
        # the deltas' token_ids are every sampled token, in order
        ids, stream.held = stream.held + (token,), ()
        if seq.is_finished:
            text += stream.detok.finish() if not stream.detok.stopped else ""
            self._post(stream, TokenDelta(text, ids, seq.finish_reason or "stop",
                                          self._usage(seq, stream)))
            del self._streams[seq.seq_id]
        elif text:
            self._post(stream, TokenDelta(text, ids))
        else:
            stream.held = ids

    def _end(self, seq_id: int, reason: str, error: str | None = None, notify: bool = True) -> None:
        """End a request from outside the normal stop path (under the lock)."""
        seq = self.scheduler.get(seq_id)
        if seq is not None:
            if reason == "error":
                self.scheduler.fail(seq_id, error or "failed")
            else:
                self.scheduler.cancel(seq_id)
        stream = self._streams.pop(seq_id, None)
        if stream is not None and notify:
            usage = self._usage(seq, stream) if seq is not None else None
            self._post(stream, TokenDelta("", (), reason, usage))

    def _usage(self, seq: Sequence, stream: _Stream) -> Usage:
        ttft = None if seq.first_token_time is None else seq.first_token_time - stream.submitted
        return Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                     cached_tokens=seq.num_cached_tokens, time_to_first_token=ttft)

    def _post(self, stream: _Stream, delta: TokenDelta) -> None:
        """Queue a delta for its request (under the lock); `_flush` hands them over."""
        self._outbox.append((stream, delta))

    def _flush(self) -> None:
        """Hand the queued deltas to their event loops: one wake-up per loop per step, not one
        per token (each wake-up costs the loop thread a GIL hand-over)."""
        with self._lock:
            outbox, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for stream, delta in outbox:
            by_loop.setdefault(stream.loop, []).append((stream.queue, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:       # that loop is closed: nobody is listening any more
                pass


def _deliver(items) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


def validate_sampling(request: GenerationRequest) -> None:
    if not request.messages:
        raise InvalidRequest("messages must not be empty")
    validate(request.sampling)
