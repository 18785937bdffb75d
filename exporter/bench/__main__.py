"""`make bench`: the appliance's side-by-side benchmark, printed as a table and written as JSON.

    python -m exporter.bench --engine build/engines/default --out build/bench.json [--quick]

All rows run in one process on the same weights (see exporter/bench/__init__.py for the list).
A section that fails is recorded under "errors" (the others still run) and the exit status is 1.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
import time
import traceback
from pathlib import Path

from exporter.bench import report, sections
from exporter.bench.machine import machine_info
from exporter.bench.prefix_cache import prefix_cache

SECTIONS = ("kv_bytes", "decode", "prefix_cache", "concurrency", "pool_flatness", "roofline", "concurrency_bw",
            "event_loop_lag", "video", "constrained")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m exporter.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, required=True, help="engine directory (make engine)")
    ap.add_argument("--out", type=Path, default=Path("build/bench.json"), help="JSON result path")
    ap.add_argument("--model", type=Path, default=None,
                    help="checkpoint for transformers (default: the engine manifest's source path)")
    ap.add_argument("--threads", type=int, default=sections.default_threads(),
                    help="ONNX Runtime intra-op threads = torch.set_num_threads (default: all cores)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (the smoke test); no timings to trust")
    ap.add_argument("--bw-engine", type=Path, default=None,
                    help="engine for the roofline row (default: build the bandwidth-bound model once "
                         "into build/cache/bench-bw-*; with --quick: --engine)")
    ap.add_argument("--no-bw-parity", action="store_true",
                    help="build the bandwidth-bound engine without the parity gate")
    ap.add_argument("--peers", type=Path, default=Path("build/bench-peers.json"),
                    help="make bench-peers' JSON, for llama.cpp's step on this model (row 1b) when present")
    ap.add_argument("--skip", nargs="*", default=[], choices=SECTIONS, help="sections to leave out")
    return ap.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> dict:
    from runtime import manifest as mf
    from runtime.sessions import providers_for

    s = sections.QUICK if args.quick else sections.Sizes()
    manifest = mf.load_manifest(args.engine, verify_hashes=True)
    model_dir = args.model or Path(manifest.source["path"])
    info = machine_info(args.threads)
    info["providers_used"] = providers_for(manifest.partitions["decoder"].device)
    result: dict = {"engine": str(args.engine), "model": str(model_dir), "quick": args.quick,
                    "machine": info, "sizes": dataclasses.asdict(s), "notes": [], "errors": {}}
    if info["load_average_at_start"] and info["load_average_at_start"][0] > 0.5 * (info["cores"] or 1):
        result["notes"].append(f"the machine was shared (load average {info['load_average_at_start'][0]} "
                               f"on {info['cores']} cores at start): timings are noisy; each headline is "
                               f"a median of {s.repeats} runs, min / median / max beside it")

    async def section(name: str, make):
        if name in args.skip:
            return
        log(f"{name} ...")
        t = time.perf_counter()
        try:
            value = make()
            result[name] = await value if asyncio.iscoroutine(value) else value
        except Exception as e:
            traceback.print_exc()
            result["errors"][name] = f"{type(e).__name__}: {e}"
        log(f"{name} done in {time.perf_counter() - t:.1f} s")

    await section("kv_bytes", lambda: sections.kv_bytes(args.engine))
    if "decode" not in args.skip:
        await section("decode", lambda: sections.decode_and_prefill(args.engine, model_dir, args.threads, s))
        if "decode" in result:
            result["prefill"] = result["decode"].pop("prefill")
            result["decode"] = result["decode"].pop("decode")
            result["step_split"] = sections.step_split(result["decode"], args.peers, args.threads)
    await section("prefix_cache", lambda: prefix_cache(args.engine, args.threads, s))
    await section("concurrency", lambda: sections.concurrency(args.engine, args.threads, s))
    await section("pool_flatness", lambda: sections.pool_flatness(args.engine, args.threads, s))

    def bw_engine() -> Path:
        if args.bw_engine or args.quick:
            return args.bw_engine or args.engine
        from exporter.bench.bw_model import cached_engine
        path, built = cached_engine(run_parity=not args.no_bw_parity, log=log)
        if args.no_bw_parity:
            result["notes"].append("the bandwidth-bound engine was built without the parity gate")
        if built:
            result["notes"].append("the bandwidth-bound engine was built in this run (export time not "
                                   "counted in any row)")
        return path

    async def roofline():
        return await sections.roofline(bw_engine(), args.threads, s)
    await section("roofline", roofline)

    async def streams_bw():
        return await sections.concurrency_bandwidth_bound(bw_engine(), args.threads, s)
    await section("concurrency_bw", streams_bw)

    async def lag():
        from exporter.bench.server_lag import event_loop_lag
        return await event_loop_lag(args.engine, args.threads, s.lag_streams, s.lag_tokens, s.decode_prompt)
    await section("event_loop_lag", lag)
    await section("video", lambda: sections.video(sections.video_cache_dir(args.quick), s))

    async def grammar_row():
        from exporter.bench.constrained import constrained
        return await constrained(args.engine, args.threads, s)
    await section("constrained", grammar_row)
    if args.quick:
        result["notes"].append("--quick: tiny sizes for the smoke test; the numbers mean nothing")
    result["goals"] = report.goals(result)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    result = asyncio.run(run(args))
    result["total_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(report.table(result))
    log(f"wrote {args.out} in {result['total_seconds']:.0f} s")
    for name, err in result["errors"].items():
        print(f"section {name} failed: {err}", file=sys.stderr)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
