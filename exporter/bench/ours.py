"""Our side of the benchmark: the real Engine (loop thread, scheduler, runner over the paged pool),
driven through `Engine.generate` exactly as the server drives it.

Every measured request ignores end-of-sequence (as vLLM's and llama.cpp's benchmarks do), so each
produces exactly its max_tokens and token counts are equal across the systems compared.
"""
from __future__ import annotations

import asyncio
import random
import statistics
import time
from pathlib import Path

from exporter.bench.timing import combine, intervals_ms
from runtime.api import ChatMessage, GenerationRequest, SamplingParams, TextPart
from runtime.engine import Engine
from runtime.engine_config import EngineConfig

WORDS = ("there is a red circle in the top left and two blue squares below it the picture "
         "shows three green triangles how many shapes are there what colour is the star").split()


def load_engine(engine_dir: Path, threads: int, kv_mode: str | None = None,
                kv_blocks: int | None = None, config: EngineConfig | None = None) -> Engine:
    import dataclasses
    base = config or EngineConfig()
    engine = Engine.load(engine_dir, dataclasses.replace(
        base, kv_mode=kv_mode or base.kv_mode, kv_blocks=kv_blocks or base.kv_blocks,
        intra_op_threads=threads, verify_hashes=False))
    ignore_eos(engine)
    engine.bench_clock = StepClock(engine)
    return engine


class StepClock:
    """Benchmark instrumentation: wraps the engine's runner.execute to record when each decoder
    step starts, on the loop thread. The interval between two step starts is one whole engine
    step (schedule, graph call, sampling, posting). Timestamps taken where the deltas are
    consumed would not do: deltas queued while the event loop is busy arrive back to back."""

    def __init__(self, engine: Engine):
        self.starts: list[float] = []
        execute = engine.runner.execute

        def timed_execute(chunks):
            self.starts.append(time.perf_counter())
            return execute(chunks)
        engine.runner.execute = timed_execute


def ignore_eos(engine: Engine) -> None:
    """Benchmark only: generation runs to max_tokens (EOS is an ordinary token)."""
    engine.scheduler.eos_token_ids = frozenset()


def prompt_text(engine: Engine, n_tokens: int, salt: int = 0) -> tuple[str, int]:
    """User text whose chat-templated prompt has about n_tokens tokens (at least n_tokens, or
    one word past it). Returns (text, exact prompt token count)."""
    rng = random.Random(salt)
    words: list[str] = []
    count = 0
    while count < n_tokens:
        words.append(rng.choice(WORDS))
        count = len(prompt_ids(engine, " ".join(words)))
    return " ".join(words), count


def prompt_ids(engine: Engine, text: str) -> list[int]:
    return engine.preparer.prepare(request(text, 1)).token_ids.tolist()


def request(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", (TextPart(text),)),),
                             SamplingParams(max_tokens=max_tokens))


async def timed(engine: Engine, req: GenerationRequest) -> dict:
    """One request alone on the engine: wall seconds, time to first token, generated tokens,
    decode tokens/s, and its decode step intervals (StepClock)."""
    clock: StepClock = engine.bench_clock
    start = time.perf_counter()
    first_step = len(clock.starts)
    usage = None
    async for delta in engine.generate(req):
        usage = delta.usage or usage
    total = time.perf_counter() - start
    n = usage.completion_tokens
    # this request ran alone: its prefill chunk(s), then n - 1 decode steps
    stamps = clock.starts[first_step:][-(n - 1):] if n > 1 else []
    decode = total - usage.time_to_first_token
    return {"prompt_tokens": usage.prompt_tokens, "tokens": n, "seconds": total,
            "ttft_s": usage.time_to_first_token, "decode_s": decode,
            "decode_tok_s": (n - 1) / decode if n > 1 and decode > 0 else None,
            "step_ms": 1e3 * decode / (n - 1) if n > 1 else None, "intervals_ms": intervals_ms(stamps)}


async def best_of(engine: Engine, req: GenerationRequest, repeats: int) -> dict:
    """`repeats` runs combined as exporter.bench.timing.combine says."""
    return combine([await timed(engine, req) for _ in range(repeats)])


async def warm_up(engine: Engine) -> None:
    await timed(engine, request("hello", 4))


async def concurrent_streams(engine: Engine, texts: list[str], max_tokens: int) -> dict:
    """len(texts) requests at once through Engine.generate; aggregate generated tokens/s."""
    start = time.perf_counter()
    steps0 = engine.step_count
    runs = await asyncio.gather(*(timed(engine, request(t, max_tokens)) for t in texts))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in runs)
    return {"streams": len(texts), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "engine_steps": engine.step_count - steps0,
            "mean_ttft_s": statistics.fmean(r["ttft_s"] for r in runs)}
