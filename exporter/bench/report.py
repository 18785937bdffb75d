"""The printed table and the goal checks, from the benchmark's JSON result (nothing measured here)."""
from __future__ import annotations

from exporter.bench.timing import fmt_spread

GOALS = (  # (key, description, target, how the value is read from the result[, "at most"])
    ("decode_vs_sdpa", "batch-1 decode >= 3x transformers sdpa", 3.0,
     lambda r: r["decode"]["speedup_vs_sdpa"]["ours_int8"]),
    ("streams_ratio", "8 streams >= 4x the aggregate of one (default model)", 4.0,
     lambda r: r["concurrency"]["ratio_top_to_1"] if r["concurrency"]["top_streams"] == 8 else None),
    ("streams_ratio_bw", "8 streams >= 4x the aggregate of one (bandwidth-bound model)", 4.0,
     lambda r: r["concurrency_bw"]["ratio_top_to_1"] if r["concurrency_bw"]["top_streams"] == 8 else None),
    ("python_overhead", "Python around the graph < 0.15 ms per batch-1 step (default model)", 0.15,
     lambda r: _split(r)["python_ms"], "below"),
    ("step_vs_llama_cpp", "whole batch-1 step <= 1.5x llama.cpp's (default model)", 1.5,
     lambda r: _split(r)["vs_llama_cpp"], "at most"),
    ("roofline_pct", ">= 70% of the DRAM roofline", 70.0,
     lambda r: r["roofline"]["pct_of_roofline"]),
    ("video_vs_peers", "video extraction ahead of the fastest peer loader on every clip (worst clip, "
     "ours / fastest peer wall)", 1.0,
     lambda r: min(v["speedup_vs_fastest_peer"] for v in r["video"]["runs"].values())),
)


def _split(r: dict) -> dict:
    """Row 1b's row at the run's own thread count."""
    return r["step_split"]["rows"][str(r["machine"]["threads"])]


def _met(value: float, target: float, how: str) -> bool:
    return value < target if how == "below" else value <= target if how == "at most" else value >= target


def goals(result: dict) -> list[dict]:
    out = []
    for key, text, target, get, *how in GOALS:
        try:
            value = get(result)
        except (KeyError, TypeError, ValueError):
            value = None
        out.append({"goal": key, "description": text, "target": target, "value": value,
                    "met": None if value is None else _met(value, target, how[0] if how else "")})
    return out


def _f(x, fmt="{:.1f}", none="-") -> str:
    return none if x is None else fmt.format(x)


def _goal(result: dict, key: str) -> str:
    g = next((g for g in result.get("goals", []) if g["goal"] == key), None)
    if g is None or g["met"] is None:
        return ""
    how = next((e[4] for e in GOALS if e[0] == key and len(e) > 4), "")
    sign = {"below": "<", "at most": "<="}.get(how, ">=")
    unit = {"roofline_pct": "%", "python_overhead": " ms"}.get(key, "x")
    return f"goal {sign} {g['target']:g}{unit}: {'MET' if g['met'] else 'NOT MET'}"


def table(r: dict) -> str:
    mi = r["machine"]
    lines = [f"benchmark of {r['engine']} ({'--quick' if r['quick'] else 'full run'}) on {mi['cores']} cores "
             f"{mi['cpu_model']}, {mi['threads']} threads (torch = ORT intra-op), onnxruntime "
             f"{mi['onnxruntime']}, torch {mi['torch']}, transformers {mi['transformers']}, "
             f"providers {', '.join(mi['providers_used'])}; load avg at start {mi['load_average_at_start']}"]
    row = lambda *c: lines.append(f"  {c[0]:<34} {c[1]:>12} {c[2]:>10}  {c[3] if len(c) > 3 else ''}".rstrip())
    if "decode" in r:
        d, p = r["decode"], r["prefill"]
        lines.append(f"1. batch-1 decode: {d['prompt_tokens']}-token prompts, {d['new_tokens']} greedy tokens, "
                     f"a new prompt each run (no prompt token from the cache, checked)")
        row("system", "tokens/s", "vs sdpa", "(1000 / median inter-token ms; per-run tok/s min / median / max)")
        for k, v in d["systems"].items():
            row(k, _f(v["decode_tok_s"]), _f(d["speedup_vs_sdpa"][k], "{:.2f}x"),
                f"runs {fmt_spread(v['spread']['decode_tok_s'])}  "
                + (_goal(r, "decode_vs_sdpa") if k == "ours_int8" else ""))
        one = d.get("one_thread")
        if one:
            row("at 1 thread each: ours_int8", _f(one["ours_int8"]["decode_tok_s"]),
                _f(one["speedup"], "{:.2f}x"), f"vs transformers_sdpa at 1 thread; runs "
                f"{fmt_spread(one['ours_int8']['spread']['decode_tok_s'])}")
            row("at 1 thread each: transformers_sdpa", _f(one["transformers_sdpa"]["decode_tok_s"]),
                "1.00x", f"runs {fmt_spread(one['transformers_sdpa']['spread']['decode_tok_s'])}")
        lines.append(f"   cold prefill: {p['prompt_tokens']}-token prompts never seen before, time to first token")
        row("system", "ms", "vs sdpa", "(median; per-run ms min / median / max; prompt tokens from the cache)")
        for k, v in p["systems"].items():
            cached = f"cached {v['max_cached_tokens']} (checked)" if "max_cached_tokens" in v else "no cache"
            row(k, _f(1e3 * v["ttft_s"]), _f(p["speedup_vs_sdpa"][k], "{:.2f}x"),
                f"runs {fmt_spread(v['spread']['ttft_ms'])}; {cached}")
    if "step_split" in r:
        sp = r["step_split"]
        lines.append("1b. batch-1 decode step split (ours_int8, default model): whole step = median interval "
                     "between step starts; ORT run = median time inside the graph call; Python = step - run")
        row("threads", "step ms", "ORT run", "Python ms; llama.cpp f32 step (make bench-peers)")
        for label, v in sp["rows"].items():
            peer = (f"llama.cpp {v['llama_cpp_step_ms']:.3f} ms, ours / it {v['vs_llama_cpp']:.2f}x"
                    if v.get("llama_cpp_step_ms") else "llama.cpp: not measured")
            row(f"{label} thread{'s' if label != '1' else ''}", _f(v["step_ms"], "{:.3f}"),
                _f(v["run_ms"], "{:.3f}"), f"{v['python_ms']:.3f} ({v['samples']} steps); {peer}")
        main = str(r["machine"]["threads"])
        if main in sp["rows"]:
            lines.append(f"   Python overhead: {sp['rows'][main]['python_ms']:.3f} ms, "
                         + (_goal(r, "python_overhead") or "goal < 0.15 ms: not measured"))
            lines.append("   whole step vs llama.cpp: " + (_goal(r, "step_vs_llama_cpp") or (
                f"goal <= 1.5x: UNKNOWN (llama.cpp's step on this model is not in {sp['peers_json']}: "
                "run make bench-peers-tiny or make bench-peers; no figure is assumed)")))
    if "prefix_cache" in r:
        pc = r["prefix_cache"]
        lines.append("1c. warm prefill: what the prefix cache buys (ours, INT8 KV; time to first token)")
        row("case", "ms", "vs cold", "(median; runs min / median / max; prompt tokens served from the cache)")
        for name, label in (("same_prompt", "same prompt again"), ("second_turn_image", "2nd turn over an image")):
            case = pc[name]
            for kind in ("cold", "warm"):
                c = case[kind]
                row(f"{label}: {kind}", _f(1e3 * c["ttft_s"]),
                    _f(case["speedup"], "{:.2f}x") if kind == "warm" else "1.00x",
                    f"runs {fmt_spread(c['spread']['ttft_ms'])}; cached tokens per run "
                    f"{', '.join(str(x) for x in c['cached_tokens'])} of {c['prompt_tokens']}")
        vh = pc["second_turn_image"].get("vision_cache_hits")
        if vh is not None:
            lines.append(f"   (2nd turn warm also reused the image's vision embeddings: {vh} vision-cache hits; "
                         f"cold twin: same conversation over an image never seen)")
    if "concurrency" in r:
        c = r["concurrency"]
        lines.append(f"2. concurrent streams through Engine.generate ({c['max_tokens']} tokens each, INT8 KV, "
                     f"new prompts each try, no cache hit)")
        row("streams", "tokens/s", "steps", "(median try; tries min / median / max)")
        for run in c["runs"]:
            row(str(run["streams"]), _f(run["tokens_per_s"]), str(run["engine_steps"]),
                f"tries {fmt_spread(run['spread']['tokens_per_s'])}")
        row(f"{c['top_streams']} streams / 1 stream", "", _f(c["ratio_top_to_1"], "{:.2f}x"),
            _goal(r, "streams_ratio"))
    if "concurrency_bw" in r:
        c = r["concurrency_bw"]
        lines.append(f"2b. concurrent streams on the bandwidth-bound model of row 5 ({c['max_tokens']} tokens "
                     f"each, INT8 KV, new prompts each try)")
        row("streams", "tokens/s", "steps", "(median try; tries min / median / max)")
        for run in c["runs"]:
            row(str(run["streams"]), _f(run["tokens_per_s"]), str(run["engine_steps"]),
                f"tries {fmt_spread(run['spread']['tokens_per_s'])}")
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
        lines.append("4. decode step at fixed context vs KV pool size (batch 1, INT8 KV, pool set by EngineConfig.kv_blocks)")
        row("pool", "step ms", "context", "(pooled median step; per-run mean ms min / median / max)")
        for label, run in pf["runs"].items():
            size = run["pool_bytes"] / 2**20
            row(f"{label}: {run['kv_blocks']} blocks, " + (f"{size / 1024:.2f} GiB" if size >= 1024 else f"{size:.1f} MiB"),
                _f(run["step_ms"], "{:.2f}"), str(run["context_tokens"]),
                f"{pf['repeats']} runs alternating; {fmt_spread(run['spread']['step_ms_run_mean'], '{:.2f}')}")
        row(f"{pf['factor']}x pool / small pool", "", _f(pf["large_over_small"], "{:.3f}x"), "must be ~1.0")
        if pf.get("huge_over_small") is not None:
            row("huge pool / small pool", "", _f(pf["huge_over_small"], "{:.3f}x"), "must be ~1.0")
    if "roofline" in r:
        rf, bw = r["roofline"], r["roofline"]["bandwidth"]
        lines.append(f"5. bandwidth-bound decode: hidden {rf['hidden']}, {rf['layers']} layers, vocab "
                     f"{rf['vocab']}; {rf['decoder_weight_bytes'] / 1e6:.0f} MB decoder weights + LM head")
        row("numpy copy bandwidth (r+w)", _f(bw["copy_gb_s"], "{:.2f}"), "GB/s",
            f"best of {len(bw.get('copy_gb_s_runs', [])) or '?'} (runs {fmt_spread(bw.get('spread'), '{:.2f}')}); "
            f"read-only convention {bw['read_gb_s']:.2f} GB/s; {bw['array_bytes'] / 2**20:.0f} MiB array")
        row("bytes read per step", f"{rf['bytes_per_step'] / 1e6:.1f}", "MB",
            f"weights + KV at mean context {rf['mean_context']:.0f}")
        row("roofline step", _f(rf["roofline_step_ms"], "{:.2f}"), "ms")
        row("measured step (batch 1)", _f(rf["step_ms"], "{:.2f}"), "ms",
            f"median inter-token; effective {rf['effective_gb_s']:.2f} GB/s; per-run mean "
            f"{fmt_spread(rf.get('spread', {}).get('step_ms_run_mean'), '{:.2f}')} ms")
        row("transformers sdpa step, same model", _f(rf.get("transformers_sdpa_step_ms"), "{:.2f}"), "ms",
            f"ours is {_f(rf.get('speedup_vs_sdpa'), '{:.2f}x')} faster")
        row("% of roofline", _f(rf["pct_of_roofline"]), "%",
            f"{_goal(r, 'roofline_pct')} ({_f(rf['pct_of_roofline_read_only'])}% vs read-only bandwidth)")
    if "event_loop_lag" in r:
        lg = r["event_loop_lag"]
        lines.append(f"6. event-loop lag, aiohttp app + real engine, {lg['streams']} SSE streams x "
                     f"{lg['max_tokens']} tokens (sleep {lg['interval_ms']:g} ms overshoot; new prompts, "
                     f"{lg.get('cached_tokens', '?')} cached tokens)")
        row("", "p50 ms", "p99 ms", "max ms")
        for k in ("idle", "loaded"):
            row(f"{k} ({lg[k]['samples']} samples)", _f(lg[k]["p50_ms"], "{:.2f}"),
                _f(lg[k]["p99_ms"], "{:.2f}"), _f(lg[k]["max_ms"], "{:.2f}"))
    if "video" in r:
        v = r["video"]
        lines.append(f"7. video extraction to the model's input pixels, the same frames for every method "
                     f"({v['seconds']} s 1280x720 clips, {v['decode_threads']} decode threads each, fresh "
                     f"process per run, median of {v['repeats']})")
        row("clip: method", "wall s", "CPU s", "peak RSS MB, frames decoded, PSNR dB vs exact frames "
            "resized as transformers does; wall min-max")
        for name, run in v["runs"].items():
            for m, x in run["methods"].items():
                sp = x["spread"]["seconds"]
                row(f"{name}: {m}", f"{x['seconds']:.2f}", f"{x['cpu_seconds']:.2f}",
                    f"RSS {x['peak_rss_mb']:.0f}; decoded {x['frames_decoded'] if x['frames_decoded'] is not None else '-'}; "
                    f"PSNR {run['psnr_db'].get(m, '-')}; {sp['min']:.2f}-{sp['max']:.2f}")
            row(f"{name}: ours / fastest peer", "", _f(run["speedup_vs_fastest_peer"], "{:.2f}x"),
                f"fastest peer {run['fastest_peer']}; CPU {_f(run['cpu_ratio_vs_fastest_peer'], '{:.2f}x')}; "
                f"{_f(run['speedup_vs_decode_all'], '{:.2f}x')} decode_all; {run['frames']} frames at "
                f"{run['size'][1]}x{run['size'][0]}; ours vs exact decoding, same conversion: "
                f"{run['psnr_db']['ours_vs_exact_same_conversion']} dB")
        for m, why in v.get("skipped", {}).items():
            row(f"{m} skipped", "", "", why)
        g = next((g for g in r.get("goals", []) if g["goal"] == "video_vs_peers"), None)
        if g and g["value"] is not None:
            lines.append(f"  ours ahead of the fastest peer on every GOP: "
                         f"{'MET' if g['met'] else 'NOT MET'} (worst clip {g['value']:.2f}x)")
    if "constrained" in r:
        c = r["constrained"]
        pt, nb, sv = c["per_token"], c["neighbours"], c["synthetic_qwen_vocab"]
        lines.append(f"8. constrained decoding (llguidance): batch 1, {c['prompt_tokens']}-token prompts, "
                     f"{c['max_tokens']} greedy tokens, plain vs a json_schema answer (one string of 2 x max_tokens characters; key json_object)")
        row("answer", "tokens/s", "vs plain", "(1000 / median inter-token ms; per-run tok/s min / median / max)")
        for k in ("plain", "json_object"):
            row(k, _f(c[k]["decode_tok_s"]), _f(c["json_over_plain"] if k == "json_object" else 1.0, "{:.2f}x"),
                f"runs {fmt_spread(c[k]['spread']['decode_tok_s'])}")
        row(f"per constrained token ({pt['tokens']})", "ms", "", "(median; min / median / max)")
        row("mask (llguidance)", _f(pt["mask_ms"], "{:.3f}"), "",
            f"inline when cheap, else in the grammar thread during the step; "
            f"{fmt_spread(pt['spread']['mask_ms'], '{:.3f}')}")
        row("loop thread, all grammar work", _f(pt["loop_ms"], "{:.3f}"), "",
            f"mask or wait for it + apply + consume; {fmt_spread(pt['spread']['loop_ms'], '{:.3f}')}")
        row(f"{sv['vocab']:,}-token synthetic vocab: mask", _f(sv["mask_ms"], "{:.3f}"), "ms",
            f"one thread, a GUI-action schema; runs {fmt_spread(sv['spread'], '{:.3f}')}; tokenizer + "
            f"matcher built in {sv['tokenizer_and_matcher_s']:.2f} s")
        row(f"{nb['streams']} plain streams: alone", _f(nb["plain_alone_tok_s"]), "1.00x",
            "median decode tok/s of a plain stream")
        row(f"{nb['streams'] - 1} plain + 1 json_object", _f(nb["plain_with_one_constrained_tok_s"]),
            _f(nb["ratio"], "{:.2f}x"), "the plain streams' rate beside a constrained one (~1.0: no stall)")
    lines.append("goals: " + "; ".join(
        f"{g['description']}: {_f(g['value'], '{:.2f}')} -> "
        f"{'MET' if g['met'] else 'not met' if g['met'] is not None else 'not measured'}"
        for g in r.get("goals", [])))
    for n in r.get("notes", []):
        lines.append(f"note: {n}")
    return "\n".join(lines)
