"""The benchmark's rows, one function each. Every function returns a JSON-ready dict; sizes come
from a Sizes (full run or --quick). All rows run in one process on the same weights."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from exporter.bench import ours
from exporter.bench.machine import copy_bandwidth
from exporter.bench.timing import combine, spread

REFERENCE_4B = Path("/work/shared/reference/qwen3-vl-4b-instruct.config.json")


@dataclasses.dataclass(frozen=True)
class Sizes:
    decode_prompt: int = 64
    decode_tokens: int = 64
    prefill_prompt: int = 256
    repeats: int = 3
    pool_repeats: int = 5
    streams: tuple[int, ...] = (1, 2, 4, 8)
    stream_tokens: int = 64
    pool_context: int = 512
    pool_tokens: int = 64
    pool_factor: int = 16
    pool_huge_bytes: int = 1 << 30    # row 4's third pool: at least this many bytes
    bw_prompt: int = 32
    bw_tokens: int = 32
    copy_bytes: int = 1 << 30
    lag_streams: int = 8
    lag_tokens: int = 64
    video_gops: tuple[int, ...] = (15, 60, 250)   # H.264 clips' keyframe intervals (frames)
    video_vp9_gop: int | None = 60    # and a VP9 clip (None: none)
    video_seconds: int = 20
    video_repeats: int = 3
    turn_tokens: int = 16             # the answer of the first chat turn in the warm row
    constrained_vocab: int = 151_936  # row 8's synthetic vocabulary (Qwen3-VL's size)


QUICK = Sizes(decode_prompt=16, decode_tokens=8, prefill_prompt=32, repeats=2, pool_repeats=2,
              streams=(1, 2), stream_tokens=8, pool_context=48, pool_tokens=4, pool_factor=16,
              pool_huge_bytes=32 << 20, bw_prompt=8,
              bw_tokens=4, copy_bytes=16 << 20, lag_streams=2, lag_tokens=8, video_gops=(15,),
              video_vp9_gop=None, video_seconds=2, video_repeats=1, turn_tokens=4,
              constrained_vocab=4096)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else a / b


async def decode_and_prefill(engine_dir: Path, model_dir: Path, threads: int, s: Sizes) -> dict:
    """Row 1: batch-1 decode tokens/s and cold prefill time, ours (INT8 and FP KV) vs transformers
    eager and sdpa, on the same prompt token ids. Each of the `repeats` runs uses its own prompt,
    which no earlier request used: every engine run is checked cold (ours.cold)."""
    from exporter.bench.hf import HFBaseline

    decode, prefill, texts, ids = {}, {}, {}, {}
    for mode in ("int8", "float"):
        engine = ours.load_engine(engine_dir, threads, kv_mode=mode)
        await engine.start()
        try:
            await ours.warm_up(engine, s.prefill_prompt)
            if not texts:
                texts = {"decode": ours.fresh_prompts(engine, s.decode_prompt, s.repeats),
                         "prefill": ours.fresh_prompts(engine, s.prefill_prompt, s.repeats)}
                ids = {k: [ours.prompt_ids(engine, t) for t in v] for k, v in texts.items()}
            decode[f"ours_{mode}"] = await ours.cold(engine, texts["decode"], s.decode_tokens,
                                                     f"decode ours_{mode}")
            prefill[f"ours_{mode}"] = await ours.cold(engine, texts["prefill"], 1, f"prefill ours_{mode}")
        finally:
            await engine.stop()
    for attn in ("eager", "sdpa"):
        hf = HFBaseline(model_dir, attn, threads)
        decode[f"transformers_{attn}"] = hf.decode(ids["decode"], s.decode_tokens)
        prefill[f"transformers_{attn}"] = hf.prefill(ids["prefill"])
        del hf
    one = await _one_thread(engine_dir, model_dir, ids["decode"], texts["decode"], s) if threads > 1 else None
    sdpa_rate = decode["transformers_sdpa"]["decode_tok_s"]
    sdpa_ttft = prefill["transformers_sdpa"]["ttft_s"]
    return {"decode": {"prompt_tokens": len(ids["decode"][0]), "new_tokens": s.decode_tokens,
                       "systems": decode, "one_thread": one,
                       "speedup_vs_sdpa": {k: ratio(v["decode_tok_s"], sdpa_rate) for k, v in decode.items()}},
            "prefill": {"prompt_tokens": len(ids["prefill"][0]), "cold": True, "systems": prefill,
                        "speedup_vs_sdpa": {k: ratio(sdpa_ttft, v["ttft_s"]) for k, v in prefill.items()}}}


def step_split(decode: dict, peers_json: Path | None, threads: int) -> dict:
    """Row 1b: our batch-1 decode step on this model split into the ONNX Runtime graph call and
    the Python around it (ours_int8, at the run's thread count and at 1 thread), beside
    llama.cpp's whole step on the same model when `make bench-peers` measured it (its JSON's
    "tiny" part, per thread count; nothing else is ever used as the peer's figure)."""
    peer = _peer_tiny_steps(peers_json)
    rows = {}
    for label, t, record in ((str(threads), threads, decode["systems"].get("ours_int8")),
                             ("1", 1, (decode.get("one_thread") or {}).get("ours_int8"))):
        split = (record or {}).get("step_breakdown")
        if split is None or label in rows:
            continue
        llama = peer.get(str(t))
        rows[label] = split | {"threads": t, "llama_cpp_step_ms": llama,
                               "vs_llama_cpp": ratio(split["step_ms"], llama)}
    return {"rows": rows, "peers_json": str(peers_json) if peers_json else None,
            "peer_known": bool(peer)}


def _peer_tiny_steps(path: Path | None) -> dict[str, float]:
    """llama.cpp f32 ms per token on this (the default) model by thread count, from bench-peers'
    JSON when it measured the default model; {} otherwise."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        by = json.loads(Path(path).read_text())["tiny"]["summary"]["by_threads"]
        return {t: float(rows["llama.cpp_f32"]["ms_per_token"]) for t, rows in by.items()
                if "llama.cpp_f32" in rows}
    except (KeyError, TypeError, ValueError):
        return {}


async def _one_thread(engine_dir: Path, model_dir: Path, ids: list[list[int]], texts: list[str],
                      s: Sizes) -> dict:
    """Reference at one thread each: on a small, shared machine torch's thread pool suffers far
    more from oversubscription than ONNX Runtime's, which inflates the equal-threads ratio.
    A new engine: the prompts of row 1 are cold for it."""
    from exporter.bench.hf import HFBaseline
    engine = ours.load_engine(engine_dir, 1, kv_mode="int8")
    await engine.start()
    try:
        await ours.warm_up(engine)
        mine = await ours.cold(engine, texts, s.decode_tokens, "decode ours_int8 at 1 thread")
    finally:
        await engine.stop()
    theirs = HFBaseline(model_dir, "sdpa", 1).decode(ids, s.decode_tokens)
    return {"ours_int8": mine, "transformers_sdpa": theirs,
            "speedup": ratio(mine["decode_tok_s"], theirs["decode_tok_s"])}


async def concurrency(engine_dir: Path, threads: int, s: Sizes) -> dict:
    """Row 2: aggregate generated tokens/s with 1, 2, 4, 8 concurrent streams (distinct prompts)."""
    return await _streams(engine_dir, threads, s.streams, s.decode_prompt, s.stream_tokens, s.repeats)


async def concurrency_bandwidth_bound(engine_dir: Path, threads: int, s: Sizes) -> dict:
    """Row 2b: the same on the bandwidth-bound model of row 5, where a decode step reads a few
    hundred MB of weights whatever the batch (the regime a 4B model decodes in): 1 and the top
    number of streams."""
    streams = (1, max(s.streams))
    return await _streams(engine_dir, threads, streams, s.bw_prompt, s.bw_tokens, s.repeats)


async def _streams(engine_dir: Path, threads: int, streams: tuple[int, ...], prompt: int,
                   max_tokens: int, repeats: int) -> dict:
    """Every try of every stream count gets prompts never used before (a repeated prompt would
    skip its prefill); the row is the median try, with min / median / max of the tries."""
    engine = ours.load_engine(engine_dir, threads)
    await engine.start()
    try:
        await ours.warm_up(engine)
        runs = []
        for n in streams:
            tries = []
            for _ in range(repeats):
                t = await ours.concurrent_streams(engine, ours.fresh_prompts(engine, prompt, n), max_tokens)
                if t["cached_tokens"]:
                    raise ours.CacheHit(f"{n} streams: {t['cached_tokens']} prompt tokens from the cache")
                tries.append(t)
            mid = sorted(tries, key=lambda r: r["tokens_per_s"])[len(tries) // 2]
            sp = spread(r["tokens_per_s"] for r in tries)
            runs.append(mid | {"tokens_per_s": sp["median"], "repeats": repeats, "cold_checked": True,
                               "spread": {"tokens_per_s": sp}})
    finally:
        await engine.stop()
    by_n = {r["streams"]: r["tokens_per_s"] for r in runs}
    top = max(streams)
    return {"engine": str(engine_dir), "max_tokens": max_tokens, "kv_mode": "int8", "runs": runs,
            "top_streams": top, "ratio_top_to_1": ratio(by_n.get(top), by_n.get(1))}


def kv_bytes(engine_dir: Path) -> dict:
    """Row 3: KV bytes per token, INT8 (+ f32 scales) vs FP16, from the pool and from the plan."""
    from exporter.plan import kv_bytes_per_token
    from runtime import manifest as mf
    from runtime.kv_cache import KVShape

    kv = mf.load_manifest(engine_dir, verify_hashes=False).kv
    shape = KVShape.from_layout(kv)
    out = {"default": {"layers": kv.num_layers, "kv_heads": kv.num_kv_heads, "head_dim": kv.head_dim,
                       "int8_pool": shape.bytes_per_token("int8"),
                       "fp16_pool": shape.bytes_per_token("float16"),
                       "int8_plan": kv_bytes_per_token(kv.num_layers, kv.num_kv_heads, kv.head_dim, "int8"),
                       "fp16_plan": kv_bytes_per_token(kv.num_layers, kv.num_kv_heads, kv.head_dim, "float16")}}
    if REFERENCE_4B.is_file():
        t = json.loads(REFERENCE_4B.read_text())["text_config"]
        args = (t["num_hidden_layers"], t["num_key_value_heads"], t["head_dim"])
        out["qwen3-vl-4b"] = {"layers": args[0], "kv_heads": args[1], "head_dim": args[2],
                              "int8_plan": kv_bytes_per_token(*args, "int8"),
                              "fp16_plan": kv_bytes_per_token(*args, "float16")}
    for row in out.values():
        row["int8_over_fp16"] = row["int8_plan"] / row["fp16_plan"]
    return out


async def pool_flatness(engine_dir: Path, threads: int, s: Sizes) -> dict:
    """Row 4: batch-1 decode step time at a fixed context with a small pool, a pool pool_factor
    times larger and a pool of at least pool_huge_bytes: a step must not cost more because the
    pool is bigger. The pools are set through EngineConfig.kv_blocks and their bytes read from
    Engine.stats() (public knobs only). The engines run alternately (small, large, huge, small,
    ...) so load from elsewhere hits all alike; each repeat uses a new prompt (checked cold)."""
    from runtime import manifest as mf
    block = mf.load_manifest(engine_dir, verify_hashes=False).kv.block_size
    small = -(-(s.pool_context + s.pool_tokens + 16) // block) + 2
    engines = {"small": ours.load_engine(engine_dir, threads, kv_blocks=small),
               "large": ours.load_engine(engine_dir, threads, kv_blocks=small * s.pool_factor)}
    per_block = engines["small"].stats().kv_bytes_per_token * block
    engines["huge"] = ours.load_engine(engine_dir, threads, kv_blocks=-(-s.pool_huge_bytes // per_block))
    runs: dict[str, dict] = {}
    try:
        for engine in engines.values():
            await engine.start()
            await ours.warm_up(engine, s.pool_context)
        texts = ours.fresh_prompts(engines["small"], s.pool_context, s.pool_repeats)
        tries: dict[str, list[dict]] = {label: [] for label in engines}
        for text in texts:
            for label, engine in engines.items():
                tries[label].append(await ours.timed(engine, ours.request(text, s.pool_tokens)))
        for label, engine in engines.items():
            ours.assert_cold(tries[label], f"pool {label}")
            r = combine(tries[label])
            st = engine.stats()
            runs[label] = {"kv_blocks": st.kv_blocks_total,
                           "pool_bytes": st.kv_blocks_total * block * st.kv_bytes_per_token,
                           "context_tokens": r["prompt_tokens"], "step_ms": r["step_ms"],
                           "spread": r["spread"], "cold_checked": True}
    finally:
        for engine in engines.values():
            await engine.stop()
    return {"runs": runs, "factor": s.pool_factor, "repeats": s.pool_repeats,
            "large_over_small": ratio(runs["large"]["step_ms"], runs["small"]["step_ms"]),
            "huge_over_small": ratio(runs["huge"]["step_ms"], runs["small"]["step_ms"])}


async def roofline(engine_dir: Path, threads: int, s: Sizes) -> dict:
    """Row 5: batch-1 decode step of a bandwidth-bound model against bytes read / copy bandwidth
    (each repeat a new prompt, checked cold)."""
    from runtime import manifest as mf
    m = mf.load_manifest(engine_dir, verify_hashes=False)
    plan = m.profile["memory_plan"]
    weight_bytes = int(plan["params"]["decoder"]) * {"float32": 4, "float16": 2}.get(m.dtype, 4)
    engine = ours.load_engine(engine_dir, threads, kv_blocks=(-(-(s.bw_prompt + s.bw_tokens + 32)
                                                                 // m.kv.block_size) + 2) * (s.repeats + 1))
    await engine.start()
    try:
        await ours.warm_up(engine)
        texts = ours.fresh_prompts(engine, s.bw_prompt, s.repeats)
        r = await ours.cold(engine, texts, s.bw_tokens, "roofline")
        kv_tok = engine.stats().kv_bytes_per_token
        ids = [ours.prompt_ids(engine, t) for t in texts]
    finally:
        await engine.stop()
    hf_step = None
    if Path(m.source["path"]).is_dir():          # transformers on the same weights, same prompts
        from exporter.bench.hf import HFBaseline
        hf = HFBaseline(Path(m.source["path"]), "sdpa", threads)
        hf_step = hf.decode(ids, s.bw_tokens)["step_ms"]
        del hf
    n = r["prompt_tokens"]
    mean_ctx = n + s.bw_tokens / 2
    step_bytes = weight_bytes + int(mean_ctx * kv_tok)
    bw = copy_bandwidth(s.copy_bytes)
    floor_copy = step_bytes / (bw["copy_gb_s"] * 1e9)
    floor_read = step_bytes / (bw["read_gb_s"] * 1e9)
    step = r["step_ms"] / 1e3
    return {"engine": str(engine_dir), "hidden": m.hidden_size, "layers": m.kv.num_layers,
            "vocab": m.vocab_size, "decoder_weight_bytes": weight_bytes, "kv_bytes_per_token": kv_tok,
            "mean_context": mean_ctx, "bytes_per_step": step_bytes, "step_ms": r["step_ms"],
            "spread": r["spread"], "repeats": s.repeats, "cold_checked": True,
            "bandwidth": bw, "roofline_step_ms": floor_copy * 1e3,
            "roofline_step_ms_read_only": floor_read * 1e3,
            "pct_of_roofline": 100 * floor_copy / step, "pct_of_roofline_read_only": 100 * floor_read / step,
            "effective_gb_s": step_bytes / step / 1e9, "transformers_sdpa_step_ms": hf_step,
            "speedup_vs_sdpa": ratio(hf_step, r["step_ms"])}


_VIDEO_CHILD = """
import json, sys
from exporter.bench.video import bench_video_extraction
a = json.loads(sys.argv[2])
print(json.dumps(bench_video_extraction(sys.argv[1], gops=tuple(a["gops"]), vp9_gop=a["vp9_gop"],
                                        seconds=a["seconds"], repeats=a["repeats"])))
"""


def video(cache_dir: Path, s: Sizes) -> dict:
    """Row 7: exporter.bench.video, ours against vLLM's PyAV loader, ffmpeg (llama.cpp's way)
    and decode-every-frame on the same frames. Run from a small child process, which starts a
    fresh process per timed run (peak RSS read from VmHWM, reset per run)."""
    args = {"gops": list(s.video_gops), "vp9_gop": s.video_vp9_gop, "seconds": s.video_seconds,
            "repeats": s.video_repeats}
    proc = subprocess.run([sys.executable, "-c", _VIDEO_CHILD, str(cache_dir), json.dumps(args)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"video_bench failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def video_cache_dir(quick: bool) -> Path:
    from exporter.bench.bw_model import CACHE
    return Path(tempfile.mkdtemp(prefix="bench_video_")) if quick else CACHE / "bench-video"


def default_threads() -> int:
    return os.cpu_count() or 1
