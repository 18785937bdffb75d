"""Benchmark: our video frame extraction against the loaders users would pick instead.

`bench_video_extraction(cache_dir)` encodes 1280x720 clips once (H.264 at GOP 15, 60 and 250, and
a VP9 clip: exporter.bench.video_clips), asks our runtime which frame times it selects (an untimed
run of `extract_frames`), then times every contestant of exporter.bench.video_methods (ours,
vLLM's PyAV loader, ffmpeg as llama.cpp runs it, ffmpeg -vf fps=2, decode-every-frame) producing
the model's input pixels for those same frames: uint8 RGB at the final size (what normalize +
patchify then take, identical for all, and not timed). Every run is a fresh process (spawn), so
its peak RSS and CPU time are its own; runs alternate between contestants, `repeats` rounds.

Reported per clip and contestant, from the run with the median wall time: wall s, CPU s
(user + sys of the process and its children: ffmpeg's own time counts), peak RSS (VmHWM of the
process, reset before the run where the kernel allows, plus the ffmpeg child's peak), frames
decoded, and the min / median / max over runs. Quality, after the timings: PSNR of each
contestant's frames against exact decoding of the same frames (every frame decoded, no skipping),
resized the way transformers does (full-size RGB, PIL bicubic), and for ours also against exact
decoding through our own swscale conversion (which isolates what skipping frames costs: nothing,
when it says inf). Goal: ours ahead of the fastest peer on every clip.

    python -m exporter.bench.video [cache_dir] [--threads N] [--repeats N] [--seconds S] [--out F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import resource
import tempfile
import time

import av
import numpy as np

from exporter.bench.timing import spread
from exporter.bench.video_clips import bench_clips
from exporter.bench.video_methods import FFMPEG_METHODS, METHODS, PEERS, ffmpeg_unavailable
from runtime.media.frames import VideoParams

DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "build", "cache",
                             "bench-video")
RUN_TIMEOUT_S = 600


def _status_kb(field: str) -> int:
    """A 'kB' line of /proc/self/status (VmHWM: peak RSS, VmRSS: current RSS); 0 if absent."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_s(usage) -> float:
    return usage.ru_utime + usage.ru_stime


def _measure(name: str, path: str, plan: dict, save_to: str | None, out) -> None:
    """One run in a fresh process: time `name` to its final frames, then (untimed) save them."""
    import PIL.Image  # noqa: F401  (imports stay out of the timings)
    import runtime.media.video  # noqa: F401
    reset = _reset_peak_rss()
    self0, kids0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    frames, info = METHODS[name](path, plan)
    wall = time.perf_counter() - start
    self1, kids1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    child_rss_mb = kids1.ru_maxrss / 1024 if name in FFMPEG_METHODS else 0.0
    result = dict(info, seconds=round(wall, 3),
                  cpu_seconds=round(_cpu_s(self1) - _cpu_s(self0) + _cpu_s(kids1) - _cpu_s(kids0), 3),
                  peak_rss_mb=round(_status_kb("VmHWM") / 1024 + child_rss_mb, 1),
                  subprocess_peak_rss_mb=round(child_rss_mb, 1), peak_rss_reset=reset,
                  frames=len(frames), shape=list(frames[0].shape) if frames else None)
    if save_to:
        np.save(save_to, np.stack(frames))
    out.put(result)


def _in_fresh_process(name: str, path: str, plan: dict, save_to: str | None = None) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(name, path, plan, save_to, out))
    proc.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        try:
            result = out.get(timeout=2)
            break
        except queue_mod.Empty:
            if not proc.is_alive() or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"video benchmark run {name!r} died or hung "
                                   f"(exit code {proc.exitcode})")
    proc.join()
    return result


def plan_for(path: str, params: VideoParams) -> dict:
    """The frames every contestant must produce: those our runtime selects (an untimed run)."""
    from runtime.media.video import extract_frames
    extracted = extract_frames(path, params)
    fps = extracted.stats.source_fps
    indices = [int(round(t * fps)) for t in extracted.times]
    return {"indices": indices, "times": list(extracted.times), "fps": fps,
            "size": list(extracted.size), "threads": params.decode_threads,
            "params": dataclasses.asdict(params)}


def exact_frames(path: str, plan: dict) -> np.ndarray:
    """Every frame decoded (one thread, no skipping); the planned ones through our own swscale
    conversion to the final size (the same call as runtime.media.video)."""
    from runtime.media.video import scaler_for
    h, w = plan["size"]
    wanted, out = set(plan["indices"]), []
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                out.append(frame.to_ndarray(width=w, height=h, format="rgb24",
                                            interpolation=scaler_for(frame.height, frame.width, h, w)))
    return np.stack(out)


def psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean over frames of each frame's PSNR (dB, 8-bit); inf where identical; None if shapes differ."""
    if a.shape != b.shape:
        return None
    err = ((a.astype(np.float32) - b.astype(np.float32)) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean([math.inf if e == 0 else 10 * math.log10(255 ** 2 / e) for e in err]))


def _median_run(runs: list[dict]) -> dict:
    ordered = sorted(runs, key=lambda r: r["seconds"])
    mid = dict(ordered[len(ordered) // 2])
    mid["spread"] = {k: spread(r[k] for r in runs) for k in ("seconds", "cpu_seconds", "peak_rss_mb")}
    mid["seconds_runs"] = [r["seconds"] for r in runs]
    return mid


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def _db(x: float | None):
    return None if x is None else ("inf" if math.isinf(x) else round(x, 2))


def bench_clip(clip, params: VideoParams, repeats: int, methods: list[str], work: str) -> dict:
    plan = plan_for(clip.path, params)
    runs: dict[str, list] = {m: [] for m in methods}
    for r in range(repeats):
        for m in methods:
            save = os.path.join(work, f"{m}.npy") if r == 0 else None
            runs[m].append(_in_fresh_process(m, clip.path, plan, save))
    med = {m: _median_run(v) for m, v in runs.items()}
    reference = np.load(os.path.join(work, "decode_all.npy"))       # exact frames, PIL bicubic
    quality = {m: _db(psnr(np.load(os.path.join(work, f"{m}.npy")), reference))
               for m in methods if m not in ("ffmpeg_fps2", "decode_all")}
    quality["decode_all"] = "ref"
    quality["ours_vs_exact_same_conversion"] = _db(psnr(np.load(os.path.join(work, "ours.npy")),
                                                        exact_frames(clip.path, plan)))
    peers = {m: med[m]["seconds"] for m in PEERS if m in med}
    fastest = min(peers, key=peers.get)
    return {"clip": clip.description, "frames": len(plan["indices"]), "size": plan["size"],
            "frame_times": [round(t, 3) for t in plan["times"]], "methods": med,
            "psnr_db": quality, "fastest_peer": fastest,
            "speedup_vs_fastest_peer": _ratio(peers[fastest], med["ours"]["seconds"]),
            "cpu_ratio_vs_fastest_peer": _ratio(med[fastest]["cpu_seconds"], med["ours"]["cpu_seconds"]),
            "speedup_vs_decode_all": _ratio(med["decode_all"]["seconds"], med["ours"]["seconds"])}


def bench_video_extraction(cache_dir: str = DEFAULT_CACHE, gops: tuple[int, ...] = (15, 60, 250),
                           vp9_gop: int | None = 60, seconds: int = 20, threads: int | None = None,
                           repeats: int = 3, params: VideoParams | None = None) -> dict:
    """{"runs": {clip name: {...}}, "skipped": {method: why}, "goal_met", ...}; see the module
    docstring. Every contestant decodes with `threads` threads (None: all cores)."""
    threads = threads if threads is not None else (os.cpu_count() or 1)
    params = dataclasses.replace(params or VideoParams(), decode_threads=threads)
    skipped = {}
    methods = list(METHODS)
    if why := ffmpeg_unavailable():
        skipped = {m: why for m in FFMPEG_METHODS}
        methods = [m for m in methods if m not in FFMPEG_METHODS]
        print(f"video benchmark: skipping {', '.join(FFMPEG_METHODS)}: {why}", flush=True)
    runs = {}
    for clip in bench_clips(cache_dir, gops, vp9_gop, seconds):
        with tempfile.TemporaryDirectory(prefix="video_bench_") as work:
            runs[clip.name] = bench_clip(clip, params, max(1, repeats), methods, work)
    worst = min((r["speedup_vs_fastest_peer"] or 0.0) for r in runs.values())
    return {"decode_threads": threads, "repeats": max(1, repeats), "seconds": seconds,
            "methods": methods, "skipped": skipped, "runs": runs,
            "worst_speedup_vs_fastest_peer": worst, "goal_met": worst > 1.0,
            "ffmpeg": _ffmpeg_version() if "ffmpeg_select" in methods else None,
            "pyav": av.__version__}


def _ffmpeg_version() -> str:
    import subprocess
    out = subprocess.run(["ffmpeg", "-version"], capture_output=True, text=True, check=False).stdout
    return out.split("\n", 1)[0]


def goal_line(result: dict) -> str:
    return (f"goal: ours ahead of the fastest peer on every GOP: "
            f"{'MET' if result['goal_met'] else 'NOT MET'} (worst clip "
            f"{result['worst_speedup_vs_fastest_peer']:.2f}x the fastest peer's wall time)")


def format_table(result: dict) -> str:
    """The printed table of `bench_video_extraction`'s result."""
    lines = [f"video extraction to the model's input pixels (same frames for all), {result['repeats']} "
             f"fresh processes each, median wall run; decode threads {result['decode_threads']}",
             f"  {'clip':<14}{'method':<15}{'wall s':>8}{'cpu s':>8}{'RSS MB':>8}{'decoded':>9}"
             f"{'PSNR dB':>9}  wall min-max"]
    for name, run in result["runs"].items():
        for m, r in run["methods"].items():
            q = run["psnr_db"].get(m)
            sp = r["spread"]["seconds"]
            lines.append(f"  {name:<14}{m:<15}{r['seconds']:>8.2f}{r['cpu_seconds']:>8.2f}"
                         f"{r['peak_rss_mb']:>8.0f}{r['frames_decoded'] if r['frames_decoded'] is not None else '-':>9}"
                         f"{q if q is not None else '-':>9}  {sp['min']:.2f}-{sp['max']:.2f}")
        lines.append(f"  {'':<14}{run['frames']} frames at {run['size'][1]}x{run['size'][0]}; fastest peer "
                     f"{run['fastest_peer']}: ours {run['speedup_vs_fastest_peer']}x its wall, "
                     f"{run['cpu_ratio_vs_fastest_peer']}x its CPU; {run['speedup_vs_decode_all']}x "
                     f"decode_all; ours vs exact decoding through the same conversion: "
                     f"{run['psnr_db']['ours_vs_exact_same_conversion']} dB")
    for m, why in result["skipped"].items():
        lines.append(f"  {m} skipped: {why}")
    lines.append("  " + goal_line(result))
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache_dir", nargs="?", default=DEFAULT_CACHE)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    res = bench_video_extraction(args.cache_dir, threads=args.threads, repeats=args.repeats,
                                 seconds=args.seconds)
    print(format_table(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
