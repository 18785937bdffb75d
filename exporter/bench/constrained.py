"""Row 8: what constrained decoding (response_format, forced tool calls) costs per token.

  * batch 1 on the real engine: greedy decode of a plain answer beside a `json_object` answer
    (both ignore EOS, fresh prompts of the same length), tokens/s side by side, and per constrained
    token where the time went (runtime.constrained.ConstraintStats): computing the mask in the
    worker thread (off the critical path), the loop thread blocked waiting for it, and all the
    loop thread spent on the grammar (wait + applying the mask + consuming the token);
  * neighbours: the top number of concurrent plain streams, alone and with one constrained stream
    among them: the plain streams' aggregate tokens/s either way (a mask must not stall them);
  * the mask alone at a Qwen-sized vocabulary: llguidance over a synthetic 151,936-token byte-level
    vocabulary (random tokens: the real one is not on this machine), ms per mask for a JSON schema.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from pathlib import Path

from exporter.bench import ours
from exporter.bench.timing import combine, spread
from runtime.api import SamplingParams
import llguidance as llg

from runtime.constrained import Constraints, Matcher, json_object_grammar, json_schema_grammar

QWEN_VOCAB = 151_936
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["action", "x", "y", "text"],
          "properties": {"action": {"enum": ["click", "type", "scroll"]},
                         "x": {"type": "integer"}, "y": {"type": "integer"},
                         "text": {"type": "string", "maxLength": 40}}}


def _constrained(req, grammar):
    return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, grammar=grammar))


class GrammarClock:
    """Benchmark instrumentation: the loop thread's time in Constraints.apply + advance per step
    (one constrained row at batch 1: per token), and each mask's time in the grammar thread."""

    def __init__(self, constraints: Constraints):
        self.loop_ms: list[float] = []
        self.mask_ms: list[float] = []
        apply, advance = constraints.apply, constraints.advance

        def timed_apply(entries, logits):
            t = time.perf_counter()
            out = apply(entries, logits)
            self._t = time.perf_counter() - t
            self.mask_ms += [1e3 * e.seq.constraint.mask_s for e in entries if e.seq.constraint]
            return out

        def timed_advance(entries, tokens):
            t = time.perf_counter()
            advance(entries, tokens)
            if any(e.seq.constraint for e in entries):
                self.loop_ms.append(1e3 * (self._t + time.perf_counter() - t))
        constraints.apply, constraints.advance = timed_apply, timed_advance


async def _neighbours(engine, n: int, prompt: int, tokens: int, grammar) -> float:
    """Median decode tokens/s of a plain stream among n (one of them constrained when grammar is
    set)."""
    reqs = [ours.request(t, tokens) for t in ours.fresh_prompts(engine, prompt, n)]
    if grammar is not None:
        reqs[0] = _constrained(reqs[0], grammar)
    runs = await asyncio.gather(*(ours.timed(engine, r) for r in reqs))
    plain = runs[1:] if grammar is not None else runs
    return statistics.median(r["decode_tok_s"] for r in plain)


def synthetic_vocab_mask_ms(vocab: int = QWEN_VOCAB, steps: int = 40, seed: int = 0) -> dict:
    """ms per mask (llguidance, one thread) for SCHEMA over a random byte-level vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = set(alphabet)
    while len(words) < vocab - 1:
        words.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9))))
    table = {w: i for i, w in enumerate(sorted(words))}
    table["<|im_end|>"] = len(table)
    tok = Tokenizer(models.BPE(vocab=table, merges=[]))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t = time.perf_counter()
    cons = Constraints(tok.to_str(), len(table), [table["<|im_end|>"]], threads=1)
    grammar = json_schema_grammar(SCHEMA, "bench")
    m = Matcher(llg.LLMatcher(cons.tokenizer, grammar.source, log_level=0), len(table), "bench")
    build_s = time.perf_counter() - t
    times = []
    text = '{"action": "click", "x": 120, "y": 48, "text": "OK"}'
    for tid in cons.tokenizer.tokenize_str(text)[:steps]:
        t = time.perf_counter()
        m._compute()                          # the worker thread's job, timed on this thread
        times.append(1e3 * (time.perf_counter() - t))
        m.consume(tid)
    assert m.error is None, m.error
    cons.close()
    return {"vocab": len(table), "tokenizer_and_matcher_s": build_s, "masks": len(times),
            "mask_ms": statistics.median(times), "spread": spread(times)}


async def constrained(engine_dir: Path, threads: int, s) -> dict:
    engine = ours.load_engine(engine_dir, threads)
    await engine.start()
    clock = GrammarClock(engine.core.constraints)
    # A JSON object whose one string is about as long as the plain answer: a bare json_object
    # lets the default model close it at once ("{}", two tokens), which times nothing.
    grammar = json_schema_grammar(
        {"type": "object", "additionalProperties": False, "required": ["answer"],
         "properties": {"answer": {"type": "string", "minLength": 2 * s.decode_tokens,
                                   "maxLength": 2 * s.decode_tokens}}},
        "bench", "fixed-length answer")
    try:
        await ours.warm_up(engine)
        await ours.timed(engine, _constrained(ours.request("warm up", 4), grammar))
        plain, cons = [], []
        clock.loop_ms.clear(), clock.mask_ms.clear()
        for _ in range(s.repeats):
            a, b = ours.fresh_prompts(engine, s.decode_prompt, 2)
            plain.append(await ours.timed(engine, ours.request(a, s.decode_tokens)))
            cons.append(await ours.timed(engine, _constrained(ours.request(b, s.decode_tokens), grammar)))
        loop_ms, mask_ms = list(clock.loop_ms), list(clock.mask_ms)
        ours.assert_cold(plain + cons, "constrained row")
        p, c = combine(plain), combine(cons)
        n = max(s.streams)
        alone, mixed = [], []
        for _ in range(s.repeats):
            alone.append(await _neighbours(engine, n, s.decode_prompt, s.stream_tokens, None))
            mixed.append(await _neighbours(engine, n, s.decode_prompt, s.stream_tokens, grammar))
    finally:
        await engine.stop()
    out = {"prompt_tokens": p["prompt_tokens"], "max_tokens": s.decode_tokens,
           "plain": p, "json_object": c,
           "json_over_plain": (c["decode_tok_s"] / p["decode_tok_s"]
                               if c["decode_tok_s"] and p["decode_tok_s"] else None),
           "per_token": {"mask_ms": statistics.median(mask_ms), "loop_ms": statistics.median(loop_ms),
                         "tokens": len(loop_ms),
                         "spread": {"mask_ms": spread(mask_ms), "loop_ms": spread(loop_ms)}},
           "neighbours": {"streams": n, "tokens": s.stream_tokens,
                          "plain_alone_tok_s": statistics.median(alone),
                          "plain_with_one_constrained_tok_s": statistics.median(mixed),
                          "spread": {"alone": spread(alone), "mixed": spread(mixed)}},
           "synthetic_qwen_vocab": await asyncio.get_running_loop().run_in_executor(
               None, synthetic_vocab_mask_ms, s.constrained_vocab)}
    nb = out["neighbours"]
    nb["ratio"] = nb["plain_with_one_constrained_tok_s"] / nb["plain_alone_tok_s"]
    json.dumps(out)                          # JSON-ready
    return out
