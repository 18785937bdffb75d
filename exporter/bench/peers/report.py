"""bench-peers' numbers from its raw runs, and the printed table (nothing measured here).

Per system and thread count: ms/token = the median of every decode-step interval pooled over
the rounds (min / median / max of the per-round medians beside it), tokens/s = 1000 / that,
prefill = the median round's time to the first token, our ratio = our tokens/s / theirs (above
1: we are faster), roofline = bytes read per step / numpy copy bandwidth (weights only: ours the
fp32 decoder + LM head, llama.cpp the GGUF file's size, ONNX Runtime GenAI its model.onnx.data),
greedy agreement = how many leading
generated tokens equal ours in the same round (the same function of the same weights at f32).
ours_int8 / ours_int4 are the same engine with its decoder quantised as the cpu-int8 / cpu-int4
profiles do (exporter/quantize.py, MatMulNBits); each goal compares a precision with its nearest.
"""
from __future__ import annotations

import statistics

from exporter.bench.timing import fmt_spread, spread

GOALS = (  # (peer system, what ours must match it with, description)
    ("llama.cpp_f32", "ours_fp32", "batch-1 decode at fp32 weights at least as fast as llama.cpp f32"),
    ("ort-genai_fp32", "ours_fp32", "batch-1 decode at fp32 weights at least as fast as ONNX Runtime GenAI fp32"),
    ("llama.cpp_q8_0", "ours_int8", "ours INT8 weights at least as fast as llama.cpp q8_0"),
    ("llama.cpp_q4_0", "ours_int4", "ours INT4 weights at least as fast as llama.cpp q4_0"),
    ("ort-genai_int4", "ours_int4", "ours INT4 weights at least as fast as ONNX Runtime GenAI int4"),
)


def _agree(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def summarise(r: dict) -> dict:
    bw = r["bandwidth"]["copy_gb_s"] * 1e9
    out: dict = {}
    for threads, systems in r["runs"].items():
        rows = {}
        for name, runs in systems.items():
            pooled = [x for run in runs for x in run["intervals_ms"]]
            ms = statistics.median(pooled)
            roof = 1e3 * r["bytes_per_step"][name] / bw
            rows[name] = {"ms_per_token": ms, "tokens_per_s": 1e3 / ms,
                          "round_medians_ms": spread(statistics.median(run["intervals_ms"]) for run in runs),
                          "prefill_ms": 1e3 * statistics.median(run["prefill_s"] for run in runs),
                          "prefill_spread_ms": spread(1e3 * run["prefill_s"] for run in runs),
                          "bytes_per_step": r["bytes_per_step"][name], "roofline_ms": roof,
                          "pct_of_roofline": 100 * roof / ms,
                          "greedy_agreement": [_agree(run["tokens"], o["tokens"])
                                               for run, o in zip(runs, systems["ours_fp32"])]}
        for row in rows.values():
            row["ours_speed_ratio"] = rows["ours_fp32"]["tokens_per_s"] / row["tokens_per_s"]
        out[threads] = rows
    goals = []
    for peer, mine, text in GOALS:
        vals = [rows[mine]["tokens_per_s"] / rows[peer]["tokens_per_s"]
                for rows in out.values() if peer in rows and mine in rows]
        if not vals:
            goals.append({"goal": text, "value": None, "met": None,
                          "why": f"{peer} or {mine} was not measured"})
        else:
            goals.append({"goal": text, "value": min(vals), "met": min(vals) >= 1.0})
    return {"by_threads": out, "goals": goals}


def table(r: dict) -> str:
    lc, s = r["llama_cpp"], r["summary"]
    mo = r["model"]
    lines = [f"bench-peers: bandwidth-bound model (hidden {mo['hidden']}, {mo['layers']} layers, vocab {mo['vocab']}), "
             f"batch 1, {r['prompt_tokens']}-token prompt (new each round, cold), {r['new_tokens']} greedy tokens, "
             f"{r['repeats']} interleaved rounds; {r['machine']['cores']} cores {r['machine']['cpu_model']}, "
             f"load avg at start {r['machine']['load_average_at_start']}",
             f"llama.cpp: llama-cpp-python {lc['llama_cpp_python']} built from source here ({lc['cmake_args']}); "
             f"AMX workaround flags: {lc['amx_workaround_flags'] or 'none'}; CPU AMX flags: "
             f"{', '.join(lc['cpu_amx_flags']) or 'none'}; converter pre-tokenizer hash {lc['pre_tokenizer_hash'][:12]}... "
             f"mapped to {lc['pre_tokenizer_mapped_to']!r} in our copy",
             f"copy bandwidth {r['bandwidth']['copy_gb_s']:.2f} GB/s (numpy, read + write); ours = fp32 weights, INT8 KV",
             f"  {'thr':>3} {'system':<16} {'MB/step':>8} {'ms/tok':>7} {'tok/s':>7} {'ours/it':>8} "
             f"{'prefill ms':>10} {'roof ms':>8} {'%roof':>6}  rounds ms/tok min/med/max; greedy tokens = ours"]
    for threads, rows in s["by_threads"].items():
        for name, row in rows.items():
            agree = "" if name == "ours_fp32" else "/".join(str(a) for a in row["greedy_agreement"])
            lines.append(f"  {threads:>3} {name:<16} {row['bytes_per_step'] / 1e6:>8.0f} {row['ms_per_token']:>7.2f} "
                         f"{row['tokens_per_s']:>7.1f} {row['ours_speed_ratio']:>7.2f}x {row['prefill_ms']:>10.1f} "
                         f"{row['roofline_ms']:>8.2f} {row['pct_of_roofline']:>5.0f}%  "
                         f"{fmt_spread(row['round_medians_ms'], '{:.2f}')}; {agree}")
    for g in s["goals"]:
        verdict = "not measured" if g["met"] is None else "MET" if g["met"] else "NOT MET"
        value = "" if g["value"] is None else f" (ours / its tok/s, worst thread count: {g['value']:.2f}x)"
        lines.append(f"goal: {g['goal']}: {verdict}{value}{'; ' + g['why'] if g.get('why') else ''}")
    og = r["onnxruntime_genai"]
    lines.append(f"ONNX Runtime GenAI: {og}" if isinstance(og, str) else
                 f"ONNX Runtime GenAI {og['onnxruntime_genai']} on onnxruntime {og['onnxruntime']}, "
                 f"models from its own builder (fp32, int4; CPU)")
    lines.append("note: prefill = time to the first token; ours includes templating, tokenising and "
                 "scheduling (the engine's time to first token), the peers' is their prompt evaluation alone")
    return "\n".join(lines)
