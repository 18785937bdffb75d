"""Benchmark: our keyframe-aware video extraction against decoding every frame.

`bench_video_extraction(tmpdir)` encodes a 60 s, 30 fps, 1280x720 H.264 clip per GOP length,
then runs each side `repeats` times, each run in a fresh process (so its peak RSS is its own):
  * ours:     `extract_frames` (keyframe-only, or seek + forward decode skipping non-reference
              frames no target can want; selected frames converted straight to their final
              size by swscale), then `assemble_video` (pairing, normalize, patchify, thumbnails);
  * baseline: what transformers' PyAV loader does: decode every frame, convert the 2 fps sample
              (transformers' `sample_frames` indices) to full-resolution RGB, resize to the same
              final size (PIL bicubic), then normalize and patchify the same way.
Both decode with the same threading (`threads`, default: all cores; frame + slice threads when
> 1) and produce pixel_values of the same shape. Timings per run:
  * extract_seconds:    open + decode + selection + RGB at the final size (what differs);
  * downstream_seconds: normalize + patchify (+ ours: pairing, thumbnails, content hash);
  * seconds:            both, end to end.
Reported per side: the run with the median extract_seconds, beside the min / median / max of
every timing over the runs (exporter.bench.timing.spread) and all runs' values, frames decoded,
tracemalloc peak (Python/numpy allocations) and peak RSS from /proc/self/status
VmHWM (FFmpeg's buffers included; reset before the run where the kernel allows, and unlike
getrusage's ru_maxrss it does not survive exec).

    python -m exporter.bench.video [tmpdir] [--threads N] [--repeats N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import tempfile
import time
import tracemalloc

import av
import numpy as np

from exporter.bench.timing import spread
from runtime.media.frames import VideoParams, plan_targets, video_smart_resize
from runtime.media.image import cap_side
from runtime.media.image import normalize, patchify

SECONDS, FPS, WIDTH, HEIGHT = 60, 30, 1280, 720


def encode_bench_clip(path: str, gop: int, seconds: int = SECONDS) -> None:
    """A moving test picture (panning gradient + bars) in H.264 (libx264 veryfast, B-frames)."""
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(xx * 255 // WIDTH), (yy * 255 // HEIGHT), ((xx + yy) % 256)], -1)
    base = base.astype(np.uint8)
    with av.open(path, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23",
                          "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for i in range(seconds * FPS):
            img = np.roll(base, 8 * i, axis=1)
            img[(i * 4) % HEIGHT:(i * 4) % HEIGHT + 40] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def run_ours(path: str, params: VideoParams) -> dict:
    from runtime.media.video import assemble_video, content_hash, extract_frames
    start = time.perf_counter()
    extracted = extract_frames(path, params)
    mid = time.perf_counter()
    video = assemble_video(extracted, params, content_hash(path, params))
    end = time.perf_counter()
    return {"frames_decoded": video.stats.frames_decoded, "mode": video.stats.mode,
            "seeks": video.stats.seeks, "grid_thw": video.grid_thw,
            "frames_selected": len(video.frame_times),
            "extract_seconds": mid - start, "downstream_seconds": end - mid}


def run_baseline(path: str, params: VideoParams) -> dict:
    """Decode everything, convert the 2 fps sample to full-size RGB, resize, normalize, patchify."""
    from PIL import Image
    start = time.perf_counter()
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = params.decode_threads
        if params.decode_threads != 1:
            stream.codec_context.thread_type = "AUTO"
        total, fps = stream.frames, float(stream.average_rate)
        wanted = set(np.round(plan_targets(total, fps, params) * fps).astype(int).tolist())
        frames, decoded = [], 0
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    h, w = video_smart_resize(len(frames), *cap_side(HEIGHT, WIDTH, params.max_side), params)
    resized = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC))
                        for f in frames])
    mid = time.perf_counter()
    if len(resized) % 2:
        resized = np.concatenate([resized, resized[-1:]])
    pixel_values, grid = patchify(normalize(resized, params.image_mean, params.image_std),
                                  params.patch_size, params.temporal_patch_size,
                                  params.merge_size)
    end = time.perf_counter()
    return {"frames_decoded": decoded, "mode": "decode-all", "seeks": 0, "grid_thw": grid,
            "frames_selected": len(frames),
            "extract_seconds": mid - start, "downstream_seconds": end - mid}


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


def _measure(name: str, path: str, params: VideoParams, queue) -> None:
    import PIL.Image  # noqa: F401  (imports stay out of the timings)
    import runtime.media.video  # noqa: F401
    reset = _reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    tracemalloc.start()
    start = time.perf_counter()
    result = (run_ours if name == "ours" else run_baseline)(path, params)
    elapsed = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = _status_kb("VmHWM")
    result.update(seconds=round(elapsed, 3), extract_seconds=round(result["extract_seconds"], 3),
                  downstream_seconds=round(result["downstream_seconds"], 3),
                  tracemalloc_peak_mb=round(traced_peak / 2**20, 1),
                  peak_rss_mb=round(rss_peak / 1024, 1),
                  rss_growth_mb=round((rss_peak - rss_before) / 1024, 1), peak_rss_reset=reset)
    queue.put(result)


def _in_fresh_process(name: str, path: str, params: VideoParams) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(name, path, params, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:                       # queue.Empty: is the child still there?
            if not proc.is_alive():
                raise RuntimeError(f"benchmark run {name!r} died (exit code {proc.exitcode})")
    proc.join()
    return result


def _median_run(runs: list[dict]) -> dict:
    """The run with the median extraction time (the upper one of an even count), with every
    run's timings listed and their min / median / max under "spread"."""
    ordered = sorted(runs, key=lambda r: r["extract_seconds"])
    mid = dict(ordered[len(ordered) // 2])
    mid["spread"] = {}
    for key in ("extract_seconds", "downstream_seconds", "seconds"):
        mid[key + "_runs"] = [r[key] for r in runs]
        mid["spread"][key] = spread(r[key] for r in runs)
    return mid


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 2) if b > 0 else None


def bench_video_extraction(tmpdir: str, gops: tuple[int, ...] = (15, 60, 250),
                           params: VideoParams | None = None, threads: int | None = None,
                           repeats: int = 3) -> dict:
    """{"clip", "decode_threads", "repeats", "runs": {"gop=<n>": {"ours": {...},
    "baseline": {...}, "extraction_speedup", "total_speedup"}}} (seconds, MB). Both sides decode
    with `threads` threads (None: os.cpu_count()); ours and baseline runs alternate."""
    threads = threads if threads is not None else (os.cpu_count() or 1)
    params = params or VideoParams(decode_threads=threads)
    params = dataclasses.replace(params, decode_threads=threads)
    runs = {}
    for gop in gops:
        path = os.path.join(tmpdir, f"bench_gop{gop}.mp4")
        if not os.path.exists(path):
            encode_bench_clip(path, gop)
        ours, baseline = [], []
        for _ in range(max(1, repeats)):
            ours.append(_in_fresh_process("ours", path, params))
            baseline.append(_in_fresh_process("baseline", path, params))
        o, b = _median_run(ours), _median_run(baseline)
        runs[f"gop={gop}"] = {
            "ours": o, "baseline": b,
            "extraction_speedup": _ratio(b["extract_seconds"], o["extract_seconds"]),
            "total_speedup": _ratio(b["seconds"], o["seconds"])}
    return {"clip": f"{SECONDS}s {FPS}fps {WIDTH}x{HEIGHT} H.264 (libx264 veryfast)",
            "decode_threads": threads, "repeats": max(1, repeats), "runs": runs}


def format_table(result: dict) -> str:
    """A plain-text table of `bench_video_extraction`'s result."""
    lines = [f"video extraction: {result['clip']}, decode threads {result['decode_threads']} "
             f"(both sides), median extraction of {result['repeats']} fresh processes",
             f"{'GOP':<9}{'side':<10}{'mode':<11}{'decoded':>8}{'extract s':>11}"
             f"{'downstr s':>11}{'total s':>9}{'RSS MB':>8}{'traced MB':>10}"]
    for gop, run in result["runs"].items():
        for side in ("ours", "baseline"):
            r = run[side]
            lines.append(f"{gop:<9}{side:<10}{r['mode']:<11}{r['frames_decoded']:>8}"
                         f"{r['extract_seconds']:>11.2f}{r['downstream_seconds']:>11.2f}"
                         f"{r['seconds']:>9.2f}{r['peak_rss_mb']:>8.0f}"
                         f"{r['tracemalloc_peak_mb']:>10.0f}")
        lines.append(f"{'':<9}speedup: extraction {run['extraction_speedup']}x, "
                     f"end to end {run['total_speedup']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tmpdir", nargs="?", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    directory = args.tmpdir or tempfile.mkdtemp(prefix="video_bench_")
    out = bench_video_extraction(directory, threads=args.threads, repeats=args.repeats)
    print(format_table(out))
    print(json.dumps(out, indent=2))
