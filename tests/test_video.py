"""Video preprocessing: frame selection, timestamps, pairing, resize and patch layout against
transformers' Qwen3-VL video processor, on real clips encoded here with PyAV."""
from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from runtime.api import MediaError
from runtime.media.frames import (VideoParams, pair_frames, pair_timestamps, plan_targets,
                                  video_smart_resize)
from runtime.media import video as video_module
from runtime.media.video import preprocess_video, scaler_for
from runtime.media.video_probe import snap_to_keyframes
from tests.media_fixtures import (corrupt_stream_clip, encode_clip, encode_frames, encoder_available,
                                  read_index, to_uint8, unpatchify, wav_bytes)

REFERENCE = Path("/work/shared/reference/qwen3-vl-4b-instruct.video_preprocessor_config.json")
NO_DEDUP = VideoParams(dedup_threshold=0)


@pytest.fixture(scope="module")
def hf():
    """transformers' Qwen3-VL video pieces (the oracle), imported once."""
    import torch
    torch.set_num_threads(1)
    import importlib
    # imported as modules: the lazy package attribute would demand torchvision
    proc = importlib.import_module("transformers.models.qwen3_vl.processing_qwen3_vl")
    vp = importlib.import_module("transformers.models.qwen3_vl.video_processing_qwen3_vl")
    from transformers.video_utils import VideoMetadata

    def sample_frames(total, fps, params=NO_DEDUP):
        self = SimpleNamespace(fps=params.fps, min_frames=params.min_frames,
                               max_frames=params.max_frames)
        return vp.Qwen3VLVideoProcessor.sample_frames(
            self, VideoMetadata(total_num_frames=total, fps=fps))

    def timestamps(indices, fps):
        return proc.Qwen3VLProcessor._calculate_timestamps(None, list(indices), fps, 2)

    def patchify(frames_uint8, mean=0.5, std=0.5):
        x = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).double() / 255
        x = ((x.float() - mean) / std)[None]
        out, *grid = vp.Qwen3VLVideoProcessor.patchify(None, x, 16, 2, 2)
        return out[0].numpy(), tuple(grid)

    return SimpleNamespace(sample_frames=sample_frames, timestamps=timestamps,
                           patchify=patchify, smart_resize=vp.smart_resize, torch=torch)


def frames_of(video) -> np.ndarray:
    """uint8 [T, H, W, 3] the encoder will see (pairs expanded)."""
    return to_uint8(unpatchify(video.pixel_values, video.grid_thw))


def indices_of(video) -> list[int]:
    return [read_index(f) for f in frames_of(video)[::2]]


# ---- selection, timestamps, tokens against transformers -------------------------------------

def test_long_gop_h264_selects_transformers_frames(hf):
    data = encode_clip(frames=100, fps=10, gop=100)               # one keyframe: seek mode
    video = preprocess_video(data, NO_DEDUP)
    indices = hf.sample_frames(100, 10.0)
    assert video.stats.mode == "seek"
    assert video.frame_times == pytest.approx([i / 10 for i in indices])
    assert video.timestamps == pytest.approx(hf.timestamps(indices, 10.0))
    h, w = hf.smart_resize(len(indices), 48, 64, temporal_factor=2, factor=32,
                           min_pixels=4096, max_pixels=25165824)
    assert video.grid_thw == (len(indices) // 2, h // 16, w // 16)
    assert video.num_tokens == len(indices) // 2 * (h // 16) * (w // 16) // 4
    assert video.pixel_values.shape == (video.num_patches, 3 * 2 * 16 * 16)
    # the pixels are the frames the times claim: frame k carries k in its pattern
    assert [read_index(f) for f in frames_of(video)] == list(indices)


def test_patch_layout_equals_transformers_patchify(hf):
    import av
    data = encode_clip(frames=40, fps=10, width=96, height=64)
    video = preprocess_video(data, NO_DEDUP)
    h, w = video.size
    # the same frames, decoded and converted here independently of runtime.media
    with av.open(io.BytesIO(data)) as container:
        decoded = {round(float(f.time), 6): f.to_ndarray(
                       width=w, height=h, format="rgb24",
                       interpolation=scaler_for(f.height, f.width, h, w))
                   for f in container.decode(video=0)}
    frames = np.stack([decoded[round(video.frame_times[i], 6)]
                       for pair in _pairs(video) for i in pair])
    theirs, grid = hf.patchify(frames)
    assert grid == video.grid_thw
    np.testing.assert_allclose(video.pixel_values, theirs, rtol=0, atol=1e-6)


def test_frames_match_exact_decoding_resized_as_transformers_does():
    """Each selected frame, converted straight to its final size by swscale (full-resolution
    chroma, accurate rounding), is within 45 dB PSNR of the same frame decoded in full, converted
    to full-size RGB and resized with bicubic like transformers (the bare AREA filter gives 43)."""
    import math
    import av
    from PIL import Image
    data = encode_clip(width=320, height=180, frames=20, fps=10,
                       options={"preset": "ultrafast", "crf": "18"})
    extracted = video_module.extract_frames(data, VideoParams(dedup_threshold=0, max_side=256))
    h, w = extracted.size
    assert (h, w) == (128, 256)
    with av.open(io.BytesIO(data)) as container:
        full = {round(float(f.time), 6): f.to_ndarray(format="rgb24")
                for f in container.decode(video=0)}
    for t, ours in zip(extracted.times, extracted.frames):
        ref = np.asarray(Image.fromarray(full[round(t, 6)]).resize((w, h), Image.Resampling.BICUBIC))
        mse = np.mean((ours.astype(np.float64) - ref) ** 2)
        assert 10 * math.log10(255 ** 2 / mse) >= 45.0, t


def test_short_gop_decodes_only_keyframes():
    data = encode_clip(frames=120, fps=10, gop=5)                  # keyframe every 0.5 s
    video = preprocess_video(data, NO_DEDUP)
    assert video.stats.mode == "keyframes"
    assert video.stats.keyframe_interval == pytest.approx(0.5)
    assert video.stats.frames_decoded <= 24 + 1                    # 24 keyframes in the clip
    assert all(abs(t * 2 - round(t * 2)) < 1e-6 for t in video.frame_times)   # on keyframes
    assert len(video.frame_times) >= 22
    assert indices_of(video) == [round(video.frame_times[a] * 10) for a, _ in _pairs(video)]


@pytest.mark.parametrize("fmt,codec", [("webm", "libvpx-vp9"), ("mp4", "libx265"),
                                       ("matroska", "libsvtav1"), ("matroska", "libaom-av1")])
def test_other_codecs(fmt, codec, hf):
    if not encoder_available(codec):
        pytest.skip(f"this PyAV build has no {codec} encoder")
    data = encode_clip(fmt=fmt, codec=codec, frames=40, fps=10, gop=40)
    video = preprocess_video(data, NO_DEDUP)
    indices = hf.sample_frames(40, 10.0)
    assert video.frame_times == pytest.approx([i / 10 for i in indices])
    assert video.timestamps == pytest.approx(hf.timestamps(indices, 10.0))
    assert indices_of(video) == list(indices[::2])


def test_mov_path_input_and_hash(tmp_path):
    path = tmp_path / "clip.mov"
    data = encode_clip(fmt="mov", frames=30, fps=10, path=str(path))
    from_path = preprocess_video(str(path), NO_DEDUP)
    from_bytes = preprocess_video(data, NO_DEDUP)
    assert from_path.content_hash == from_bytes.content_hash
    np.testing.assert_array_equal(from_path.pixel_values, from_bytes.pixel_values)
    other = preprocess_video(data, VideoParams(fps=1.0, dedup_threshold=0))
    assert other.content_hash != from_bytes.content_hash


def test_rotation_metadata_is_applied():
    data = encode_clip(fmt="mp4", frames=20, fps=10, width=96, height=64, rotation=90)
    video = preprocess_video(data, NO_DEDUP)
    assert video.stats.rotation == 90 and video.stats.source_size == (96, 64)
    h, w = video.size
    assert h > w                                                   # portrait after rotation
    frame = frames_of(video)[0].astype(int)
    # coded: bottom-left quarter white, bottom-right black; 90 degrees counter-clockwise
    # moves bottom-left to bottom-right and bottom-right to top-right
    assert frame[int(h * 0.9), int(w * 0.75)].mean() > 200
    assert frame[int(h * 0.1), int(w * 0.75)].mean() < 50


def test_variable_frame_rate_keeps_true_times_and_never_pairs_across_gaps():
    times = [0.0, 0.13, 0.41, 0.52, 0.9, 1.07, 1.33, 1.8, 2.0] + [6.0, 6.4, 6.9, 7.5, 8.0]
    data = encode_clip(fmt="matroska", fps=10, times=times)
    video = preprocess_video(data, NO_DEDUP)
    assert set(np.round(video.frame_times, 3)) <= set(times)
    # every selected frame is the source frame whose time it reports
    frames = frames_of(video)
    expanded = [video.frame_times[i] for pair in _pairs(video) for i in pair]
    assert [read_index(f) for f in frames] == [times.index(round(t, 3)) for t in expanded]
    # no temporal patch fuses the moments on both sides of the 4 s hole
    for a, b in _pairs(video):
        assert not (video.frame_times[a] <= 2.0 and video.frame_times[b] >= 6.0)
    assert len(video.timestamps) == video.grid_thw[0]


def test_keyframe_grid_does_not_drift_against_targets():
    # keyframes every 0.5 s, 120 targets every 0.5034 s: nearest-keyframe picking drifts by a
    # whole GOP over the clip (one keyframe skipped mid-clip, two targets on the last one)
    data = encode_clip(frames=600, fps=10, gop=5)
    video = preprocess_video(data, NO_DEDUP)
    assert video.stats.mode == "keyframes" and video.stats.frames_planned == 120
    assert video.stats.frames_decoded <= 120 + 1
    assert video.frame_times == pytest.approx([k / 2 for k in range(120)])    # every keyframe
    assert [read_index(f) for f in frames_of(video)] == [k * 5 % 256 for k in range(120)]
    assert video.grid_thw[0] == 60 and len(set(video.timestamps)) == 60


def test_snap_to_keyframes_is_the_best_order_preserving_assignment():
    import itertools
    rng = np.random.default_rng(7)
    for _ in range(40):
        keys = np.unique(np.round(rng.uniform(0, 10, rng.integers(3, 9)), 2))
        targets = np.sort(rng.uniform(0, 10, rng.integers(1, len(keys) + 2)))
        got = snap_to_keyframes(targets, keys.tolist())
        if len(keys) <= len(targets):
            np.testing.assert_array_equal(got, keys)
            continue
        assert len(got) == len(targets) and np.all(np.diff(got) > 0) and set(got) <= set(keys)
        best = min(np.abs(keys[list(c)] - targets).sum()
                   for c in itertools.combinations(range(len(keys)), len(targets)))
        assert np.abs(got - targets).sum() == pytest.approx(best)


B_FRAMES = {"preset": "veryfast",
            "x264-params": "keyint=120:min-keyint=120:scenecut=0:bframes=3:b-pyramid=normal"}
VFR_TIMES = [0.0] + sorted(set(np.round(np.cumsum(
    np.random.default_rng(3).uniform(0.03, 0.4, 80)), 3).tolist()))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("clip", ["cfr", "vfr"])
def test_skipping_nonreference_frames_never_changes_the_selection(clip, threads, monkeypatch,
                                                                   hf):
    data = (encode_clip(frames=120, fps=10, gop=120, options=B_FRAMES) if clip == "cfr" else
            encode_clip(fmt="matroska", fps=10, times=VFR_TIMES, options=B_FRAMES))
    params = VideoParams(dedup_threshold=0, decode_threads=threads)
    video = preprocess_video(data, params)
    total = 120 if clip == "cfr" else len(VFR_TIMES)
    assert video.stats.mode == "seek" and video.stats.frames_decoded < total   # B frames skipped
    monkeypatch.setattr(video_module._Selector, "_skippable", lambda self, t, seen: False)
    every = preprocess_video(data, params)
    assert every.stats.frames_decoded == total
    assert video.frame_times == every.frame_times
    np.testing.assert_array_equal(video.pixel_values, every.pixel_values)
    if clip == "cfr":
        indices = hf.sample_frames(120, 10.0)
        assert [read_index(f) for f in frames_of(video)] == list(indices)
    else:
        expanded = [video.frame_times[i] for pair in _pairs(video) for i in pair]
        assert [read_index(f) for f in frames_of(video)] == [
            VFR_TIMES.index(round(t, 3)) % 256 for t in expanded]


def _pairs(video):
    interval = (video.frame_times[-1] - video.frame_times[0]) / (video.stats.frames_planned - 1)
    return pair_frames(video.frame_times, interval, NO_DEDUP)


# ---- pairing and sizing rules -----------------------------------------------------------------

def test_pairing_duplicates_lone_frames():
    params = VideoParams()
    times = [0.0, 0.5, 1.0, 1.5, 4.0, 4.5, 9.0]
    pairs = pair_frames(times, 0.5, params)
    assert pairs == [(0, 1), (2, 3), (4, 5), (6, 6)]
    assert pair_frames([0.0, 0.5, 3.0, 3.5, 4.0], 0.5, params) == [(0, 1), (2, 3), (4, 4)]
    assert pair_frames([0.0, 2.0, 2.5], 0.5, params) == [(0, 0), (1, 2)]
    assert pair_timestamps(times, pairs) == [0.25, 1.25, 4.25, 9.0]


def test_video_smart_resize_matches_transformers(hf):
    params = VideoParams.from_file(REFERENCE)
    for frames, h, w in [(2, 48, 64), (7, 480, 640), (120, 720, 1280), (768, 1080, 1920),
                         (4, 17, 1000), (3, 4320, 7680), (1000, 2160, 3840)]:
        expect = hf.smart_resize(max(frames, 2), h, w, temporal_factor=2, factor=32,
                                 min_pixels=params.min_pixels, max_pixels=params.max_pixels)
        assert video_smart_resize(frames, h, w, params) == expect, (frames, h, w)


def test_params_from_reference_config():
    params = VideoParams.from_file(REFERENCE)
    assert (params.patch_size, params.temporal_patch_size, params.merge_size) == (16, 2, 2)
    assert (params.min_pixels, params.max_pixels) == (4096, 25165824)
    assert (params.fps, params.min_frames, params.max_frames) == (2.0, 4, 768)
    assert VideoParams.from_config({"fps": 30}).fps == 2.0
    with pytest.raises(ValueError):
        VideoParams(fps=5)


def test_plan_targets_follow_sample_frames(hf):
    for total, fps in [(100, 10.0), (1800, 30.0), (7, 25.0), (1, 30.0), (100000, 24.0)]:
        indices = hf.sample_frames(total, fps)
        assert plan_targets(total, fps, NO_DEDUP) == pytest.approx(indices / fps)


# ---- odd inputs that still work -----------------------------------------------------------------

def test_ten_hour_clip_is_capped_without_full_decode():
    times = [i * 10.0 for i in range(3600)]                       # 10 h, a frame every 10 s
    data = encode_clip(fmt="matroska", times=times, gop=6, width=64, height=48,
                       options={"preset": "ultrafast", "tune": "zerolatency",
                                "x264-params": "keyint=6:min-keyint=6:scenecut=0"})
    params = VideoParams(max_frames=16, dedup_threshold=0)
    video = preprocess_video(data, params)
    assert video.stats.duration > 9.9 * 3600
    assert len(video.frame_times) == 16 and video.grid_thw[0] == 8
    assert video.stats.frames_decoded < 200                       # of 3600
    assert video.stats.seeks >= 10
    assert video.frame_times[-1] > 9.9 * 3600


def test_8k_is_downscaled():
    data = encode_clip(frames=2, fps=10, width=7680, height=4320)
    video = preprocess_video(data, NO_DEDUP)
    h, w = video.size
    assert max(h, w) <= 1024 and (h, w) == video_smart_resize(2, 576, 1024, NO_DEDUP)
    assert video.stats.source_size == (4320, 7680)


def test_odd_size_and_single_frame():
    video = preprocess_video(encode_clip(frames=1, fps=10, width=75, height=33,
                                         pix_fmt="yuv444p"), NO_DEDUP)
    assert video.grid_thw[0] == 1 and video.frame_times == [0.0] and video.timestamps == [0.0]
    frames = frames_of(video)
    np.testing.assert_array_equal(frames[0], frames[1])           # the frame, duplicated
    assert video.size[0] % 32 == 0 and video.size[1] % 32 == 0


def test_static_scene_drops_near_duplicates():
    data = encode_clip(frames=200, fps=10, static=True)           # 20 s of one picture
    video = preprocess_video(data, VideoParams(dedup_threshold=4.0, dedup_keep_every_s=8.0))
    assert video.stats.frames_planned == 40
    assert len(video.frame_times) <= 4 and video.stats.duplicates_dropped >= 36
    moving = preprocess_video(encode_clip(frames=200, fps=10), VideoParams(dedup_threshold=4.0))
    assert len(moving.frame_times) == 40                          # real motion is kept


def test_a_small_colour_change_is_not_a_duplicate():
    """A small red square turning a blue of about the same luminance, in an otherwise static
    clip: every frame after the change is a real change (the grey mean of the frame barely moves)."""
    frames = []
    for i in range(8):
        a = np.full((96, 96, 3), 128, np.uint8)
        a[40:56, 40:56] = (220, 30, 30) if i < 4 else (30, 60, 220)
        frames.append(a)
    video = preprocess_video(encode_frames(frames, fps=2), VideoParams(dedup_threshold=4.0))
    # the three repeats before and after the change are dropped; the change itself is kept
    assert 2.0 in video.frame_times and 0.0 in video.frame_times
    assert video.stats.duplicates_dropped == 6


def test_thumbnails_are_small_jpegs():
    from PIL import Image
    video = preprocess_video(encode_clip(frames=40, fps=10, width=320, height=240), NO_DEDUP)
    assert len(video.thumbnails) == video.grid_thw[0]
    for t, jpeg in video.thumbnails:
        img = Image.open(io.BytesIO(jpeg))
        assert img.format == "JPEG" and max(img.size) <= 160
    assert [t for t, _ in video.thumbnails] == [video.frame_times[a] for a, _ in _pairs(video)]


# ---- bad inputs ---------------------------------------------------------------------------------

def _png() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("name,data,message", [
    ("zero bytes", b"", "empty"),
    ("text", b"just some text, certainly not a video\n" * 40, "not a readable"),
    ("random", np.random.default_rng(1).bytes(20000), "not a readable"),
    ("png", None, "image"),
    ("jpeg", None, "image"),
    ("wav", None, "no video stream"),
    ("corrupt stream", None, "corrupt"),
])
def test_bad_inputs_raise_media_error(name, data, message):
    data = {"png": _png, "jpeg": _jpeg, "wav": wav_bytes,
            "corrupt stream": corrupt_stream_clip}.get(name, lambda: data)()
    with pytest.raises(MediaError, match=message):
        preprocess_video(data, NO_DEDUP)


def test_truncated_files_raise_media_error(tmp_path):
    data = encode_clip(frames=60, fps=10)                          # index (moov) at the end
    with pytest.raises(MediaError):
        preprocess_video(data[: len(data) // 2], NO_DEDUP)
    fast = encode_clip(frames=60, fps=10, path=str(tmp_path / "f.mp4"),
                       container_options={"movflags": "faststart"})
    with pytest.raises(MediaError, match="truncated"):
        preprocess_video(fast[: len(fast) * 2 // 5], NO_DEDUP)
    webm = encode_clip(fmt="webm", codec="libvpx-vp9", frames=60, fps=10)
    with pytest.raises(MediaError, match="truncated"):
        preprocess_video(webm[: len(webm) * 2 // 5], NO_DEDUP)


def test_too_long_and_missing_file():
    data = encode_clip(frames=30, fps=10)
    with pytest.raises(MediaError, match="too long"):
        preprocess_video(data, VideoParams(max_duration_s=2.0))
    with pytest.raises(MediaError, match="not found"):
        preprocess_video("/nonexistent/clip.mp4", NO_DEDUP)


def test_a_sparse_long_video_never_fuses_frames_across_a_long_gap():
    """Three frames in ten hours: each is its own pair at its own time; none is dropped."""
    clip = encode_clip(times=[0.0, 18000.0, 36000.0], fps=10)
    video = preprocess_video(clip, VideoParams())
    assert video.frame_times == [0.0, 18000.0, 36000.0]
    assert video.timestamps == [0.0, 18000.0, 36000.0]
    assert video.grid_thw[0] == 3
    frames = to_uint8(unpatchify(video.pixel_values, video.grid_thw))
    assert [read_index(f) for f in frames[::2]] == [0, 1, 2]
