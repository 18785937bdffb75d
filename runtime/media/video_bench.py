"""Benchmark: our keyframe-aware video extraction against decoding every frame.

`bench_video_extraction(tmpdir)` encodes a 60 s, 30 fps, 1280x720 H.264 clip per GOP length,
then runs, each in a fresh process (so peak RSS is its own):
  * ours:     `preprocess_video` (keyframe-only or seek+forward decode, convert selected frames
              straight to their final size);
  * baseline: decode every frame, keep the 2 fps sample (transformers' `sample_frames` indices)
              as full-resolution RGB, then resize, normalize and patchify the same way.
Both produce pixel_values of the same shape. Reports wall time, frames decoded, tracemalloc peak
(Python/numpy allocations) and peak RSS (includes FFmpeg's buffers) side by side.

    python -m runtime.media.video_bench [tmpdir]
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
import tracemalloc

import av
import numpy as np

from runtime.media.frames import VideoParams, cap_side, plan_targets, video_smart_resize
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
    from runtime.media.video import preprocess_video
    video = preprocess_video(path, params)
    return {"frames_decoded": video.stats.frames_decoded, "mode": video.stats.mode,
            "seeks": video.stats.seeks, "grid_thw": video.grid_thw,
            "frames_selected": len(video.frame_times)}


def run_baseline(path: str, params: VideoParams) -> dict:
    """Decode everything, sample at 2 fps, keep full-size RGB, resize/normalize/patchify."""
    from PIL import Image
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = params.decode_threads
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
    if len(resized) % 2:
        resized = np.concatenate([resized, resized[-1:]])
    pixel_values, grid = patchify(normalize(resized, params.image_mean, params.image_std),
                                  params.patch_size, params.temporal_patch_size,
                                  params.merge_size)
    return {"frames_decoded": decoded, "mode": "decode-all", "seeks": 0, "grid_thw": grid,
            "frames_selected": len(frames)}


def _measure(name: str, path: str, params: VideoParams, queue) -> None:
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    start = time.perf_counter()
    result = (run_ours if name == "ours" else run_baseline)(path, params)
    elapsed = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result.update(seconds=round(elapsed, 3), tracemalloc_peak_mb=round(traced_peak / 2**20, 1),
                  peak_rss_mb=round(rss_peak / 1024, 1),
                  rss_growth_mb=round((rss_peak - rss_before) / 1024, 1))
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


def bench_video_extraction(tmpdir: str, gops: tuple[int, ...] = (15, 60, 250),
                           params: VideoParams = VideoParams()) -> dict:
    """{"clip": ..., "runs": {"gop=<n>": {"ours": {...}, "baseline": {...}}}} (seconds, MB)."""
    runs = {}
    for gop in gops:
        path = os.path.join(tmpdir, f"bench_gop{gop}.mp4")
        if not os.path.exists(path):
            encode_bench_clip(path, gop)
        runs[f"gop={gop}"] = {"ours": _in_fresh_process("ours", path, params),
                              "baseline": _in_fresh_process("baseline", path, params)}
    return {"clip": f"{SECONDS}s {FPS}fps {WIDTH}x{HEIGHT} H.264 (libx264 veryfast)",
            "runs": runs}


if __name__ == "__main__":
    import json
    directory = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="video_bench_")
    print(json.dumps(bench_video_extraction(directory), indent=2))
