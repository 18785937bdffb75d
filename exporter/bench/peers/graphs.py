"""Graph against graph: our decoder and ONNX Runtime GenAI's, one decode step each, in plain ONNX
Runtime sessions on the same machine and the same onnxruntime, interleaved.

    python -m exporter.bench.peers.graphs [--out build/bench-peers-graphs.json] [--threads 1 2]

`make bench-peers` times whole engines (ours includes its Python step, GenAI its C++ loop); this
takes the engines away and asks where the rest of the difference lives. Both graphs come from the
bandwidth-bound model of bench-peers (fp32 weights, and INT4: ours the cpu-int4 profile's, GenAI
its builder's int4), built or reused as bench-peers does. Each graph runs one step of one new
token at a context of --context tokens (ours over a paged INT8 pool, GenAI over its float
past), random inputs; per thread count and weight precision, --rounds rounds alternate our graph
and GenAI's, --runs timed runs each. Then one profiled session per graph (ONNX Runtime's
profiler) gives the kernel time per op type and the node count after optimisation: what the
weight MatMuls take, and what everything else does. The profiler's per-node overhead inflates the small ops, so the headline is the
unprofiled median, and the profile is read for proportions.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from exporter.bench.bw_model import cached_engine
from exporter.bench.machine import machine_info
from exporter.bench.peers.text_only import write_text_only
from exporter.quant_speed import quantised_copy, variants
from runtime import manifest as mf

WEIGHT_OPS = ("MatMul", "MatMulNBits", "Gemm")       # the weight products, in either graph


def _session(path: Path, threads: int, profile_dir: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, path.parent.name)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ours_feeds(sess: ort.InferenceSession, m: mf.Manifest, context: int, rng) -> dict[str, np.ndarray]:
    """One new token after `context` past ones: a table of exactly the blocks it needs."""
    bs = m.kv.block_size
    blocks = context // bs + 1
    nb = blocks + 1                                     # one spare (the runtime's scratch block)
    feeds = {}
    for i in sess.get_inputs():
        n, shape = i.name, i.shape
        if n == mf.INPUTS_EMBEDS:
            feeds[n] = (rng.standard_normal((1, 1, m.hidden_size)) * 0.1).astype(np.float32)
        elif n == mf.POSITION_IDS:
            feeds[n] = np.full((3, 1, 1), context, np.int64)
        elif n == mf.DEEPSTACK_EMBEDS:
            feeds[n] = np.zeros((shape[0], 1, 1, m.hidden_size), np.float32)
        elif n == mf.PAST_LENS:
            feeds[n] = np.array([context], np.int64)
        elif n == mf.BLOCK_TABLES:
            feeds[n] = np.arange(blocks, dtype=np.int64)[None]
        elif n == mf.SLOT_MAPPING:
            feeds[n] = np.array([[context]], np.int64)
        elif n == mf.LOGIT_POSITIONS:
            feeds[n] = np.zeros((1, 1), np.int64)
        elif i.type == "tensor(int8)":
            feeds[n] = rng.integers(-127, 128, (nb, bs, *shape[2:]), dtype=np.int8)
        elif i.type == "tensor(float)":            # an INT8 pool's scales, or a float pool
            tail = tuple(shape[2:])
            feeds[n] = (np.full((nb, bs, *tail), 0.01, np.float32) if tail[-1] == 1
                        else (rng.standard_normal((nb, bs, *tail)) * 0.1).astype(np.float32))
        else:
            raise SystemExit(f"our decoder has an input this benchmark does not know: {n} {shape} {i.type}")
    return feeds


def genai_feeds(sess: ort.InferenceSession, kv_heads: int, head_dim: int, context: int, rng) -> dict[str, np.ndarray]:
    feeds = {}
    for i in sess.get_inputs():
        n = i.name
        if n == "input_ids":
            feeds[n] = np.array([[5]], np.int64)
        elif n == "attention_mask":
            feeds[n] = np.ones((1, context + 1), np.int64)
        elif n == "position_ids":
            feeds[n] = np.array([[context]], np.int64)
        elif n.startswith("past_key_values"):
            feeds[n] = (rng.standard_normal((1, kv_heads, context, head_dim)) * 0.1).astype(np.float32)
        else:
            raise SystemExit(f"the GenAI model has an input this benchmark does not know: {n} {i.shape} {i.type}")
    return feeds


def profile(path: Path, feeds: dict, threads: int, runs: int) -> dict:
    """Kernel microseconds per step by op type, and the node count, from ONNX Runtime's profiler."""
    with tempfile.TemporaryDirectory() as tmp:
        sess = _session(path, threads, tmp)
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per_op, nodes = collections.defaultdict(float), collections.Counter()
    steps = sum(1 for e in events if e.get("name") == "model_run")
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
            nodes[e["args"]["op_name"]] += 1
    per_op = {k: v / steps for k, v in per_op.items()}
    weights = sum(v for k, v in per_op.items() if k in WEIGHT_OPS)
    return {"kernel_us": sum(per_op.values()), "weight_ops_us": weights,
            "other_us": sum(per_op.values()) - weights,
            "nodes": sum(nodes.values()) // steps,
            "weight_nodes": sum(c for k, c in nodes.items() if k in WEIGHT_OPS) // steps,
            "per_op_us": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


def graphs(args) -> tuple[mf.Manifest, dict[str, tuple[Path, str]]]:
    """(our fp32 engine's manifest, name -> (graph file, whose)); builds what bench-peers would
    (cached)."""
    from exporter.bench.peers.__main__ import GENAI_PKGS, PEERS, genai_models

    engine, _ = cached_engine(log=lambda s: print(f"[graphs] {s}", file=sys.stderr))
    m = mf.load_manifest(engine, verify_hashes=False)
    out = {"ours_fp32": (engine / m.partitions["decoder"].file, "ours")}
    for tag, spec in variants(False).items():
        if tag in args.precisions:
            q = quantised_copy(engine, tag, spec)
            out[f"ours_{tag}"] = (q / mf.load_manifest(q, verify_hashes=False).partitions["decoder"].file, "ours")
    if GENAI_PKGS.is_dir():
        work = PEERS / Path(m.source["path"]).parent.name
        write_text_only(Path(m.source["path"]), work / "text")
        for precision, d in genai_models(work).items():
            out[f"ort-genai_{precision}"] = (d / "model.onnx", "genai")
    else:
        print(f"[graphs] onnxruntime-genai is not installed in {GENAI_PKGS}: run "
              "exporter/bench/peers/build_peers.sh (make bench-peers does); ours only", file=sys.stderr)
    return m, out


def measure(args) -> dict:
    m, found = graphs(args)
    rng = np.random.default_rng(0)
    result = {"context": args.context, "rounds": args.rounds, "runs": args.runs,
              "graphs": {k: str(p) for k, (p, _) in found.items()}, "threads": {}}
    for t in args.threads:
        sessions = {}
        for name, (path, whose) in found.items():
            s = _session(path, t)
            f = (ours_feeds(s, m, args.context, rng) if whose == "ours"
                 else genai_feeds(s, m.kv.num_kv_heads, m.kv.head_dim, args.context, rng))
            sessions[name] = (s, f)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        # alternate within a precision only: on a CPU whose last-level cache holds a quantised
        # model (this project's machines have 480 MiB of L3), an fp32 run in between would
        # flush it and bill the next graph for the refill
        groups = collections.defaultdict(list)
        for name in sessions:
            groups[name.rsplit("_", 1)[-1]].append(name)
        for names in groups.values():
            for _ in range(args.rounds):
                for name in names:
                    s, f = sessions[name]
                    for _ in range(3):
                        s.run(None, f)
                    for _ in range(args.runs):
                        t0 = time.perf_counter()
                        s.run(None, f)
                        times[name].append((time.perf_counter() - t0) * 1e3)
        row = {}
        for name, (s, f) in sessions.items():
            row[name] = {"median_ms": statistics.median(times[name]),
                         "p10_ms": float(np.percentile(times[name], 10)),
                         "p90_ms": float(np.percentile(times[name], 90)),
                         "profile": profile(Path(found[name][0]), f, t, args.runs)}
        result["threads"][str(t)] = row
        print(f"[graphs] {t} thread(s) done", file=sys.stderr)
    return result


def table(r: dict) -> str:
    lines = [f"graph against graph: one decode step at context {r['context']}, plain ONNX Runtime "
             f"{ort.__version__} sessions, {r['rounds']} interleaved rounds x {r['runs']} runs",
             "  thr graph              step ms (p10-p90)   nodes  weight ops us  other ops us  other/node us"]
    for t, row in r["threads"].items():
        for name, v in row.items():
            p = v["profile"]
            other_nodes = max(p["nodes"] - p["weight_nodes"], 1)
            lines.append(f"  {t:>3} {name:17s} {v['median_ms']:8.2f} ({v['p10_ms']:.2f}-{v['p90_ms']:.2f})"
                         f"  {p['nodes']:6d}  {p['weight_ops_us']:13.0f}  {p['other_us']:12.0f}"
                         f"  {p['other_us'] / other_nodes:13.2f}")
        for prec in ("fp32", "int4"):
            a, b = row.get(f"ours_{prec}"), row.get(f"ort-genai_{prec}")
            if a and b:
                lines.append(f"      {prec}: ours / GenAI step time {a['median_ms'] / b['median_ms']:.3f}x; weight ops "
                             f"{a['profile']['weight_ops_us'] / b['profile']['weight_ops_us']:.3f}x; other ops "
                             f"{a['profile']['other_us']:.0f} vs {b['profile']['other_us']:.0f} us in "
                             f"{a['profile']['nodes'] - a['profile']['weight_nodes']} vs "
                             f"{b['profile']['nodes'] - b['profile']['weight_nodes']} nodes")
    lines.append("  (kernel times are the profiler's, which adds its own cost to every node: read them for "
                 "proportions; the step time is unprofiled)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter.bench.peers.graphs", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/bench-peers-graphs.json"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--context", type=int, default=96, help="past tokens (bench-peers' mean context)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--precisions", nargs="+", default=["int4"], choices=["int8", "int4"],
                    help="our weight-quantised graphs to include besides fp32")
    args = ap.parse_args(argv)
    r = measure(args) | {"machine": machine_info(max(args.threads))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=1))
    print(table(r))
    print(f"[graphs] wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
