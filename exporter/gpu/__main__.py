"""`make gpu-check`: one prepared command for a machine with a GPU (and a portable subset on the CPU).

    python -m exporter.gpu [--wheels DIR] [--size auto|4b|2b|tiny] [--cap-gib 24] [--out FILE]

1. whether ONNX Runtime's CUDA provider loads here, and if not, why (the provider's own error);
2. the ONNX Runtime assumption checks (exporter/gpu/verify_kv.py: in-place ScatterND, raw-pointer
   writes, MRoPE op; on CUDA also PagedAttention INT8, CUDA graph capture, memory caps);
3. a random-weight checkpoint of the real architecture (`4b` on CUDA: Qwen3-VL-4B-Instruct's
   config; `tiny` on the CPU) built by the real exporter (cuda-24gb profile on CUDA, cpu profile
   otherwise), parity gate included;
4. that engine served under a memory cap (on CUDA a ballast allocation of total minus --cap-gib
   first: `gpu_mem_limit` covers only a session's arena), measured: load time, peak memory, decode
   tokens/s at batch 1, 8, 16, time to first token for a 1024x1024 image and a 60 s clip, host
   bytes per decode step, the roofline ratio at batch 1, vision output bytes per image.
It prints a table, writes JSON (default build/gpu-check.json) and exits 0 on a machine without
CUDA once the portable subset ran; with CUDA it exits 1 if a check failed. Steps that finished are
cached under build/cache/gpu-check/ so a second call on a still-warm machine continues.

--wheels DIR installs every wheel in DIR first (files split into DIR/*.part-* are joined), for a
bare machine given onnxruntime-gpu in pieces; the CPU onnxruntime wheel is replaced by it.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "cache" / "gpu-check"
PROFILES = {True: "cuda-24gb", False: "cpu"}


def install_wheels(folder: Path) -> None:
    parts: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("*.part-*")):
        parts.setdefault(p.name.split(".part-")[0], []).append(p)
    for name, pieces in parts.items():
        with open(folder / name, "wb") as out:
            for piece in pieces:
                out.write(piece.read_bytes())
    wheels = sorted(str(p) for p in folder.glob("*.whl"))
    if any("onnxruntime_gpu" in w for w in wheels):
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "onnxruntime"], check=False)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--find-links",
                    str(folder), *wheels], check=True)


def verify_kv(device: str) -> dict:
    script = Path(__file__).with_name("verify_kv.py")
    run = subprocess.run([sys.executable, str(script), device], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith("[")]
    return {"device": device, "passed": run.returncode == 0 and all(ln.startswith("[PASS]") for ln in lines),
            "lines": lines, "stderr_tail": run.stderr[-2000:]}


def bandwidth_gb_s(cuda: bool) -> tuple[float, str]:
    if cuda:
        try:
            import pynvml
            pynvml.nvmlInit()
            h = pynvml.nvmlDeviceGetHandleByIndex(0)
            bits = pynvml.nvmlDeviceGetMemoryBusWidth(h)
            mhz = pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_MEM)
            return bits / 8 * mhz * 1e6 * 2 / 1e9, "NVML: bus width x max memory clock x 2"
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            return 0.0, f"unknown ({e})"
    from exporter.bench.machine import copy_bandwidth
    return copy_bandwidth(1 << 28)["copy_gb_s"], "numpy copy (read + write)"


def ballast(cap_gib: float):
    """Hold total-minus-cap bytes of GPU memory so the engine sees a card of cap_gib."""
    import numpy as np
    import onnxruntime as ort
    import pynvml
    pynvml.nvmlInit()
    total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
    extra = int(total - cap_gib * (1 << 30))
    if extra <= 0:
        return None, 0
    return ort.OrtValue.ortvalue_from_shape_and_type([extra], np.uint8, "cuda", 0), extra


def table(report: dict) -> str:
    rows = ["gpu-check report", f"  CUDA provider            {'loads' if report['cuda'] else 'not available: ' + report['cuda_reason']}"]
    v = report["verify_kv"]
    rows.append(f"  ORT assumption checks    {'all passed' if v['passed'] else 'FAILED'} ({v['device']})")
    rows += [f"    {ln}" for ln in v["lines"]]
    b = report.get("build")
    if b:
        rows.append(f"  engine                   {b['size']} random weights, profile {b['profile']}, "
                    f"built in {b['seconds']:.0f} s (parity gate {'passed' if b['ok'] else 'FAILED: ' + b.get('error', '')})")
    s = report.get("serve")
    if s:
        gib = 1 << 30
        rows += [f"  served on                {s['device']} (cap {report['cap_gib']} GiB, ballast {report['ballast_bytes'] / gib:.1f} GiB)",
                 f"  load time                {s['load_s']:.1f} s",
                 f"  peak memory              {s['peak_memory_bytes'] / gib:.2f} GiB ({s['peak_memory_kind']}); KV pool {s['kv_pool_bytes'] / gib:.2f} GiB"]
        for d in s["decode"]:
            rows.append(f"  decode batch {d['batch']:<3}         {d['tokens_per_s']:.1f} tok/s ({d['step_ms']:.2f} ms/step)")
        ttv = s["ttft_video_60s_s"]
        rows += [f"  TTFT 1024x1024 image     {s['ttft_image_1024_s']:.3f} s",
                 f"  TTFT 60 s clip           {ttv if isinstance(ttv, str) else f'{ttv:.3f} s'}",
                 f"  host bytes / decode step in {s['decode_step_host_bytes']['in']:,}, out {s['decode_step_host_bytes']['out']:,}",
                 f"  vision output / image    {s['vision_output_bytes_1024']:,} bytes (host-side)"]
        r = s["roofline"]
        ratio = "n/a" if r["ratio"] is None else f"{100 * r['ratio']:.1f}%"
        rows.append(f"  roofline at batch 1      {ratio} ({r['bytes_per_step'] / 1e9:.3f} GB/step in "
                    f"{1e3 * r['step_s']:.2f} ms vs {r['bandwidth_gb_s']:.0f} GB/s, {report['bandwidth_source']})")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m exporter.gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--wheels", type=Path, help="install every wheel in this folder first")
    ap.add_argument("--size", choices=("auto", "4b", "2b", "tiny"), default="auto")
    ap.add_argument("--cap-gib", type=float, default=24.0)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "gpu-check.json")
    ap.add_argument("--skip-serve", action="store_true", help="stop after the build")
    args = ap.parse_args(argv)
    if args.wheels:
        install_wheels(args.wheels)
        rest = [a for a in (argv or sys.argv[1:])]
        i = rest.index("--wheels")
        del rest[i:i + 2]
        os.execv(sys.executable, [sys.executable, "-m", "exporter.gpu", *rest])

    from runtime.sessions import cuda_available, cuda_unavailable_reason
    cuda = cuda_available()
    report: dict = {"cuda": cuda, "cuda_reason": cuda_unavailable_reason(), "cap_gib": args.cap_gib,
                    "ballast_bytes": 0}
    print("CUDA provider: " + ("loads" if cuda else f"not available ({report['cuda_reason']}); "
                               "running the portable subset on the CPU"), flush=True)
    report["verify_kv"] = verify_kv("cuda" if cuda else "cpu")
    size = args.size if args.size != "auto" else ("4b" if cuda else "tiny")
    profile = PROFILES[cuda]
    from exporter.build import build_engine
    from exporter.gpu.checkpoint import build_random_checkpoint
    model_dir = CACHE / f"model-{size}"
    engine_dir = CACHE / f"engine-{size}-{profile}"
    t = time.perf_counter()
    build = {"size": size, "profile": profile, "ok": True}
    try:
        if not _engine_loads(engine_dir):
            build_random_checkpoint(model_dir, size, dtype="float16" if cuda else "float32",
                                    device="cuda" if cuda and _torch_cuda() else "cpu")
            build_engine(model_dir, profile, engine_dir.name, out_root=engine_dir.parent)
    except Exception as e:  # noqa: BLE001 - the report says what failed
        build.update(ok=False, error=f"{type(e).__name__}: {e}")
    build["seconds"] = time.perf_counter() - t
    report["build"] = build
    if build["ok"] and not args.skip_serve:
        hold = None
        if cuda:
            hold, report["ballast_bytes"] = ballast(args.cap_gib)
        bw, source = bandwidth_gb_s(cuda)
        report["bandwidth_source"] = source
        from exporter.gpu.measure import serve_and_measure
        report["serve"] = asyncio.run(serve_and_measure(engine_dir, cuda, bw))
        del hold
    print(table(report), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {args.out}")
    failed = not report["verify_kv"]["passed"] or not build["ok"]
    return 1 if cuda and failed else 0


def _engine_loads(engine_dir: Path) -> bool:
    """Whether a cached engine is one this runtime reads (one of an older format is rebuilt)."""
    from runtime import manifest as mf
    try:
        mf.load_manifest(engine_dir, verify_hashes=False)
        return True
    except mf.EngineError:
        return False


def _torch_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
