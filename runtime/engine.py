"""The engine's async front: what the server (and any asyncio caller) talks to.

    engine = AsyncEngine("build/engines/default")     # cheap: reads and checks the manifest
    await engine.start()                              # loads sessions off the event loop
    async for delta in engine.generate(request): ...

It owns the worker pool (media decoding, vision encoding, templating, tokenising: the one media
thread pool, which the server uses too), the admission bound, the loop thread that drives the
synchronous `EngineCore` (runtime.engine_core), each request's stream, detokenizing and
cancellation. The event loop never takes a lock the loop thread holds during a step: requests and
cancellations go to the loop thread through an inbox it drains between steps, step outputs come
back with one `call_soon_threadsafe` per event loop per step, and `stats()` reads a snapshot the
loop thread publishes after every step. Detokenizing (tokenizers' DecodeStream) runs in the
consumer's coroutine, outside the core.
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

from runtime import manifest as mf
from runtime.api import (EngineFailure, EngineStats, GenerationRequest, NotReady, QueueFull,
                         TokenDelta, Usage, validate_request)
from runtime.detokenizer import IncrementalDetokenizer
from runtime.engine_config import EngineConfig
from runtime.engine_core import EngineCore, RequestOutput
from runtime.media.video import VideoInput
from runtime.preparation import Preparer
from runtime.sampling import validate as validate_sampling
from runtime.sequence import Sequence
from runtime.sessions import announce_placement

log = logging.getLogger("runtime.engine")


@dataclasses.dataclass
class _Stream:
    """Where the loop thread posts one request's outputs."""
    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    detok: IncrementalDetokenizer                # used by the consumer's coroutine only
    cancelled_by_id: bool = False


class AsyncEngine:
    def __init__(self, engine_dir: str | Path, config: EngineConfig = EngineConfig()):
        self.dir, self.config = Path(engine_dir), config
        self.manifest = mf.load_manifest(self.dir, verify_hashes=False)   # format + contract
        self.model_name = config.model_name or self.manifest.name
        self.core: EngineCore | None = None
        self.preparer: Preparer | None = None
        self.tokenizer = None
        self.device = "cpu"
        self._workers = concurrent.futures.ThreadPoolExecutor(config.workers,
                                                              thread_name_prefix="media")
        self._cv = threading.Condition()
        self._inbox: list[tuple] = []             # ("add", stream) | ("abort", seq_id, reason)
        self._streams: dict[int, _Stream] = {}    # loop thread only
        self._by_request: dict[str, _Stream] = {}  # event loop side, for cancel(request_id)
        self._snapshot: EngineStats | None = None
        self._admitted = 0                        # preparing + waiting + running (admission)
        self._preparing = 0
        self._admit_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._ready = False
        self._load_lock = threading.Lock()

    @classmethod
    def load(cls, engine_dir: str | Path, config: EngineConfig = EngineConfig()) -> "AsyncEngine":
        """Construct and load now (blocking); start() then only starts the loop thread."""
        engine = cls(engine_dir, config)
        engine._load()
        return engine

    def _load(self) -> None:
        with self._load_lock:
            if self.core is not None:
                return
            cfg = self.config
            m = mf.load_manifest(self.dir, verify_hashes=cfg.verify_hashes)
            wanted_cuda = m.partitions["decoder"].device == "cuda" and cfg.device != "cpu"
            self.device = announce_placement(wanted_cuda=wanted_cuda)
            opts = dict(m.profile.get("session", {}))
            if cfg.intra_op_threads is not None:
                opts["intra_op_threads"] = cfg.intra_op_threads
            core = EngineCore.load(self.dir, m, cfg, self.device, opts)
            self.preparer = Preparer(self.dir, m, cfg, opts, max_prompt_tokens=core.max_context - 1)
            self.tokenizer = self.preparer.builder.tokenizer
            self.manifest, self.core = m, core
            self._snapshot = core.stats()

    # --- EngineAPI: life cycle -----------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_context(self) -> int | None:
        return self.core.max_context if self.core is not None else None

    @property
    def executor(self) -> concurrent.futures.Executor:
        return self._workers

    async def start(self) -> None:
        if self.core is None:
            await asyncio.get_running_loop().run_in_executor(None, self._load)
        # The loop thread and the event loop hand the GIL back and forth every step; CPython's
        # default 5 ms switch interval would idle the decoder for most of a tiny model's step.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.001))
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
            self._thread.start()
        self._ready = True

    async def stop(self) -> None:
        """Cancel what is running (those streams raise NotReady), stop the loop thread."""
        self._ready = False
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        self._workers.shutdown(wait=False, cancel_futures=True)

    # --- EngineAPI: requests -------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        if not self._ready:
            raise NotReady("the engine is not ready")
        validate_request(request)
        validate_sampling(request.sampling)
        self._admit()
        try:
            stream = await self._submit(request)
        except BaseException:
            self._release()
            raise
        seq, submitted, detok = stream.seq, stream.submitted, stream.detok
        delivered, first_at, done = 0, None, False
        try:
            while not done:
                out: RequestOutput = await stream.queue.get()
                if out.new_token_ids and first_at is None:
                    first_at = time.monotonic()
                delivered += len(out.new_token_ids)
                text = "".join(detok.add(t) for t in out.new_token_ids)
                reason = out.finish_reason
                if reason is None and detok.stopped:          # a stop string: end it in the core
                    reason = "stop"
                    self._send(("abort", seq.seq_id, "stop"))
                if reason in ("error", "cancelled") and not (reason == "cancelled"
                                                             and stream.cancelled_by_id):
                    if text or out.new_token_ids:
                        yield TokenDelta(text, out.new_token_ids)
                    done = True
                    if reason == "error":
                        log.warning("request %s failed: %s", seq.request_id, out.error)
                        raise EngineFailure("the engine failed while generating this answer; "
                                            "the server log has the cause")
                    raise NotReady("the engine stopped; the answer was cut short")
                if reason is None:
                    yield TokenDelta(text, out.new_token_ids)
                    continue
                done = True
                if not detok.stopped:
                    text += detok.finish()
                ttft = None if first_at is None else first_at - submitted
                yield TokenDelta(text, out.new_token_ids, reason,
                                 Usage(seq.num_prompt_tokens, delivered, seq.num_cached_tokens, ttft))
        finally:
            self._release()
            self._by_request.pop(seq.request_id, None)
            if not done:                                      # the consumer left: cancel now
                self._send(("abort", seq.seq_id, "cancelled"))

    def _release(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def _admit(self) -> None:
        """The one admission point: at most max_batch running and max_queue more in flight
        (preparing or waiting); the next is refused with QueueFull (HTTP 429 + Retry-After)."""
        core, cfg = self.core, self.config
        limit = core.scheduler.max_batch + cfg.max_queue
        with self._admit_lock:
            if self._admitted >= limit:
                raise QueueFull(f"the engine is busy ({self._admitted} requests in flight, at most "
                                f"{limit}); retry later", retry_after=cfg.retry_after)
            self._admitted += 1

    async def _submit(self, request: GenerationRequest) -> _Stream:
        """Prepare the request in the worker pool and hand it to the loop thread."""
        loop = asyncio.get_running_loop()
        submitted = time.monotonic()
        with self._admit_lock:
            self._preparing += 1
        try:
            prompt = await loop.run_in_executor(self._workers, self.preparer.prepare, request)
        finally:
            with self._admit_lock:
                self._preparing -= 1
        ids = prompt.token_ids.tolist()
        sampling = request.sampling
        room = self.core.max_context - len(ids)          # >= 1: the preparer checked the length
        if sampling.max_tokens > room:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        seq = Sequence(ids, sampling, media=prompt.media_spans, request_id=request.request_id,
                       arrival_time=submitted, inputs=prompt.inputs)
        stream = _Stream(seq, loop, asyncio.Queue(), submitted,
                         IncrementalDetokenizer(self.tokenizer, ids, stop=sampling.stop))
        self._send(("add", stream))
        self._by_request[seq.request_id] = stream
        return stream

    async def cancel(self, request_id: str) -> bool:
        stream = self._by_request.get(request_id)
        if stream is None:
            return False
        stream.cancelled_by_id = True
        self._send(("abort", stream.seq.seq_id, "cancelled"))
        return True

    async def preview_video(self, source: bytes | str) -> VideoInput:
        if self.preparer is None:
            raise NotReady("the engine is still loading")
        return await asyncio.get_running_loop().run_in_executor(
            self._workers, self.preparer.video_preview, source)

    def stats(self) -> EngineStats:
        s = self._snapshot
        if s is None:
            return EngineStats(0, 0, 0, self._preparing, 0, 0, self.device)
        return dataclasses.replace(s, requests_waiting=s.requests_waiting + self._preparing)

    # --- the loop thread -------------------------------------------------------------------------
    def _send(self, command: tuple) -> None:
        """Queue a command for the loop thread. A request added after stop() began would never
        be answered: it is refused instead (commands queued before are all applied)."""
        with self._cv:
            if self._stopping and command[0] == "add":
                raise NotReady("the engine is shutting down")
            self._inbox.append(command)
            self._cv.notify_all()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # a bug in scheduling: fail every request rather than hang them
            log.exception("engine loop stopped")
            self._ready = False
            with self._cv:
                self._stopping = True            # refuse new requests: nobody would serve them
            self._post([RequestOutput(s.seq.seq_id, (), "error", f"engine loop stopped: {e}")
                        for s in self._streams.values()])
            self._streams.clear()

    def _serve(self) -> None:
        core = self.core
        while True:
            with self._cv:
                while not self._stopping and not self._inbox and not core.has_work:
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            outputs = [o for cmd in inbox if (o := self._apply(cmd)) is not None]
            if stopping:
                for seq_id in list(self._streams):
                    core.abort(seq_id, "cancelled")
                    outputs.append(RequestOutput(seq_id, (), "cancelled"))
                self._post(outputs)
                self._snapshot = core.stats()
                return
            if core.has_work:
                outputs.extend(core.step().outputs)
            self._snapshot = core.stats()
            self._post(outputs)

    def _apply(self, command: tuple) -> RequestOutput | None:
        if command[0] == "add":
            stream: _Stream = command[1]
            self.core.add(stream.seq)
            self._streams[stream.seq.seq_id] = stream
            return None
        _, seq_id, reason = command
        if seq_id in self._streams and self.core.abort(seq_id, reason):
            return RequestOutput(seq_id, (), reason)
        return None

    def _post(self, outputs: list[RequestOutput]) -> None:
        """Hand outputs to their streams: one wake-up per event loop per step, not one per token
        (each wake-up costs the loop thread a GIL hand-over). A stream whose request ended is
        forgotten here."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            stream = self._streams.get(out.seq_id)
            if stream is None:
                continue
            if out.finish_reason is not None:
                del self._streams[out.seq_id]
            by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:       # that loop is closed: nobody is listening any more
                pass

    # --- for tests and benchmarks only (exporter/bench, tests/kv_comparison.py); the server uses
    # --- EngineAPI alone -----------------------------------------------------------------------
    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def block_manager(self):
        return self.core.block_manager

    @property
    def pool(self):
        return self.core.pool

    @property
    def runner(self):
        return self.core.runner

    @property
    def step_count(self) -> int:
        return self.core.step_count


Engine = AsyncEngine      # the name the README's Python API and the benchmarks use


def _deliver(items) -> None:
    for queue, out in items:
        queue.put_nowait(out)
