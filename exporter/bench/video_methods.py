"""The video benchmark's contestants: each turns a clip into the model's input pixels (uint8 RGB
frames at the final size) for the frame times our runtime selects.

    METHODS[name](path, plan) -> (frames: list of uint8 [h, w, 3], info: dict)

  * ours:          runtime.media.video.extract_frames (keyframe-only, or seek + forward decode
                   skipping non-reference frames no target can want; swscale to the final size);
  * vllm_pyav:     vLLM's PyAV loader (vllm/multimodal/video_decoders/pyav.py,
                   PyAVVideoBackendMixin.decode_frames at 49296d9e): SLICE threads, a seek to the
                   first sampled frame's pts (and again only when targets go backwards), decode
                   forward to each target pts, full-size rgb24, np.stack; then the resize
                   transformers' image path does (PIL bicubic);
  * ffmpeg_select: llama.cpp's ffmpeg route as a subprocess (Debian's ffmpeg): the same frame
                   numbers through `select`, scaled to the final size by ffmpeg, raw rgb24 on a
                   pipe (cheaper than llama.cpp's PNG files);
  * ffmpeg_fps2:   `ffmpeg -vf fps=2,scale=W:H`: ffmpeg's own 2 fps grid (its frames differ from
                   the plan's by up to one target interval; timed, not compared for quality);
  * decode_all:    decode every frame (frame + slice threads), convert the planned ones to
                   full-size rgb24, PIL bicubic resize (what transformers' PyAV loader does).

`plan` = {"indices": frame numbers, "fps", "size": (h, w), "threads", "params": VideoParams kwargs}.
"""
from __future__ import annotations

import shutil
import subprocess

import av
import numpy as np
from PIL import Image


def ours(path: str, plan: dict):
    from runtime.media.frames import VideoParams
    from runtime.media.video import extract_frames
    extracted = extract_frames(path, VideoParams(**plan["params"]))
    s = extracted.stats
    return extracted.frames, {"frames_decoded": s.frames_decoded, "mode": s.mode, "seeks": s.seeks}


def _resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))


def vllm_pyav(path: str, plan: dict):
    fps, decoded, seeks = plan["fps"], 0, 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"
        stream.codec_context.thread_count = plan["threads"]
        time_base = stream.time_base
        duration = float(stream.duration * time_base) if stream.duration else 0.0
        max_ts = max(0.0, duration - 1.0 / fps) if duration > 0 else float("inf")
        frames, decoder, last_pts = [], None, None
        for idx in plan["indices"]:
            ts = min(idx / fps, max_ts)
            pts = int(ts / time_base)
            if decoder is None or last_pts is None or pts <= last_pts:
                container.seek(pts, stream=stream)
                decoder, seeks = container.decode(video=0), seeks + 1
            chosen = None
            for frame in decoder:
                decoded += 1
                if frame.pts is not None and frame.pts >= pts:
                    chosen, last_pts = frame, frame.pts
                    break
            if chosen is not None:
                frames.append(chosen.to_ndarray(format="rgb24"))
            else:
                decoder = None
        full = np.stack(frames)
    return ([_resize(f, plan["size"]) for f in full],
            {"frames_decoded": decoded, "mode": "seek+forward", "seeks": seeks})


def decode_all(path: str, plan: dict):
    wanted, frames, decoded = set(plan["indices"]), [], 0
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = plan["threads"]
        if plan["threads"] != 1:
            stream.codec_context.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            decoded += 1
            if i in wanted:
                frames.append(frame.to_ndarray(format="rgb24"))
    return ([_resize(f, plan["size"]) for f in frames],
            {"frames_decoded": decoded, "mode": "all", "seeks": 0})


def ffmpeg_unavailable() -> str | None:
    """Why the ffmpeg columns cannot run here, or None."""
    if shutil.which("ffmpeg") is None:
        return "ffmpeg is not installed (make bench installs Debian's ffmpeg with apt-get)"
    return None


def _ffmpeg(path: str, plan: dict, video_filter: str, passthrough: bool):
    h, w = plan["size"]
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin",
           "-threads", str(plan["threads"]), "-i", path, "-an", "-vf", f"{video_filter},scale={w}:{h}"]
    if passthrough:
        cmd += ["-fps_mode", "passthrough"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: {proc.stderr.decode(errors='replace')[-500:]}")
    out = np.frombuffer(proc.stdout, np.uint8).reshape(-1, h, w, 3)
    return list(out), {"frames_decoded": None, "mode": "subprocess", "seeks": 0}


def ffmpeg_select(path: str, plan: dict):
    terms = "+".join(f"eq(n\\,{i})" for i in plan["indices"])
    return _ffmpeg(path, plan, f"select='{terms}'", passthrough=True)


def ffmpeg_fps2(path: str, plan: dict):
    return _ffmpeg(path, plan, f"fps={plan['params'].get('fps', 2.0):g}", passthrough=False)


METHODS = {"ours": ours, "vllm_pyav": vllm_pyav, "ffmpeg_select": ffmpeg_select,
           "ffmpeg_fps2": ffmpeg_fps2, "decode_all": decode_all}
PEERS = ("vllm_pyav", "ffmpeg_select", "ffmpeg_fps2", "decode_all")
FFMPEG_METHODS = ("ffmpeg_select", "ffmpeg_fps2")
