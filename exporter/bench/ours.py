"""Our side of the benchmark: the real Engine (loop thread, scheduler, runner over the paged pool),
driven through `Engine.generate` exactly as the server drives it.

Every measured request ignores end-of-sequence (SamplingParams.ignore_eos, as vLLM's and
llama.cpp's benchmarks do), so each produces exactly its max_tokens and token counts are equal
across the systems compared.

Cold means cold: the engine has a prefix cache, so a prompt it has seen before is answered from
cached KV blocks. Every timed run that claims to measure prefill or decode therefore uses a prompt
no earlier request used (`fresh_prompts`: a new salt each), and `cold` checks the engine's own
counters (Usage.cached_tokens, the block manager's prefix hits) and raises CacheHit otherwise.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import statistics
import time
from pathlib import Path

import numpy as np

from exporter.bench.timing import combine, intervals_ms
from runtime.api import ChatMessage, GenerationRequest, ImagePart, SamplingParams, TextPart
from runtime.engine import Engine
from runtime.engine_config import EngineConfig

WORDS = ("there is a red circle in the top left and two blue squares below it the picture "
         "shows three green triangles how many shapes are there what colour is the star").split()

_salts = itertools.count(10_000)     # process-wide: no two fresh prompts share a salt


class CacheHit(AssertionError):
    """A run meant to be cold was (partly) served from the prefix cache: the row would lie."""


def load_engine(engine_dir: Path, threads: int, kv_mode: str | None = None,
                kv_blocks: int | None = None, config: EngineConfig | None = None) -> Engine:
    base = config or EngineConfig()
    engine = Engine.load(engine_dir, dataclasses.replace(
        base, kv_mode=kv_mode or base.kv_mode, kv_blocks=kv_blocks or base.kv_blocks,
        intra_op_threads=threads, verify_hashes=False))
    engine.bench_clock = StepClock(engine)
    return engine


class StepClock:
    """Benchmark instrumentation: wraps the engine's runner.execute to record when each decoder
    step starts, on the loop thread, and how long its graph calls took (the binding's
    run_seconds_total). The interval between two step starts is one whole engine step (schedule,
    graph call, sampling, posting); that interval less the step's graph time is the Python around
    the graph. Timestamps taken where the deltas are consumed would not do: deltas queued while
    the event loop is busy arrive back to back."""

    def __init__(self, engine: Engine):
        self.starts: list[float] = []
        self.run_s: list[float] = []         # per step: seconds inside ONNX Runtime
        self.argmax: list[int | None] = []   # per step: the greedy token when one sequence ran
        execute = engine.runner.execute
        binding = engine.runner.binding

        def timed_execute(chunks, on_launch=None):
            self.starts.append(time.perf_counter())
            before = binding.run_seconds_total
            logits = execute(chunks, on_launch)
            self.run_s.append(binding.run_seconds_total - before)
            self.argmax.append(int(np.argmax(next(iter(logits.values())))) if len(logits) == 1 else None)
            return logits
        engine.runner.execute = timed_execute


def prefix_hits(engine: Engine) -> int:
    """KV blocks the engine has served from its prefix cache so far (block manager counter)."""
    return engine.block_manager.num_prefix_hits


def prompt_text(engine: Engine, n_tokens: int, salt: int = 0) -> tuple[str, int]:
    """User text whose chat-templated prompt has n_tokens tokens (exactly, when a last word that
    lands on it exists; otherwise one word past it). Returns (text, exact prompt token count)."""
    rng = random.Random(salt)
    words: list[str] = []
    count = 0
    while count < n_tokens:
        words.append(rng.choice(WORDS))
        count = len(prompt_ids(engine, " ".join(words)))
    if count > n_tokens:
        for w in rng.sample(WORDS, len(WORDS)):
            c = len(prompt_ids(engine, " ".join(words[:-1] + [w])))
            if c == n_tokens:
                words[-1], count = w, c
                break
    return " ".join(words), count


def fresh_prompts(engine: Engine, n_tokens: int, count: int) -> list[str]:
    """`count` prompts of n_tokens, each with a salt never used before in this process."""
    return [prompt_text(engine, n_tokens, salt=next(_salts))[0] for _ in range(count)]


def prompt_ids(engine: Engine, text: str) -> list[int]:
    return engine.preparer.prepare(request(text, 1)).token_ids.tolist()


def request(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", (TextPart(text),)),),
                             SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def chat(messages: tuple[ChatMessage, ...], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(messages, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def image_turn(image: bytes, text: str) -> ChatMessage:
    return ChatMessage("user", (ImagePart(image), TextPart(text)))


async def timed(engine: Engine, req: GenerationRequest) -> dict:
    """One request alone on the engine: wall seconds, time to first token, generated tokens,
    decode tokens/s, its decode step intervals (StepClock), the prompt tokens the engine served
    from its prefix cache (Usage.cached_tokens) and the block manager's prefix hits meanwhile."""
    clock: StepClock = engine.bench_clock
    hits0 = prefix_hits(engine)
    start = time.perf_counter()
    first_step = len(clock.starts)
    usage, text = None, []
    async for delta in engine.generate(req):
        usage = delta.usage or usage
        text.append(delta.text)
    total = time.perf_counter() - start
    n = usage.completion_tokens
    # this request ran alone: its prefill chunk(s), then n - 1 decode steps
    stamps = clock.starts[first_step:][-(n - 1):] if n > 1 else []
    # graph time of the steps those intervals start with (interval k = step k's whole cost)
    runs_ms = [1e3 * t for t in clock.run_s[first_step:][-(n - 1):][:-1]] if n > 2 else []
    decode = total - usage.time_to_first_token
    # the tokens it generated (greedy runs alone): TokenDelta.token_ids leaves out tokens whose
    # text is still empty (an incomplete UTF-8 sequence), the step's argmax does not
    ids = [t for t in clock.argmax[first_step:] if t is not None][-n:]
    return {"prompt_tokens": usage.prompt_tokens, "tokens": n, "seconds": total,
            "ttft_s": usage.time_to_first_token, "decode_s": decode,
            "decode_tok_s": (n - 1) / decode if n > 1 and decode > 0 else None,
            "step_ms": 1e3 * decode / (n - 1) if n > 1 else None, "intervals_ms": intervals_ms(stamps),
            "run_ms": runs_ms,
            "cached_tokens": usage.cached_tokens, "prefix_block_hits": prefix_hits(engine) - hits0,
            "text": "".join(text), "token_ids": ids}


def assert_cold(runs: list[dict], what: str) -> None:
    """Raise CacheHit unless no run had a prompt token served from the prefix cache."""
    bad = [(r["cached_tokens"], r["prefix_block_hits"]) for r in runs
           if r["cached_tokens"] or r["prefix_block_hits"]]
    if bad:
        raise CacheHit(f"{what}: {len(bad)} of {len(runs)} runs meant to be cold hit the prefix cache "
                       f"(cached tokens, block hits) = {bad}")


async def cold(engine: Engine, texts: list[str], max_tokens: int, what: str) -> dict:
    """One run per (never seen) prompt, combined (exporter.bench.timing.combine); checked cold."""
    runs = [await timed(engine, request(t, max_tokens)) for t in texts]
    assert_cold(runs, what)
    out = combine(runs)
    out["cold_checked"] = True
    return out


async def warm_up(engine: Engine, n_tokens: int = 0) -> None:
    """Untimed first requests (graph first-run costs): a short one, and with n_tokens a prompt of
    that size too (its own salt, so it warms no later prompt's cache)."""
    await timed(engine, request("hello", 4))
    if n_tokens:
        await timed(engine, request(fresh_prompts(engine, n_tokens, 1)[0], 4))


async def concurrent_streams(engine: Engine, texts: list[str], max_tokens: int) -> dict:
    """len(texts) requests at once through Engine.generate; aggregate generated tokens/s."""
    start = time.perf_counter()
    steps0 = engine.step_count
    runs = await asyncio.gather(*(timed(engine, request(t, max_tokens)) for t in texts))
    wall = time.perf_counter() - start
    tokens = sum(r["tokens"] for r in runs)
    return {"streams": len(texts), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall, "engine_steps": engine.step_count - steps0,
            "mean_ttft_s": statistics.fmean(r["ttft_s"] for r in runs),
            "cached_tokens": sum(r["cached_tokens"] for r in runs)}
