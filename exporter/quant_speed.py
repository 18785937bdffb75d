"""Batch-1 decode speed of fp32 vs INT8 vs INT4 weights on the bandwidth-bound model.

`python -m exporter.quant_speed [--rounds N] [--tokens N] [--threads 1,2]`

The fp32 engine is the benchmark's own (exporter/bench/bw_model.py, built once); the INT8 and
INT4 engines are copies of it with their decoder graphs quantised exactly as the cpu-int8 /
cpu-int4 profiles' build does (exporter/quantize.py), and their manifests rehashed. Each round
runs one request per engine through the real Engine (exporter/bench/ours.py), the engines
interleaved so that load on this shared machine hits them alike; the headline is the median
decode step interval pooled over all rounds, and the ratios are taken between those medians.
Writes build/bench-quant.json.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
from pathlib import Path

from exporter.bench import bw_model
from exporter.bench.ours import load_engine, prompt_text, request, timed, warm_up
from exporter.profiles import load_profile
from exporter.quantize import WeightQuant, quantize_partitions
from runtime import manifest as mf

OUT = bw_model.ROOT / "build" / "bench-quant.json"     # beside build/bench.json (ignored by git)
PROFILES = {"int8": "cpu-int8", "int4": "cpu-int4"}


def variants(with_levels: bool) -> dict[str, WeightQuant]:
    """The profiles' weight specs, plus (with_levels) each at accuracy level 0 (fp32 compute)."""
    out = {k: load_profile(p).weights for k, p in PROFILES.items()}
    if with_levels:
        out |= {f"{k}-level0": dataclasses.replace(s, accuracy_level=0) for k, s in list(out.items())}
    return out


def quantised_copy(fp_engine: Path, tag: str, spec: WeightQuant) -> Path:
    """fp_engine's sibling <name>-<tag>, its decoders quantised by `spec` as the build does (cached)."""
    out = fp_engine.with_name(f"{fp_engine.name}-{tag}")
    man_path = out / mf.MANIFEST
    if man_path.is_file():
        m = json.loads(man_path.read_text())
        if m.get("profile", {}).get("quantization", {}).get("spec") == dataclasses.asdict(spec):
            return out
    tmp = out.with_name(out.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(fp_engine, tmp)
    man = mf.load_manifest(tmp, verify_hashes=False)
    (tmp / mf.MANIFEST).unlink()
    q = quantize_partitions(spec, tmp, man.partitions, man.vocab_size)
    files = {p.relative_to(tmp).as_posix(): mf.sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    man = dataclasses.replace(man, files=files, profile=man.profile | {"quantization": q})
    (tmp / mf.MANIFEST).write_text(man.to_json())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def decoder_bytes(engine: Path) -> int:
    return sum(p.stat().st_size for p in engine.glob("decoder.onnx*"))


async def measure(engines: dict[str, Path], threads: int, rounds: int, tokens: int) -> dict:
    loaded = {k: load_engine(p, threads) for k, p in engines.items()}
    for e in loaded.values():
        await e.start()
    try:
        first = next(iter(loaded.values()))
        text, n_prompt = prompt_text(first, 64)
        for e in loaded.values():
            await warm_up(e)
        intervals = {k: [] for k in loaded}
        for _ in range(rounds):
            for k, e in loaded.items():          # interleaved: one request each per round
                intervals[k] += (await timed(e, request(text, tokens)))["intervals_ms"]
        med = {k: statistics.median(v) for k, v in intervals.items()}
        return {"threads": threads, "prompt_tokens": n_prompt, "step_ms": med,
                "samples": {k: len(v) for k, v in intervals.items()},
                "speedup_vs_fp32": {k: med["fp32"] / m for k, m in med.items()}}
    finally:
        for e in loaded.values():
            await e.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--accuracy-levels", action="store_true",
                    help="also time each precision at accuracy level 0 (fp32 compute in MatMulNBits)")
    args = ap.parse_args()
    fp, _ = bw_model.cached_engine(run_parity=False)
    engines = {"fp32": fp} | {k: quantised_copy(fp, k, s) for k, s in variants(args.accuracy_levels).items()}
    sizes = {k: decoder_bytes(p) for k, p in engines.items()}
    results = [asyncio.run(measure(engines, int(t), args.rounds, args.tokens))
               for t in args.threads.split(",")]
    print(f"batch-1 decode on the bandwidth-bound model, median step ms over {args.rounds} "
          f"interleaved rounds of {args.tokens} tokens")
    print(f"{'threads':>7} " + " ".join(f"{k:>17}" for k in engines))
    for r in results:
        print(f"{r['threads']:>7} " + " ".join(
            f"{r['step_ms'][k]:7.2f} ({r['speedup_vs_fp32'][k]:4.2f}x)" for k in engines))
    print("decoder file MB: " + ", ".join(f"{k} {b / 1e6:.0f}" for k, b in sizes.items()))
    OUT.write_text(json.dumps({"decoder_bytes": sizes, "results": results}, indent=2))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
