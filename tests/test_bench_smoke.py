"""Smoke test of `python -m exporter.bench --quick`: every row runs against the real default engine
and transformers, the JSON has its schema and the table prints. No timing is asserted."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from exporter.bench import report
from tests.conftest import ROOT

ROWS = ("1. batch-1 decode", "1b. batch-1 decode step split", "cold prefill:", "1c. warm prefill", "2. concurrent streams", "2b. concurrent streams on the bandwidth-bound",
        "3. KV bytes per token",
        "4. decode step at fixed context", "5. bandwidth-bound decode", "6. event-loop lag",
        "7. video extraction", "8. constrained decoding", "goals:")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and x == x   # not None, not NaN


@pytest.fixture(scope="module")
def quick_run(default_engine_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "exporter.bench", "--engine", str(default_engine_dir),
                           "--out", str(out), "--quick", "--threads", "1",
                           "--peers", str(out.with_name("no-bench-peers.json"))],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout


def test_quick_bench_writes_every_row(quick_run, default_engine_dir):
    r, table = quick_run
    assert r["errors"] == {} and r["quick"] is True
    m = r["machine"]
    assert m["cores"] >= 1 and m["threads"] == 1 and m["cpu_model"]
    assert m["onnxruntime"] and m["torch"] and "CPUExecutionProvider" in m["providers_used"]

    sizes = r["sizes"]
    d = r["decode"]
    assert set(d["systems"]) == {"ours_int8", "ours_float", "transformers_eager", "transformers_sdpa"}
    for name, run in d["systems"].items():      # EOS ignored: every system made exactly as many tokens
        assert run["tokens"] == sizes["decode_tokens"], name
        assert run["prompt_tokens"] == d["prompt_tokens"] >= sizes["decode_prompt"], name
        assert _number(run["decode_tok_s"]) and _number(d["speedup_vs_sdpa"][name]), name
    assert d["speedup_vs_sdpa"]["transformers_sdpa"] == pytest.approx(1.0)
    # the step split: the engine's own graph time inside each measured step; no peer figure
    # without bench-peers' JSON, and then the llama.cpp goal is unknown, never decided
    split = r["step_split"]["rows"]["1"]
    assert split["samples"] == sizes["repeats"] * (sizes["decode_tokens"] - 2)
    assert 0 < split["run_ms"] < split["step_ms"]
    assert split["python_ms"] == pytest.approx(split["step_ms"] - split["run_ms"])
    assert split["llama_cpp_step_ms"] is None and split["vs_llama_cpp"] is None
    goal = {g["goal"]: g for g in r["goals"]}
    assert goal["python_overhead"]["value"] == split["python_ms"]
    assert goal["step_vs_llama_cpp"]["value"] is None and goal["step_vs_llama_cpp"]["met"] is None
    assert "whole step vs llama.cpp: goal <= 1.5x: UNKNOWN" in table
    p = r["prefill"]
    assert p["prompt_tokens"] >= sizes["prefill_prompt"] and p["cold"] is True
    assert all(run["prompt_tokens"] == p["prompt_tokens"] for run in p["systems"].values())
    for name in ("ours_int8", "ours_float"):     # the cold rows saw no cache hit, by the engine's count
        run = p["systems"][name]
        assert run["repeats"] == sizes["repeats"] >= 2 and run["cold_checked"] is True, name
        assert run["cached_tokens"] == [0] * sizes["repeats"] and run["prefix_block_hits"] == 0, name
        assert d["systems"][name]["max_cached_tokens"] == 0 and d["systems"][name]["prefix_block_hits"] == 0
        s = run["spread"]["ttft_ms"]
        assert s["n"] == sizes["repeats"] and s["min"] <= s["median"] <= s["max"], name

    # the warm row is the cache's benefit and says so: the repeat and the 2nd turn reuse blocks
    pc = r["prefix_cache"]
    same, turn = pc["same_prompt"], pc["second_turn_image"]
    assert same["cold"]["cached_tokens"] == [0] * sizes["repeats"] == turn["cold"]["cached_tokens"]
    from runtime.manifest import load_manifest
    block = load_manifest(default_engine_dir, verify_hashes=False).kv.block_size
    assert all(c > 0 and c % block == 0 for c in same["warm"]["cached_tokens"] + turn["warm"]["cached_tokens"])
    assert all(c < same["warm"]["prompt_tokens"] for c in same["warm"]["cached_tokens"])
    assert turn["warm"]["prompt_tokens"] == turn["cold"]["prompt_tokens"] > turn["first_turn"]["prompt_tokens"]
    assert turn["vision_cache_hits"] == sizes["repeats"]

    c = r["concurrency"]
    assert [run["streams"] for run in c["runs"]] == list(sizes["streams"])
    for run in c["runs"]:
        assert run["tokens"] == run["streams"] * sizes["stream_tokens"] and run["cached_tokens"] == 0
        assert run["spread"]["tokens_per_s"]["n"] == sizes["repeats"]
    assert _number(c["ratio_top_to_1"])
    cb = r["concurrency_bw"]
    assert [run["streams"] for run in cb["runs"]] == [1, max(sizes["streams"])]
    assert all(run["tokens"] == run["streams"] * sizes["bw_tokens"] for run in cb["runs"])

    # 4 layers x 2 KV heads x (2 x 32 int8 + 2 x 4 scale bytes); fp16: 4 x 2 x 32 x 2 x 2
    kv = r["kv_bytes"]
    lay = load_manifest(default_engine_dir, verify_hashes=False).kv      # K+V per layer and head:
    heads = lay.num_layers * lay.num_kv_heads                             # INT8 + two f32 scales
    assert kv["default"]["int8_pool"] == kv["default"]["int8_plan"] == heads * (2 * lay.head_dim + 8)
    assert kv["default"]["fp16_pool"] == kv["default"]["fp16_plan"] == heads * 2 * lay.head_dim * 2
    assert (kv["qwen3-vl-4b"]["int8_plan"], kv["qwen3-vl-4b"]["fp16_plan"]) == (76_032, 147_456)

    pf = r["pool_flatness"]
    assert pf["runs"]["large"]["kv_blocks"] == pf["factor"] * pf["runs"]["small"]["kv_blocks"]
    assert pf["runs"]["huge"]["pool_bytes"] >= sizes["pool_huge_bytes"] > pf["runs"]["large"]["pool_bytes"]
    assert len({run["context_tokens"] for run in pf["runs"].values()}) == 1
    assert _number(pf["large_over_small"]) and _number(pf["huge_over_small"])

    rf = r["roofline"]
    assert rf["bytes_per_step"] > rf["decoder_weight_bytes"] > 0
    assert _number(rf["pct_of_roofline"]) and rf["bandwidth"]["array_bytes"] == sizes["copy_bytes"]

    lag = r["event_loop_lag"]
    assert lag["streams"] == sizes["lag_streams"] and lag["sse_chunks"] > 0 and lag["cached_tokens"] == 0
    assert lag["loaded"]["samples"] > 0 and _number(lag["loaded"]["p99_ms"])

    v = r["video"]
    runs = v["runs"]
    assert list(runs) == [f"h264 gop={g}" for g in sizes["video_gops"]]
    for run in runs.values():
        ms = run["methods"]
        assert set(ms) == set(v["methods"]) and {"ours", "vllm_pyav", "decode_all"} <= set(ms)
        for name in ("ours", "vllm_pyav", "decode_all", "ffmpeg_select"):
            if name in ms:     # the same frames, at the same final size, from every method
                assert ms[name]["frames"] == run["frames"] and ms[name]["shape"][:2] == run["size"], name
        assert all(_number(m["seconds"]) and _number(m["cpu_seconds"]) and m["peak_rss_mb"] > 0 for m in ms.values())
        assert ms["ours"]["frames_decoded"] < ms["decode_all"]["frames_decoded"]
        # vLLM's loader decodes exactly what decode_all converts: the same pixels
        assert run["psnr_db"]["vllm_pyav"] == "inf" and run["psnr_db"]["ours_vs_exact_same_conversion"] == "inf"
        assert _number(run["psnr_db"]["ours"]) and run["psnr_db"]["ours"] > 30
        assert _number(run["speedup_vs_fastest_peer"]) and run["fastest_peer"] in ms
    if "ffmpeg_select" not in v["methods"]:
        assert "not installed" in v["skipped"]["ffmpeg_select"]

    c = r["constrained"]                 # every constrained token was masked, and timed
    assert c["per_token"]["tokens"] >= c["json_object"]["tokens"] > 0
    assert _number(c["per_token"]["mask_ms"]) and _number(c["json_over_plain"])
    assert _number(c["neighbours"]["ratio"]) and c["synthetic_qwen_vocab"]["vocab"] == sizes["constrained_vocab"]

    assert [g["goal"] for g in r["goals"]] == [g[0] for g in report.GOALS]
    for row in ROWS:
        assert row in table, row


def test_goals_read_from_result_and_unmeasured_goals_say_so():
    result = {"decode": {"speedup_vs_sdpa": {"ours_int8": 3.5}},
              "concurrency": {"top_streams": 2, "ratio_top_to_1": 1.9},
              "roofline": {"pct_of_roofline": 40.0},
              "video": {"runs": {"h264 gop=15": {"speedup_vs_fastest_peer": 1.5},
                                 "h264 gop=250": {"speedup_vs_fastest_peer": 0.8}}}}
    got = {g["goal"]: (g["value"], g["met"]) for g in report.goals(result)}
    assert got == {"decode_vs_sdpa": (3.5, True), "streams_ratio": (None, None), "streams_ratio_bw": (None, None),
                   "python_overhead": (None, None), "step_vs_llama_cpp": (None, None),
                   "roofline_pct": (40.0, False), "video_vs_peers": (0.8, False)}


def test_step_split_reads_llama_cpp_from_bench_peers_json_only(tmp_path):
    """Row 1b's peer figure comes from bench-peers' JSON ("tiny" part, per thread count) and the
    goals compare with it: Python overhead below 0.15 ms, whole step at most 1.5x llama.cpp's."""
    from exporter.bench.sections import step_split
    decode = {"systems": {"ours_int8": {"step_breakdown": {"step_ms": 0.5, "run_ms": 0.4, "python_ms": 0.1,
                                                           "samples": 10}}},
              "one_thread": {"ours_int8": {"step_breakdown": {"step_ms": 0.45, "run_ms": 0.25,
                                                              "python_ms": 0.2, "samples": 10}}}}
    missing = step_split(decode, tmp_path / "absent.json", 2)
    assert missing["peer_known"] is False and missing["rows"]["2"]["vs_llama_cpp"] is None
    peers = tmp_path / "bench-peers.json"
    peers.write_text(json.dumps({"tiny": {"summary": {"by_threads": {
        "1": {"llama.cpp_f32": {"ms_per_token": 0.3}}, "2": {"llama.cpp_f32": {"ms_per_token": 0.4}}}}}}))
    split = step_split(decode, peers, 2)
    assert split["rows"]["2"]["llama_cpp_step_ms"] == 0.4 and split["rows"]["2"]["vs_llama_cpp"] == pytest.approx(1.25)
    assert split["rows"]["1"]["vs_llama_cpp"] == pytest.approx(1.5)
    got = {g["goal"]: (g["value"], g["met"]) for g in report.goals({"step_split": split, "machine": {"threads": 2}})}
    assert got["python_overhead"] == (0.1, True) and got["step_vs_llama_cpp"] == (pytest.approx(1.25), True)
    split["rows"]["2"] |= {"python_ms": 0.15, "vs_llama_cpp": 1.6}
    got = {g["goal"]: (g["value"], g["met"]) for g in report.goals({"step_split": split, "machine": {"threads": 2}})}
    assert got["python_overhead"] == (0.15, False) and got["step_vs_llama_cpp"] == (1.6, False)


def test_graph_against_graph_drives_our_real_decoder(default_engine_dir):
    """exporter.bench.peers.graphs: its one-step feeds fit our decoder's contract (the graph runs
    and writes the new token into the pool), and its profile counts the graph's nodes after ONNX
    Runtime's optimisation and splits the weight MatMuls from the rest; the table prints both."""
    import numpy as np

    from exporter.bench.peers import graphs as g
    from runtime import manifest as mf

    m = mf.load_manifest(default_engine_dir, verify_hashes=False)
    path = default_engine_dir / m.partitions["decoder"].file
    sess = g._session(path, 1)
    feeds = g.ours_feeds(sess, m, 40, np.random.default_rng(0))
    names = [o.name for o in sess.get_outputs()]
    out = dict(zip(names, sess.run(None, feeds)))
    assert out[mf.LOGITS].shape == (1, 1, m.vocab_size) and np.isfinite(out[mf.LOGITS]).all()
    pool = mf.pool_names(0, True)[0]
    bs = m.kv.block_size
    slot = (40 // bs, 40 % bs)                         # the new token's slot changed, no other
    changed = np.argwhere((out[pool + mf.UPDATED] != feeds[pool]).any(axis=(2, 3)))
    assert {tuple(c) for c in changed} <= {slot}
    p = g.profile(path, feeds, 1, 3)
    # the q/k/v, o, gate, up, down products of each layer and the LM head
    assert p["weight_nodes"] == 5 * m.kv.num_layers + 1
    assert p["nodes"] > p["weight_nodes"] and p["other_us"] > 0
    assert p["kernel_us"] == pytest.approx(sum(p["per_op_us"].values()))
    row = {"median_ms": 0.3, "p10_ms": 0.2, "p90_ms": 0.4, "profile": p}
    text = g.table({"context": 40, "rounds": 1, "runs": 3,
                    "threads": {"1": {"ours_fp32": row, "ort-genai_fp32": row}}})
    assert "fp32: ours / GenAI step time 1.000x" in text and f"{p['nodes']:6d}" in text
