"""`make bench-peers`: our engine against llama.cpp and ONNX Runtime GenAI on the bandwidth-bound
model, side by side.

    python -m exporter.bench.peers --out build/bench-peers.json [--threads 1 2] [--repeats 3]

Needs the peer build (exporter/bench/peers/build_peers.sh, run once by `make bench-peers`). The
bandwidth-bound model (exporter/bench/bw_model.py) is compiled by our exporter as for row 5 of
`make bench`; its text decoder becomes a text-only Qwen3 checkpoint (peers/text_only.py) that
llama.cpp's own converter turns into GGUF at f32, f16 and q8_0, and llama.cpp's quantizer into
q4_0 (peers/convert.py); ONNX Runtime GenAI's model builder makes its fp32 and int4 models.
Then, per round and thread count: a prompt never seen before (our prefix cache cannot help,
checked), ours first, then every peer on the same token ids, each peer in a worker process of
its own (peers/llama_worker.py in the peer venv, peers/genai_worker.py). Batch 1, greedy, EOS
ignored everywhere.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from exporter.bench import ours
from exporter.quant_speed import quantised_copy, variants
from exporter.bench.bw_model import CACHE, cached_engine
from exporter.bench.machine import copy_bandwidth, machine_info
from exporter.bench.timing import spread
from exporter.bench.peers import convert as cv
from exporter.bench.peers.report import summarise, table
from exporter.bench.peers.text_only import write_text_only
from runtime import manifest as mf

PEERS = CACHE / "peers"
GENAI = ("fp32", "int4")
GENAI_PKGS = PEERS / "genai-pkgs"


def log(msg: str) -> None:
    print(f"[bench-peers] {msg}", file=sys.stderr, flush=True)


class PeerWorker:
    """A peer worker script (llama_worker.py, genai_worker.py) in its own process, spoken to
    over JSON lines (peers/wire.py)."""

    def __init__(self, python: Path, script: str, env: dict | None = None):
        self.name = script
        self.proc = subprocess.Popen([str(python), str(Path(__file__).with_name(script))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=None if env is None else dict(os.environ, **env))

    def __call__(self, **msg) -> dict:
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name} died (exit code {self.proc.wait()}) on {msg['cmd']}")
        out = json.loads(line)
        if "error" in out:
            raise RuntimeError(f"{self.name}, {msg['cmd']}: {out['error']}")
        return out

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def peer_build() -> dict:
    stamps = sorted(PEERS.glob("llama-*.built"))
    if not stamps or not (PEERS / "venv" / "bin" / "python").exists():
        raise SystemExit("the llama.cpp peer is not built: run `make bench-peers` (or "
                         "bash exporter/bench/peers/build_peers.sh) first")
    return json.loads((PEERS / "build.json").read_text())


def ggufs(model_dir: Path, work: Path, worker: PeerWorker) -> dict:
    text = write_text_only(model_dir, work / "text")
    vendor = next((PEERS / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    script, chkhsh = cv.prepare_converter(vendor, PEERS / "convert", text)
    log(f"converter: pre-tokenizer hash {chkhsh[:16]}... mapped to {cv.MAPPED_PRE_TOKENIZER!r} in our copy")
    out = {q: cv.convert(script, text, work / f"bw-{q}.gguf", q, log) for q in cv.CONVERTER_TYPES}
    out["q4_0"] = work / "bw-q4_0.gguf"
    if not out["q4_0"].exists():
        log("quantizing f32 to q4_0 with llama.cpp's quantizer")
        worker(cmd="quantize", src=str(out["f32"]), dst=str(out["q4_0"]), type="q4_0")
    return {"files": out, "pre_tokenizer_hash": chkhsh}


def genai_models(work: Path) -> dict[str, Path]:
    """ONNX Runtime GenAI's model builder on the same text-only checkpoint: fp32 and int4 (CPU)."""
    out = {}
    for precision in GENAI:
        dest = work / f"genai-{precision}"
        if not (dest / "genai_config.json").exists():
            log(f"building the ONNX Runtime GenAI model ({precision}) with its model builder")
            proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(work / "text"),
                                   "-o", str(dest), "-p", precision, "-e", "cpu", "-c", str(PEERS / "genai-cache")],
                                  capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(GENAI_PKGS)))
            if proc.returncode != 0:
                raise RuntimeError(f"onnxruntime_genai builder {precision} failed: {proc.stderr[-3000:]}")
        out[precision] = dest
    return out


async def measure(args, engine_dirs: dict[str, Path], peers: dict[str, tuple[PeerWorker, dict]]) -> dict:
    """engine_dirs: our system name -> engine (fp32 first, then the weight-quantised copies);
    peers: system name -> (worker, load arguments without key/threads). Per round and thread
    count: one new prompt, ours first (each precision), then every peer on the same token ids."""
    runs: dict[str, dict[str, list[dict]]] = {str(t): {} for t in args.threads}
    engines = {t: ours.load_engine(engine_dirs["ours_fp32"], t) for t in args.threads}
    quantised = {(name, t): ours.load_engine(d, t) for name, d in engine_dirs.items()
                 if name != "ours_fp32" for t in args.threads}
    for t in args.threads:
        for name, (worker, load) in peers.items():
            worker(cmd="load", key=f"{name}@{t}", threads=t, **load)
    try:
        for engine in [*engines.values(), *quantised.values()]:
            await engine.start()
            await ours.warm_up(engine, args.prompt)
        for t in args.threads:                     # untimed first run of each peer (page-in)
            ids = ours.prompt_ids(engines[t], ours.fresh_prompts(engines[t], args.prompt, 1)[0])
            for name, (worker, _) in peers.items():
                worker(cmd="run", key=f"{name}@{t}", ids=ids, new_tokens=4)
        for rnd in range(args.repeats):
            for t in args.threads:
                engine = engines[t]
                text = ours.fresh_prompts(engine, args.prompt, 1)[0]
                ids = ours.prompt_ids(engine, text)
                mine = await ours.timed(engine, ours.request(text, args.tokens))
                ours.assert_cold([mine], f"bench-peers ours at {t} threads")
                runs[str(t)].setdefault("ours_fp32", []).append(
                    {"prefill_s": mine["ttft_s"], "intervals_ms": mine["intervals_ms"],
                     "tokens": mine["token_ids"], "cached_tokens": mine["cached_tokens"],
                     "prompt_tokens": len(ids)})
                for (name, qt), q_engine in quantised.items():
                    if qt == t:                    # the same prompt: new to that engine's cache too
                        q = await ours.timed(q_engine, ours.request(text, args.tokens))
                        ours.assert_cold([q], f"bench-peers {name} at {t} threads")
                        runs[str(t)].setdefault(name, []).append(
                            {"prefill_s": q["ttft_s"], "intervals_ms": q["intervals_ms"],
                             "tokens": q["token_ids"], "cached_tokens": q["cached_tokens"],
                             "prompt_tokens": len(ids)})
                for name, (worker, _) in peers.items():
                    r = worker(cmd="run", key=f"{name}@{t}", ids=ids, new_tokens=args.tokens)
                    runs[str(t)].setdefault(name, []).append(r | {"prompt_tokens": len(ids)})
                log(f"round {rnd + 1}/{args.repeats}, {t} thread(s) done")
    finally:
        for engine in [*engines.values(), *quantised.values()]:
            await engine.stop()
    return runs


def tiny_model(args, llama: PeerWorker) -> dict:
    """llama.cpp f32 against our engine on the default (1.1M-parameter) model: the per-step
    overhead comparison of issue 13, read by `make bench` (row 1b) from result["tiny"]. Same
    protocol as the bandwidth-bound rows (new prompt per round, interleaved, same token ids)."""
    m = mf.load_manifest(args.tiny_engine, verify_hashes=False)
    source = Path(m.source["path"])
    work = PEERS / f"tiny-{source.name}"
    text = write_text_only(source, work / "text")
    vendor = next((PEERS / "src").glob("llama_cpp_python-*/vendor/llama.cpp"))
    script, chkhsh = cv.prepare_converter(vendor, PEERS / "convert", text)
    gguf = cv.convert(script, text, work / "tiny-f32.gguf", "f32", log)
    peers = {"llama.cpp_f32": (llama, {"gguf": str(gguf), "n_ctx": args.prompt + args.tokens + 16})}
    runs = asyncio.run(measure(args, {"ours_fp32": args.tiny_engine}, peers))
    by = {}
    for threads, systems in runs.items():
        by[threads] = {}
        for name, rounds in systems.items():
            pooled = [x for r in rounds for x in r["intervals_ms"]]
            by[threads][name] = {"ms_per_token": statistics.median(pooled),
                                 "round_medians_ms": spread(statistics.median(r["intervals_ms"]) for r in rounds)}
        mine, theirs = by[threads].get("ours_fp32"), by[threads].get("llama.cpp_f32")
        if mine and theirs:
            by[threads]["ours_over_llama_cpp_step"] = mine["ms_per_token"] / theirs["ms_per_token"]
    return {"engine": str(args.tiny_engine), "model": str(source), "gguf": str(gguf),
            "pre_tokenizer_hash": chkhsh, "runs": runs, "summary": {"by_threads": by}}


def tiny_table(t: dict) -> str:
    lines = [f"default model ({t['model']}), batch 1, ms per decode step (median pooled over the rounds):"]
    for threads, rows in t["summary"]["by_threads"].items():
        mine, theirs = rows.get("ours_fp32"), rows.get("llama.cpp_f32")
        lines.append(f"  {threads} thread(s): ours {mine['ms_per_token']:.3f} ms, llama.cpp f32 "
                     f"{theirs['ms_per_token']:.3f} ms, ours / it {rows['ours_over_llama_cpp_step']:.2f}x")
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m exporter.bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("build/bench-peers.json"))
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (chat-templated)")
    ap.add_argument("--tokens", type=int, default=64, help="generated tokens per run")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--no-genai", action="store_true", help="leave ONNX Runtime GenAI out")
    ap.add_argument("--tiny-engine", type=Path, default=Path("build/engines/default"),
                    help="also time llama.cpp f32 against this engine on its own (small) model, for "
                         "make bench's row 1b (skipped when absent)")
    ap.add_argument("--only-tiny", action="store_true",
                    help="only that comparison (minutes, not the bandwidth-bound rows' hour): its "
                         "result goes under \"tiny\" in --out, the file's other parts kept")
    return ap.parse_args(argv)


def only_tiny(args) -> int:
    build = peer_build()
    llama = PeerWorker(PEERS / "venv" / "bin" / "python", "llama_worker.py")
    try:
        info = llama(cmd="info")
        tiny = tiny_model(args, llama)
    finally:
        llama.close()
    tiny |= {"machine": machine_info(max(args.threads)), "repeats": args.repeats,
             "prompt_tokens": args.prompt, "new_tokens": args.tokens,
             "llama_cpp": {**build, "llama_cpp_python_runtime": info["llama_cpp_python"]}}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["tiny"] = tiny
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(tiny_table(tiny))
    log(f"wrote the default-model comparison into {args.out}")
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    if args.only_tiny:
        return only_tiny(args)
    start = time.perf_counter()
    build = peer_build()
    machine = machine_info(max(args.threads))
    engine_dir, _ = cached_engine(log=log)
    m = mf.load_manifest(engine_dir, verify_hashes=False)
    work = PEERS / Path(m.source["path"]).parent.name      # per bandwidth-bound model (its cache key)
    llama = PeerWorker(PEERS / "venv" / "bin" / "python", "llama_worker.py")
    genai = None
    try:
        info = llama(cmd="info")
        conv = ggufs(Path(m.source["path"]), work, llama)
        n_ctx = args.prompt + args.tokens + 16
        peers = {f"llama.cpp_{q}": (llama, {"gguf": str(p), "n_ctx": n_ctx}) for q, p in conv["files"].items()}
        sizes = {f"llama.cpp_{q}": p.stat().st_size for q, p in conv["files"].items()}
        genai_info: dict | str = "not measured: --no-genai"
        if not args.no_genai and GENAI_PKGS.is_dir():
            models = genai_models(work)
            genai = PeerWorker(Path(sys.executable), "genai_worker.py", {"PYTHONPATH": str(GENAI_PKGS)})
            genai_info = genai(cmd="info") | {"models": {k: str(v) for k, v in models.items()}}
            for precision, path in models.items():
                peers[f"ort-genai_{precision}"] = (genai, {"model_dir": str(path)})
                sizes[f"ort-genai_{precision}"] = (path / "model.onnx.data").stat().st_size
        elif not args.no_genai:
            genai_info = f"not measured: onnxruntime-genai is not installed in {GENAI_PKGS} (build_peers.sh)"
        engine_dirs = {"ours_fp32": engine_dir} | {
            f"ours_{tag}": quantised_copy(engine_dir, tag, spec) for tag, spec in variants(False).items()}
        for name, d in engine_dirs.items():
            if name != "ours_fp32":
                sizes[name] = sum((d / p.file).stat().st_size for k, p in
                                  mf.load_manifest(d, verify_hashes=False).partitions.items() if k == "decoder")
        runs = asyncio.run(measure(args, engine_dirs, peers))
        tiny = None
        if (args.tiny_engine / "manifest.json").is_file():
            tiny = tiny_model(args, llama)
        else:
            log(f"no engine at {args.tiny_engine}: the default-model comparison (make bench row 1b) is skipped")
    finally:
        llama.close()
        if genai is not None:
            genai.close()
    weight_bytes = int(m.profile["memory_plan"]["params"]["decoder"]) * 4
    sizes = {"ours_fp32": weight_bytes} | sizes        # ours_int8/int4: their decoder.onnx size
    result = {"machine": machine, "engine": str(engine_dir),
              "model": {"hidden": m.hidden_size, "layers": m.kv.num_layers, "vocab": m.vocab_size},
              "prompt_tokens": args.prompt, "new_tokens": args.tokens, "repeats": args.repeats,
              "llama_cpp": {**build, "llama_cpp_python_runtime": info["llama_cpp_python"],
                            "system_info": info["system"], "pre_tokenizer_hash": conv["pre_tokenizer_hash"],
                            "pre_tokenizer_mapped_to": cv.MAPPED_PRE_TOKENIZER,
                            "gguf_files": {q: str(p) for q, p in conv["files"].items()}},
              "bandwidth": copy_bandwidth(1 << 30), "bytes_per_step": sizes,
              "onnxruntime_genai": genai_info, "runs": runs}
    if tiny is not None:
        result["tiny"] = tiny
    result["summary"] = summarise(result)
    result["total_seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(table(result))
    if tiny is not None:
        print(tiny_table(tiny))
    log(f"wrote {args.out} in {result['total_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
