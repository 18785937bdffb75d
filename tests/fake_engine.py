"""A deterministic stand-in for `runtime.engine.Engine`, implementing `runtime.api.EngineAPI`.

It streams a scripted list of tokens, honours max_tokens and stop strings, books KV blocks like the
real engine (ceil(tokens / block_size) per request, freed when the request ends or is cancelled),
records every request and every cancellation, admits at most max_running + max_queue requests at
once (QueueFull beyond, as the real engine), and raises typed errors for chosen payloads: any
image or video whose bytes start with b"corrupt" raises MediaError; `fail_with` raises before any
token, `fail_after` (n, error) after n deltas. `preview_video` runs the real video frame selection
(default VideoParams) in its worker pool, counting calls in `previews`. With sampling.n > 1 the n
answers (the same script) interleave, each delta with its index; with logprobs each token has a
made-up, deterministic TokenLogprob (logprob -0.25 * (i % 4), alternatives below it). Tokenizing
is byte-level: token ids are the UTF-8 bytes of the text.
"""
from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

from runtime.api import (AppError, EngineStats, GenerationRequest, ImagePart, InvalidRequest,
                         MediaError, NotReady, PromptTooLong, QueueFull, TextPart, TokenDelta,
                         Tokenized, TokenLogprob, TopLogprob, Usage, VideoPart)
from runtime.media.frames import VideoParams
from runtime.media.video import VideoInput, preprocess_video

SCRIPT = ("I", " see", " a", " red", " square", " on", " a", " white", " background", ".", " It",
          " looks", " like", " a", " **", "test", "**", " image", ".", "\n\n", "```", "python",
          "\n", "print", "(", "'", "hi", "'", ")", "\n", "```")
IMAGE_TOKENS = 16
VIDEO_TOKENS = 64


class FakeEngine:
    model_name = "fake-qwen3-vl"

    def __init__(self, script: tuple[str, ...] = SCRIPT, *, token_delay: float = 0.0,
                 blocks_total: int = 64, block_size: int = 16, max_context: int = 4096,
                 max_running: int = 8, max_queue: int = 32, retry_after: float = 1.0):
        self.script, self.token_delay = script, token_delay
        self.blocks_total, self.block_size, self._max_context = blocks_total, block_size, max_context
        self.max_running, self.max_queue, self.retry_after = max_running, max_queue, retry_after
        self.fail_after: tuple[int, AppError] | None = None
        self.ready_flag = True
        self.start_gate: asyncio.Event | None = None   # start() waits on it when set
        self.fail_with: AppError | None = None          # raised by generate() before any token
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.finished: list[str] = []
        self.started = self.stopped = False
        self.first_token_sent = asyncio.Event()
        self.video_params = VideoParams()
        self.previews: list[str] = []                   # sources previewed, in order
        self._executor = ThreadPoolExecutor(2, thread_name_prefix="fake-media")
        self._in_flight = 0
        self._cancel_ids: set[str] = set()
        self._blocks: dict[str, int] = {}
        self._seen_prompts: set[str] = set()
        self._generated = 0

    # ---- life cycle (what the server calls) -------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.ready_flag and self.started and not self.stopped

    @property
    def max_context(self) -> int | None:
        return self._max_context if self.started else None

    @property
    def executor(self) -> ThreadPoolExecutor:
        return self._executor

    async def start(self) -> None:
        if self.start_gate is not None:
            await self.start_gate.wait()
        self.started = True

    async def stop(self) -> None:
        self.stopped = True
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def cancel(self, request_id: str) -> bool:
        if request_id in self._blocks:
            self._cancel_ids.add(request_id)
            return True
        return False

    async def preview_video(self, source) -> VideoInput:
        self.previews.append(str(source) if not isinstance(source, bytes) else "<bytes>")
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, preprocess_video, source, self.video_params)

    def stats(self) -> EngineStats:
        return EngineStats(kv_blocks_used=sum(self._blocks.values()), kv_blocks_total=self.blocks_total,
                           requests_running=len(self._blocks),
                           requests_waiting=max(0, self._in_flight - self.max_running),
                           generated_tokens_total=self._generated, kv_bytes_per_token=1024,
                           device="cpu", gpu_memory_bytes=123_456_789)

    # ---- generation ---------------------------------------------------------------------------
    def prompt_tokens(self, request: GenerationRequest) -> int:
        if request.prompt is not None:
            return len(request.prompt.split()) or 1
        n = 0
        for m in request.messages:
            n += 3                                       # role markers
            for p in m.parts:
                if isinstance(p, TextPart):
                    n += len(p.text.split())
                elif isinstance(p, ImagePart):
                    n += IMAGE_TOKENS
                else:
                    n += VIDEO_TOKENS
        return n

    def plan(self, request: GenerationRequest) -> tuple[list[str], str]:
        """The pieces this request will stream and its finish reason."""
        s = request.sampling
        out, text, reason = [], "", "stop"
        for tok in self.script:
            if len(out) >= s.max_tokens:
                reason = "length"
                break
            cand = text + tok
            hits = [cand.find(x, max(0, len(text) - len(x) + 1)) for x in s.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                piece = cand[len(text):min(hits)]
                if piece:
                    out.append(piece)
                break
            out.append(tok)
            text = cand
        return out, reason

    @staticmethod
    def _check_media(request: GenerationRequest) -> None:
        for m in request.messages:
            for p in m.parts:
                data = p.data if isinstance(p, (ImagePart, VideoPart)) else None
                if isinstance(p, VideoPart) and p.path is not None:
                    with open(p.path, "rb") as f:
                        data = f.read(16)
                if data is not None and data.startswith(b"corrupt"):
                    raise MediaError("the video could not be decoded (fake engine)")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        if not self.ready:
            raise NotReady("the fake engine is not ready")
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        if self._in_flight >= self.max_running + self.max_queue:
            raise QueueFull("the fake engine is busy", retry_after=self.retry_after)
        self._check_media(request)
        if request.sampling.n > self.max_running:
            raise InvalidRequest(f"n must be <= {self.max_running} (max_batch)")
        prompt = self.prompt_tokens(request)
        if prompt >= self._max_context:
            raise PromptTooLong(f"prompt is {prompt} tokens; the context holds {self._max_context}")
        key = repr(request.messages[:1] or request.prompt)
        cached = (prompt // self.block_size) * self.block_size if key in self._seen_prompts else 0
        self._seen_prompts.add(key)
        rid = request.request_id or f"req-{len(self.requests)}"
        pieces, reason = self.plan(request)
        n, s = request.sampling.n, request.sampling
        self._blocks[rid] = math.ceil(prompt / self.block_size)
        self._in_flight += 1
        try:
            for i, piece in enumerate(pieces):
                if self.token_delay:
                    await asyncio.sleep(self.token_delay)
                if self.fail_after is not None and i >= self.fail_after[0]:
                    raise self.fail_after[1]
                if rid in self._cancel_ids:
                    for k in range(n):
                        yield TokenDelta("", (), "cancelled",
                                         Usage(prompt, i * n, cached, None) if k == n - 1 else None,
                                         index=k)
                    return
                self._generated += n
                self._blocks[rid] = math.ceil((prompt + i + 1) / self.block_size) * n
                last = i == len(pieces) - 1
                self.first_token_sent.set()
                lps = (self._logprob(piece, i, s.top_logprobs),) if s.logprobs else None
                for k in range(n):
                    usage = Usage(prompt, len(pieces) * n, cached, 0.001) if last and k == n - 1 else None
                    yield TokenDelta(piece, (i,), reason if last else None, usage, index=k, logprobs=lps)
            if not pieces:
                for k in range(n):
                    yield TokenDelta("", (), reason, Usage(prompt, 0, cached, None) if k == n - 1
                                     else None, index=k)
            self.finished.append(rid)
        except (GeneratorExit, asyncio.CancelledError):
            self.cancelled.append(rid)
            raise
        finally:
            del self._blocks[rid]
            self._in_flight -= 1

    @staticmethod
    def _logprob(piece: str, i: int, k: int) -> TokenLogprob:
        lp = -0.25 * (i % 4)
        top = tuple(TopLogprob(1000 + j, f"alt{j}", f"alt{j}".encode(), lp - 1.0 - j) for j in range(k))
        if k:
            top = (TopLogprob(i, piece, piece.encode(), lp),) + top[:k - 1]
        return TokenLogprob(i, piece, piece.encode(), lp, top)

    # ---- tokens (byte-level: an id is a byte) ---------------------------------------------------
    async def tokenize(self, text=None, messages=None, *, add_special: bool = False,
                       add_generation_prompt: bool = True) -> Tokenized:
        if not self.ready:
            raise NotReady("the fake engine is not ready")
        if messages is not None:
            text = "".join(f"<{m.role}>" + "".join(p.text for p in m.parts) for m in messages)
            text += "<assistant>" if add_generation_prompt else ""
        data = (text or "").encode()
        return Tokenized(tuple(data), tuple(chr(b) if b < 128 else "\ufffd" for b in data))

    async def detokenize(self, token_ids) -> str:
        if not self.ready:
            raise NotReady("the fake engine is not ready")
        for k, t in enumerate(token_ids):
            if not 0 <= t < 256:
                raise InvalidRequest(f"tokens[{k}] = {t} is not a token id of this model (0..255)")
        return bytes(token_ids).decode("utf-8", errors="replace")
