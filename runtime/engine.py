"""The engine's async front: what the server (and any asyncio caller) talks to.

    engine = AsyncEngine("build/engines/default")     # cheap: reads and checks the manifest
    await engine.start()                              # loads sessions off the event loop
    async for delta in engine.generate(request): ...

It owns the worker pool (media decoding, vision encoding, templating, tokenising: the one media
thread pool, which the server uses too), the admission bound, the loop thread that drives the
synchronous `EngineCore` (runtime.engine_core), each request's stream, detokenizing and
cancellation. The event loop never takes a lock the loop thread holds during a step: requests and
cancellations go to the loop thread through an inbox it drains between steps, step outputs come
back with one `call_soon_threadsafe` per event loop per hand-over (every step, or every few steps
when they come faster than `stream_interval_ms`), and `stats()` reads a snapshot the loop thread
publishes after every step. Detokenizing (tokenizers' DecodeStream) runs in the
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
from runtime.api import (ChatMessage, EngineFailure, EngineStats, GenerationRequest,
                         InvalidRequest, NotReady, QueueFull, TextPart, TokenDelta, TokenLogprob,
                         Tokenized, Usage, check_text, validate_request)
from runtime.detokenizer import IncrementalDetokenizer
from runtime.engine_config import EngineConfig
from runtime.constrained import ERROR_PREFIX
from runtime.engine_core import EngineCore, RequestOutput
from runtime.logprobs import TokenTexts
from runtime.media.video import VideoInput
from runtime.preparation import Preparer
from runtime.sampling import validate as validate_sampling
from runtime.sequence import Sequence
from runtime.sessions import announce_placement

log = logging.getLogger("runtime.engine")


@dataclasses.dataclass
class _Stream:
    """Where the loop thread posts one request's outputs (of each of its n answers)."""
    seqs: list[Sequence]                         # answer i; seqs[0] is the parent
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    submitted: float
    detoks: list[IncrementalDetokenizer]         # used by the consumer's coroutine only
    cancelled_by_id: bool = False
    started: set[int] = dataclasses.field(default_factory=set)   # answers handed a token (loop thread)

    @property
    def seq(self) -> Sequence:
        return self.seqs[0]


class AsyncEngine:
    def __init__(self, engine_dir: str | Path, config: EngineConfig = EngineConfig()):
        self.dir, self.config = Path(engine_dir), config
        self.manifest = mf.load_manifest(self.dir, verify_hashes=False)   # format + contract
        self.model_name = config.model_name or self.manifest.name
        self.core: EngineCore | None = None
        self.preparer: Preparer | None = None
        self.tokenizer = None
        self.token_texts: TokenTexts | None = None
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
        self._unposted: list[RequestOutput] = []   # loop thread: outputs not yet handed over
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
            self.token_texts = TokenTexts(self.tokenizer)
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
        if self.core is not None and self.core.constraints is not None:
            self.core.constraints.close()

    # --- EngineAPI: requests -------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        if not self._ready:
            raise NotReady("the engine is not ready")
        validate_request(request)
        validate_sampling(request.sampling, self.manifest.vocab_size)
        n = request.sampling.n
        if n > self.core.scheduler.max_batch:
            raise InvalidRequest(f"n must be <= {self.core.scheduler.max_batch} (this engine's "
                                 f"max_batch), got {n}")
        self._admit(n)
        try:
            stream = await self._submit(request)
        except BaseException:
            self._release(n)
            raise
        seq, submitted = stream.seq, stream.submitted
        index = {s.seq_id: i for i, s in enumerate(stream.seqs)}
        open_ = set(index)                      # answers not ended yet
        delivered, first_at = 0, None
        try:
            while open_:
                out: RequestOutput = await stream.queue.get()
                if out.seq_id not in open_:
                    continue                    # e.g. the core confirming a stop-string abort
                i = index[out.seq_id]
                detok = stream.detoks[i]
                if out.new_token_ids and first_at is None:
                    first_at = time.monotonic()
                delivered += len(out.new_token_ids)
                text = "".join(detok.add(t) for t in out.new_token_ids)
                lps = self._named(out)
                reason = out.finish_reason
                if reason is None and detok.stopped:          # a stop string: end it in the core
                    reason = "stop"
                    self._send(("abort", out.seq_id, "stop"))
                if reason in ("error", "cancelled") and not (reason == "cancelled"
                                                             and stream.cancelled_by_id):
                    if text or out.new_token_ids:
                        yield TokenDelta(text, out.new_token_ids, index=i, logprobs=lps)
                    open_.discard(out.seq_id)
                    if reason == "error":
                        log.warning("request %s failed: %s", seq.request_id, out.error)
                        if out.error and out.error.startswith(ERROR_PREFIX):
                            raise EngineFailure(out.error)      # the grammar's own words
                        raise EngineFailure("the engine failed while generating this answer; "
                                            "the server log has the cause")
                    raise NotReady("the engine stopped; the answer was cut short")
                if reason is None:
                    yield TokenDelta(text, out.new_token_ids, index=i, logprobs=lps)
                    continue
                open_.discard(out.seq_id)
                if not detok.stopped:
                    text += detok.finish()
                usage = None
                if not open_:                   # the last answer: the usage of all of them
                    ttft = None if first_at is None else first_at - submitted
                    usage = Usage(seq.num_prompt_tokens, delivered, seq.num_cached_tokens, ttft)
                yield TokenDelta(text, out.new_token_ids, reason, usage, index=i, logprobs=lps)
        finally:
            self._release(n)
            self._by_request.pop(seq.request_id, None)
            for seq_id in open_:                              # the consumer left: cancel now
                self._send(("abort", seq_id, "cancelled"))

    def _named(self, out: RequestOutput) -> tuple[TokenLogprob, ...] | None:
        if out.logprobs is None:
            return None
        return tuple(self.token_texts.named(raw) for raw in out.logprobs)

    async def tokenize(self, text: str | None = None,
                       messages: tuple[ChatMessage, ...] | None = None, *,
                       add_special: bool = False, add_generation_prompt: bool = True) -> Tokenized:
        if self.preparer is None:
            raise NotReady("the engine is still loading")
        return await asyncio.get_running_loop().run_in_executor(
            self._workers, self._tokenize, text, messages, add_special, add_generation_prompt)

    def _tokenize(self, text, messages, add_special: bool, add_generation_prompt: bool) -> Tokenized:
        builder = self.preparer.builder
        if messages is not None:
            for i, m in enumerate(messages):
                for j, part in enumerate(m.parts):
                    if not isinstance(part, TextPart):
                        raise InvalidRequest(f"messages[{i}].content[{j}]: only text can be "
                                             "tokenized here (images and videos are not)")
                    check_text(part.text, f"messages[{i}].content[{j}]")
            text = builder.render(messages, add_generation_prompt=add_generation_prompt)
        else:
            check_text(text or "", "the text")
        ids = builder.tokenizer.encode(text or "", add_special_tokens=add_special).ids if text else []
        return Tokenized(tuple(ids), tuple(self.token_texts.text(i) for i in ids))

    async def detokenize(self, token_ids: tuple[int, ...]) -> str:
        if self.preparer is None:
            raise NotReady("the engine is still loading")
        vocab = self.token_texts.vocab_size
        for k, t in enumerate(token_ids):
            if not 0 <= t < vocab:
                raise InvalidRequest(f"tokens[{k}] = {t} is not a token id of this model "
                                     f"(0..{vocab - 1})")
        return await asyncio.get_running_loop().run_in_executor(   # not on the event loop
            self._workers, lambda: self.tokenizer.decode(list(token_ids), skip_special_tokens=False))

    def _release(self, n: int = 1) -> None:
        with self._admit_lock:
            self._admitted -= n

    def _admit(self, n: int = 1) -> None:
        """The one admission point: at most max_batch running and max_queue more in flight
        (preparing or waiting); the next is refused with QueueFull (HTTP 429 + Retry-After)."""
        core, cfg = self.core, self.config
        limit = core.scheduler.max_batch + cfg.max_queue
        with self._admit_lock:
            if self._admitted + n > limit:
                raise QueueFull(f"the engine is busy ({self._admitted} requests in flight, at most "
                                f"{limit}); retry later", retry_after=cfg.retry_after)
            self._admitted += n

    async def _submit(self, request: GenerationRequest) -> _Stream:
        """Prepare the request in the worker pool and hand it to the loop thread."""
        loop = asyncio.get_running_loop()
        submitted = time.monotonic()
        with self._admit_lock:
            self._preparing += 1
        try:
            prompt = await loop.run_in_executor(self._workers, self.preparer.prepare, request)
            grammar = request.sampling.grammar
            matcher = None if grammar is None else await loop.run_in_executor(
                self._workers, self.core.constraints.matcher, grammar)
        finally:
            with self._admit_lock:
                self._preparing -= 1
        ids = prompt.token_ids.tolist()
        sampling = request.sampling
        room = self.core.max_context - len(ids)          # >= 1: the preparer checked the length
        if sampling.max_tokens > room:
            sampling = dataclasses.replace(sampling, max_tokens=room)
        seqs = Sequence.family(ids, sampling, media=prompt.media_spans,
                               request_id=request.request_id, arrival_time=submitted,
                               inputs=prompt.inputs)
        if matcher is not None:                  # each answer follows the grammar on its own
            for i, seq in enumerate(seqs):
                seq.constraint = matcher if i == 0 else matcher.fork()
        stream = _Stream(seqs, loop, asyncio.Queue(), submitted,
                         [IncrementalDetokenizer(self.tokenizer, ids, stop=sampling.stop)
                          for _ in seqs])
        self._send(("add", stream))
        self._by_request[stream.seq.request_id] = stream
        return stream

    async def cancel(self, request_id: str) -> bool:
        stream = self._by_request.get(request_id)
        if stream is None:
            return False
        stream.cancelled_by_id = True
        for seq in stream.seqs:
            self._send(("abort", seq.seq_id, "cancelled"))
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
            held, self._unposted = self._unposted, []
            self._post(held + [RequestOutput(seq_id, (), "error", f"engine loop stopped: {e}")
                               for seq_id in self._streams])
            self._streams.clear()

    def _serve(self) -> None:
        """One step per turn. A step's outputs are handed to the event loop when the next step's
        graph is launched (EngineCore.step's on_launch), not as soon as they exist: handing them
        over wakes the event loop, which then holds the GIL for its per-token work (queues,
        deltas, SSE) while this thread would wait for it to schedule and build the next step's
        inputs; launched from inside the step, that work overlaps the graph call, which releases
        the GIL. The hand-over is delayed by the next step's Python alone (tens of microseconds),
        and made at once whenever no step follows (nothing left to run, or a command arrived).

        Steps shorter than the stream interval (`EngineConfig.stream_interval_ms`) are handed over
        together: the wake-up itself (a write that wakes the event loop's thread) costs this
        thread tens of microseconds, a tenth of a small model's step. A request's first token and
        its end are never held, and nothing waits longer than the interval (plus one step)."""
        core = self.core
        interval = max(0.0, self.config.stream_interval_ms) / 1e3
        last_post = float("-inf")
        while True:
            with self._cv:
                while (not self._unposted and not self._stopping and not self._inbox
                       and not core.has_work):
                    self._cv.wait()
                inbox, self._inbox = self._inbox, []
                stopping = self._stopping
            outputs = self._unposted + [o for cmd in inbox if (o := self._apply(cmd)) is not None]
            self._unposted = []
            outputs += core.take_ended()
            if stopping:
                for seq_id in list(self._streams):
                    core.abort(seq_id, "cancelled")
                    outputs.append(RequestOutput(seq_id, (), "cancelled"))
                self._post(outputs)
                self._snapshot = core.stats()
                return
            if not core.has_work:
                self._snapshot = core.stats()
                self._post(outputs)
                continue
            launched = False

            def launch() -> None:
                nonlocal launched, last_post
                launched = True
                now = time.perf_counter()
                if now - last_post >= interval or self._urgent(outputs):
                    self._post(outputs)
                    last_post = now
                else:                            # carried to the next hand-over
                    self._unposted = outputs
            try:
                result = core.step(on_launch=launch)
            finally:
                if not launched:                  # the step ran no graph (or failed before it)
                    self._post(outputs)
            self._unposted += list(result.outputs) + core.take_ended()
            self._snapshot = core.stats()

    def _urgent(self, outputs: list[RequestOutput]) -> bool:
        """Whether outputs hold a request's end or the first token of an answer (time to first
        token is never traded for fewer wake-ups)."""
        for out in outputs:
            if out.finish_reason is not None:
                return True
            stream = self._streams.get(out.seq_id)
            if stream is not None and out.seq_id not in stream.started:
                return True
        return False

    def _apply(self, command: tuple) -> RequestOutput | None:
        if command[0] == "add":
            stream: _Stream = command[1]
            self.core.add(stream.seq)
            for seq in stream.seqs:
                self._streams[seq.seq_id] = stream
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
            elif out.new_token_ids:
                stream.started.add(out.seq_id)
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
