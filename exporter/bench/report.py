"""The printed table and the goal checks, from the benchmark's JSON result (nothing measured here)."""
from __future__ import annotations

GOALS = (  # (key, description, target, how the value is read from the result)
    ("decode_vs_sdpa", "batch-1 decode >= 3x transformers sdpa", 3.0,
     lambda r: r["decode"]["speedup_vs_sdpa"]["ours_int8"]),
    ("streams_ratio", "8 streams >= 4x the aggregate of one (default model)", 4.0,
     lambda r: r["concurrency"]["ratio_top_to_1"] if r["concurrency"]["top_streams"] == 8 else None),
    ("streams_ratio_bw", "8 streams >= 4x the aggregate of one (bandwidth-bound model)", 4.0,
     lambda r: r["concurrency_bw"]["ratio_top_to_1"] if r["concurrency_bw"]["top_streams"] == 8 else None),
    ("roofline_pct", ">= 70% of the DRAM roofline", 70.0,
     lambda r: r["roofline"]["pct_of_roofline"]),
    ("video_speedup", "video frame extraction >= 10x decode-every-frame (worst GOP)", 10.0,
     lambda r: min(v["speedup"] for v in r["video"]["runs"].values())),
)


def goals(result: dict) -> list[dict]:
    out = []
    for key, text, target, get in GOALS:
        try:
            value = get(result)
        except (KeyError, TypeError, ValueError):
            value = None
        out.append({"goal": key, "description": text, "target": target, "value": value,
                    "met": None if value is None else bool(value >= target)})
    return out


def _f(x, fmt="{:.1f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _goal(result: dict, key: str) -> str:
    g = next((g for g in result.get("goals", []) if g["goal"] == key), None)
    if g is None or g["met"] is None:
        return ""
    return f"goal >= {g['target']:g}{'%' if key == 'roofline_pct' else 'x'}: {'MET' if g['met'] else 'NOT MET'}"


def table(r: dict) -> str:
    mi = r["machine"]
    lines = [f"benchmark of {r['engine']} ({'--quick' if r['quick'] else 'full run'}) on {mi['cores']} cores "
             f"{mi['cpu_model']}, {mi['threads']} threads (torch = ORT intra-op), onnxruntime "
             f"{mi['onnxruntime']}, torch {mi['torch']}, transformers {mi['transformers']}, "
             f"providers {', '.join(mi['providers_used'])}; load avg at start {mi['load_average_at_start']}"]
    row = lambda *c: lines.append(f"  {c[0]:<34} {c[1]:>12} {c[2]:>10}  {c[3] if len(c) > 3 else ''}".rstrip())
    if "decode" in r:
        d, p = r["decode"], r["prefill"]
        lines.append(f"1. batch-1 decode: {d['prompt_tokens']}-token prompt, {d['new_tokens']} greedy tokens")
        row("system", "tokens/s", "vs sdpa", "(1000 / median inter-token ms; best run's mean tok/s)")
        for k, v in d["systems"].items():
            row(k, _f(v["decode_tok_s"]), _f(d["speedup_vs_sdpa"][k], "{:.2f}x"),
                f"mean {_f(v['decode_tok_s_best_run_mean'])}  "
                + (_goal(r, "decode_vs_sdpa") if k == "ours_int8" else ""))
        one = d.get("one_thread")
        if one:
            row("at 1 thread each: ours_int8", _f(one["ours_int8"]["decode_tok_s"]),
                _f(one["speedup"], "{:.2f}x"), "vs transformers_sdpa at 1 thread")
            row("at 1 thread each: transformers_sdpa", _f(one["transformers_sdpa"]["decode_tok_s"]),
                "1.00x")
        lines.append(f"   prefill: {p['prompt_tokens']}-token prompt, time to first token")
        row("system", "ms", "vs sdpa")
        for k, v in p["systems"].items():
            row(k, _f(1e3 * v["ttft_s"]), _f(p["speedup_vs_sdpa"][k], "{:.2f}x"))
    if "concurrency" in r:
        c = r["concurrency"]
        lines.append(f"2. concurrent streams through Engine.generate ({c['max_tokens']} tokens each, INT8 KV)")
        row("streams", "tokens/s", "steps")
        for run in c["runs"]:
            row(str(run["streams"]), _f(run["tokens_per_s"]), str(run["engine_steps"]))
        row(f"{c['top_streams']} streams / 1 stream", "", _f(c["ratio_top_to_1"], "{:.2f}x"),
            _goal(r, "streams_ratio"))
    if "concurrency_bw" in r:
        c = r["concurrency_bw"]
        lines.append(f"2b. concurrent streams on the bandwidth-bound model of row 5 ({c['max_tokens']} tokens "
                     f"each, INT8 KV)")
        row("streams", "tokens/s", "steps")
        for run in c["runs"]:
            row(str(run["streams"]), _f(run["tokens_per_s"]), str(run["engine_steps"]))
        row(f"{c['top_streams']} streams / 1 stream", "", _f(c["ratio_top_to_1"], "{:.2f}x"),
            _goal(r, "streams_ratio_bw"))
    if "kv_bytes" in r:
        lines.append("3. KV bytes per token (K+V, all layers; INT8 includes f32 per-token-per-head scales)")
        row("model", "INT8", "FP16", "INT8/FP16")
        for name, k in r["kv_bytes"].items():
            row(f"{name} ({k['layers']}L x {k['kv_heads']}kvh x {k['head_dim']})",
                f"{k['int8_plan']:,}", f"{k['fp16_plan']:,}", f"{k['int8_over_fp16']:.3f}")
    if "pool_flatness" in r:
        pf = r["pool_flatness"]
        lines.append("4. decode step at fixed context vs KV pool size (batch 1, INT8 KV)")
        row("pool", "step ms", "context")
        for label, run in pf["runs"].items():
            row(f"{label}: {run['kv_blocks']} blocks, {run['pool_bytes'] / 2**20:.1f} MiB",
                _f(run["step_ms"], "{:.2f}"), str(run["context_tokens"]),
                f"{pf['repeats']} runs alternating; best run mean {_f(run['step_ms_best_run_mean'], '{:.2f}')} ms")
        row(f"{pf['factor']}x pool / small pool", "", _f(pf["large_over_small"], "{:.3f}x"), "must be ~1.0")
    if "roofline" in r:
        rf, bw = r["roofline"], r["roofline"]["bandwidth"]
        lines.append(f"5. bandwidth-bound decode: hidden {rf['hidden']}, {rf['layers']} layers, vocab "
                     f"{rf['vocab']}; {rf['decoder_weight_bytes'] / 1e6:.0f} MB decoder weights + LM head")
        row("numpy copy bandwidth (r+w)", _f(bw["copy_gb_s"], "{:.2f}"), "GB/s",
            f"read-only convention {bw['read_gb_s']:.2f} GB/s; {bw['array_bytes'] / 2**20:.0f} MiB array")
        row("bytes read per step", f"{rf['bytes_per_step'] / 1e6:.1f}", "MB",
            f"weights + KV at mean context {rf['mean_context']:.0f}")
        row("roofline step", _f(rf["roofline_step_ms"], "{:.2f}"), "ms")
        row("measured step (batch 1)", _f(rf["step_ms"], "{:.2f}"), "ms",
            f"median inter-token; effective {rf['effective_gb_s']:.2f} GB/s")
        row("transformers sdpa step, same model", _f(rf.get("transformers_sdpa_step_ms"), "{:.2f}"), "ms",
            f"ours is {_f(rf.get('speedup_vs_sdpa'), '{:.2f}x')} faster")
        row("% of roofline", _f(rf["pct_of_roofline"]), "%",
            f"{_goal(r, 'roofline_pct')} ({_f(rf['pct_of_roofline_read_only'])}% vs read-only bandwidth)")
    if "event_loop_lag" in r:
        lg = r["event_loop_lag"]
        lines.append(f"6. event-loop lag, aiohttp app + real engine, {lg['streams']} SSE streams x "
                     f"{lg['max_tokens']} tokens (sleep {lg['interval_ms']:g} ms overshoot)")
        row("", "p50 ms", "p99 ms", "max ms")
        for k in ("idle", "loaded"):
            row(f"{k} ({lg[k]['samples']} samples)", _f(lg[k]["p50_ms"], "{:.2f}"),
                _f(lg[k]["p99_ms"], "{:.2f}"), _f(lg[k]["max_ms"], "{:.2f}"))
    if "video" in r:
        v = r["video"]
        lines.append(f"7. video extraction: {v['clip']}, ours vs decode-every-frame (fresh process each)")
        row("GOP: ours / baseline", "extract s", "speedup",
            "end to end s; peak RSS MB, tracemalloc peak MB, frames decoded: ours / baseline")
        for gop, run in v["runs"].items():
            o, b = run["ours"], run["baseline"]
            row(gop, f"{o['extract_seconds']:.2f} / {b['extract_seconds']:.2f}", _f(run["speedup"], "{:.1f}x"),
                f"total {o['seconds']:.2f} / {b['seconds']:.2f} ({_f(run.get('total_speedup'), '{:.1f}x')}); "
                f"RSS {o['peak_rss_mb']:.0f} / {b['peak_rss_mb']:.0f}; traced {o['tracemalloc_peak_mb']:.0f} / "
                f"{b['tracemalloc_peak_mb']:.0f}; frames {o['frames_decoded']} / {b['frames_decoded']} ({o['mode']})")
        row("worst GOP", "", "", _goal(r, "video_speedup"))
    lines.append("goals: " + "; ".join(
        f"{g['description']}: {_f(g['value'], '{:.2f}')} -> "
        f"{'MET' if g['met'] else 'not met' if g['met'] is not None else 'not measured'}"
        for g in r.get("goals", [])))
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)
