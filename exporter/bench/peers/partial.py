"""A few rows of `make bench-peers`, in minutes rather than its hour: our engine at chosen weight
variants against llama.cpp q8_0 / q4_0, with bench-peers' own protocol (peers/__main__.measure:
per round and thread count one never-seen prompt, ours first, then each peer on the same ids).

    python -m exporter.bench.peers.partial [--variant TAG=BITS:BLOCK:SYM ...] [--threads 1 2]
        [--repeats 5] [--out build/bench-peers-partial.json]

Each variant is the bandwidth-bound engine's decoder quantised as exporter/quantize.py does
(quant_speed.quantised_copy, cached beside the fp32 engine), e.g. int8-b128=8:128:zp (zp: zero
points, sym: symmetric; accuracy level 4, LM head INT8). Without --variant: the cpu-int8 and
cpu-int4 profiles' specs. Needs the peer build (build_peers.sh) like make bench-peers; the GGUFs
are made (and cached) as bench-peers makes them. Printed per thread count and system: the median
step pooled over the rounds, its 10th percentile (the less loaded steps, on a shared machine),
the per-round medians and the weights roofline (file bytes / numpy copy bandwidth)."""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from exporter.bench.bw_model import cached_engine
from exporter.bench.machine import copy_bandwidth, machine_info
from exporter.bench.peers import convert as cv
from exporter.bench.peers.__main__ import PEERS, PeerWorker, log, measure, peer_build
from exporter.bench.peers.text_only import write_text_only
from exporter.quant_speed import quantised_copy, variants
from exporter.quantize import WeightQuant
from runtime import manifest as mf


def parse_variant(text: str) -> tuple[str, WeightQuant]:
    tag, spec = text.split("=", 1)
    bits, block, sym = spec.split(":")
    if sym not in ("sym", "zp"):
        raise SystemExit(f"--variant {text}: the third field is sym or zp")
    return tag, WeightQuant(bits=int(bits), block_size=int(block), symmetric=sym == "sym")


def peer_files(model_dir: Path, work: Path, llama: PeerWorker, kinds: list[str]) -> dict[str, Path]:
    text = write_text_only(model_dir, work / "text")
    vendor = next((PEERS / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    script, _ = cv.prepare_converter(vendor, PEERS / "convert", text)
    out = {}
    if "q8_0" in kinds:
        out["q8_0"] = cv.convert(script, text, work / "bw-q8_0.gguf", "q8_0", log)
    if "q4_0" in kinds:
        f32 = cv.convert(script, text, work / "bw-f32.gguf", "f32", log)
        out["q4_0"] = work / "bw-q4_0.gguf"
        if not out["q4_0"].exists():
            llama(cmd="quantize", src=str(f32), dst=str(out["q4_0"]), type="q4_0")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter.bench.peers.partial", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], help="TAG=BITS:BLOCK:sym|zp")
    ap.add_argument("--peers", nargs="*", default=["q8_0", "q4_0"])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path("build/bench-peers-partial.json"))
    args = ap.parse_args(argv)
    peer_build()
    fp, _ = cached_engine(run_parity=False, log=log)
    m = mf.load_manifest(fp, verify_hashes=False)
    specs = dict(parse_variant(v) for v in args.variant) or variants(False)
    dirs = {"ours_fp32": fp} | {f"ours_{tag}": quantised_copy(fp, tag, s) for tag, s in specs.items()}
    llama = PeerWorker(PEERS / "venv" / "bin" / "python", "llama_worker.py")
    try:
        files = peer_files(Path(m.source["path"]), PEERS / Path(m.source["path"]).parent.name, llama, args.peers)
        n_ctx = args.prompt + args.tokens + 16
        peers = {f"llama.cpp_{q}": (llama, {"gguf": str(p), "n_ctx": n_ctx}) for q, p in files.items()}
        machine = machine_info(max(args.threads))
        runs = asyncio.run(measure(args, dirs, peers))
    finally:
        llama.close()
    sizes = {k: sum(p.stat().st_size for p in d.glob("decoder.onnx*")) for k, d in dirs.items()}
    sizes |= {f"llama.cpp_{q}": p.stat().st_size for q, p in files.items()}
    bw = copy_bandwidth(1 << 30)
    summary = {}
    for t, systems in runs.items():
        summary[t] = {}
        for name, rounds in systems.items():
            pooled = [x for r in rounds for x in r["intervals_ms"]]
            summary[t][name] = {"ms_per_token": statistics.median(pooled),
                                "p10_ms": statistics.quantiles(pooled, n=10)[0],
                                "round_medians_ms": [statistics.median(r["intervals_ms"]) for r in rounds],
                                "roofline_ms": 1e3 * sizes[name] / (bw["copy_gb_s"] * 1e9)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "specs": {k: s.describe() for k, s in specs.items()},
                                    "bytes_per_step": sizes, "bandwidth": bw, "repeats": args.repeats,
                                    "prompt_tokens": args.prompt, "new_tokens": args.tokens,
                                    "runs": runs, "summary": summary}, indent=1))
    print(f"copy bandwidth {bw['copy_gb_s']:.1f} GB/s; load average at start {machine.get('load_average_at_start')}")
    print(f"{'thr':>3} {'system':22} {'MB':>5} {'ms/tok':>7} {'p10':>6} {'%roof':>5}  round medians")
    for t, rows in summary.items():
        for name, r in rows.items():
            print(f"{t:>3} {name:22} {sizes[name] / 1e6:5.0f} {r['ms_per_token']:7.2f} {r['p10_ms']:6.2f} "
                  f"{100 * r['roofline_ms'] / r['ms_per_token']:5.0f}  "
                  + " ".join(f"{x:.2f}" for x in r["round_medians_ms"]))
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
