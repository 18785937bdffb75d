"""The exported vision partitions, run through VisionEncoder on the ONNX Runtime CPU EP, against
Hugging Face's `Qwen3VLVisionModel` on the seed checkpoint; the numpy graph inputs against HF's own
helpers; the output cache. fp32 tolerance: 1e-4 absolute (measured ~3e-7)."""
from __future__ import annotations

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from exporter.vision import VisionExportError, export_vision
from runtime.manifest import (DEEPSTACK_EMBEDS, HIDDEN, IMAGE_EMBEDS, PIXEL_VALUES, POS_IDX,
                              POS_WEIGHT, ROT_COS, ROT_SIN, SEGMENT_IDS, tap_name)
from runtime.vision import VisionCache, VisionEncoder, VisionInputError, content_key, vision_inputs

ATOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(seed_model_dir):
    from transformers import Qwen3VLForConditionalGeneration
    torch.set_num_threads(1)
    return Qwen3VLForConditionalGeneration.from_pretrained(seed_model_dir).eval()


@pytest.fixture(scope="module")
def vcfg(hf_model):
    return hf_model.model.visual.config


def encoder_kwargs(vcfg) -> dict:
    return dict(merge_size=vcfg.spatial_merge_size,
                num_position_embeddings=vcfg.num_position_embeddings,
                head_dim=vcfg.hidden_size // vcfg.num_heads,
                rope_theta=float(vcfg.rope_parameters["rope_theta"]),
                deepstack_count=len(vcfg.deepstack_visual_indexes))


def sessions(out_dir, parts):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return [ort.InferenceSession(str(out_dir / parts[k].file), opts,
                                 providers=["CPUExecutionProvider"])
            for k in ("vision_cpu", "vision_gpu")]


@pytest.fixture(scope="module", params=[0, 2, "depth"], ids=lambda k: f"cut{k}")
def exported(request, hf_model, vcfg, tmp_path_factory):
    cut = vcfg.depth if request.param == "depth" else request.param
    out = tmp_path_factory.mktemp(f"vision-cut{cut}")
    parts = export_vision(hf_model, out, cut)
    cpu, gpu = sessions(out, parts)
    return cut, out, parts, VisionEncoder(cpu, gpu, **encoder_kwargs(vcfg))


def pixels(grid, seed, patch_dim=3 * 2 * 16 * 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((int(np.prod(grid)), patch_dim)).astype(np.float32)


def hf_encode(hf_model, pixel_values: np.ndarray, grids) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = hf_model.model.visual(torch.from_numpy(pixel_values), torch.tensor(grids))
    return out.pooler_output.numpy(), torch.stack(list(out.deepstack_features)).numpy()


def assert_close(got: tuple, want: tuple, atol=ATOL) -> None:
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=0, atol=atol)


# --- graph inputs against HF's helpers -----------------------------------------------------------

@pytest.mark.parametrize("grid", [(1, 8, 12), (3, 4, 6), (2, 30, 18), (1, 2, 2), (1, 64, 2)])
def test_vision_inputs_match_hf_helpers(grid, vcfg):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionRotaryEmbedding
    from transformers.vision_utils import (get_vision_cu_seqlens,
                                           get_vision_interpolation_indices_and_weights,
                                           get_vision_position_ids)
    got = vision_inputs(grid, **{k: v for k, v in encoder_kwargs(vcfg).items()
                                 if k != "deepstack_count"})
    n = int(np.prod(grid))
    g = torch.tensor([grid])
    idx, weight = get_vision_interpolation_indices_and_weights(
        g, int(vcfg.num_position_embeddings ** 0.5), mode="bilinear", align_corners=True,
        spatial_merge_size=vcfg.spatial_merge_size)
    assert got[POS_IDX].dtype == np.int64 and got[POS_IDX].shape == (4, n)
    np.testing.assert_array_equal(got[POS_IDX], idx.T.numpy())
    np.testing.assert_allclose(got[POS_WEIGHT], weight.T.numpy(), rtol=0, atol=1e-6)
    cos, sin = Qwen3VLVisionRotaryEmbedding(vcfg)(torch.zeros(1), get_vision_position_ids(g, 2))
    assert got[ROT_COS].shape == (n, vcfg.hidden_size // vcfg.num_heads)
    np.testing.assert_allclose(got[ROT_COS], cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[ROT_SIN], sin.numpy(), rtol=0, atol=1e-6)
    bounds = np.flatnonzero(np.diff(got[SEGMENT_IDS])) + 1
    np.testing.assert_array_equal(np.r_[0, bounds, n], get_vision_cu_seqlens(g).numpy())


def test_vision_inputs_reject_bad_grids():
    kw = dict(merge_size=2, num_position_embeddings=64, head_dim=16)
    for bad in [(1, 3, 4), (0, 2, 2), (1, 2), "abc"]:
        with pytest.raises(VisionInputError):
            vision_inputs(bad, **kw)


# --- exported partitions against HF ----------------------------------------------------------------

def test_partition_io(exported, vcfg):
    cut, out, parts, _ = exported
    taps = [tap_name(i) for i in vcfg.deepstack_visual_indexes if i < cut]
    grid_in = [ROT_COS, ROT_SIN, SEGMENT_IDS]
    cpu, gpu = parts["vision_cpu"], parts["vision_gpu"]
    assert (cpu.device, gpu.device) == ("cpu", "cuda")
    assert [t.name for t in cpu.inputs] == [PIXEL_VALUES, POS_IDX, POS_WEIGHT] + (grid_in if cut else [])
    assert [t.name for t in cpu.outputs] == [HIDDEN] + taps
    assert [t.name for t in gpu.inputs] == [HIDDEN] + (grid_in if cut < vcfg.depth else []) + taps
    assert [t.name for t in gpu.outputs] == [IMAGE_EMBEDS, DEEPSTACK_EMBEDS]
    assert gpu.outputs[1].shape == [len(vcfg.deepstack_visual_indexes), "N/4", vcfg.out_hidden_size]
    assert cpu.inputs[0].shape == ["N", 3 * 2 * 16 * 16] and cpu.inputs[0].dtype == "float32"
    for p in parts.values():
        assert onnx.load(str(out / p.file), load_external_data=False).ir_version == 13


def test_one_image(exported, hf_model):
    *_, enc = exported
    px = pixels((1, 8, 12), seed=1)
    assert_close(enc.encode(px, (1, 8, 12)), hf_encode(hf_model, px, [(1, 8, 12)]))


def test_two_images_one_at_a_time_equal_hf_batch(exported, hf_model):
    *_, enc = exported
    grids = [(1, 8, 12), (1, 6, 4)]
    pxs = [pixels(g, seed=2 + i) for i, g in enumerate(grids)]
    outs = [enc.encode(p, g) for p, g in zip(pxs, grids)]
    got = (np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs], axis=1))
    assert_close(got, hf_encode(hf_model, np.concatenate(pxs), grids))


def test_video_whole_and_frame_by_frame(exported, hf_model, vcfg):
    *_, enc = exported
    grid = (3, 4, 6)
    px = pixels(grid, seed=5)
    want = hf_encode(hf_model, px, [grid])
    assert_close(enc.encode(px, grid), want)
    per_frame = VisionEncoder(enc.cpu, enc.gpu, **encoder_kwargs(vcfg), max_patches_per_run=24)
    assert_close(per_frame.encode(px, grid), want)


def test_encoder_rejects_mismatched_pixels(exported):
    *_, enc = exported
    with pytest.raises(VisionInputError):
        enc.encode(pixels((1, 4, 4), seed=0), (1, 4, 6))


def test_export_rejects_bad_cut_and_dtype(hf_model, vcfg, tmp_path):
    with pytest.raises(VisionExportError):
        export_vision(hf_model, tmp_path, vcfg.depth + 1)
    with pytest.raises(VisionExportError):
        export_vision(hf_model, tmp_path, 1, dtype="bfloat16")


def test_float16_export_loads_and_runs(hf_model, vcfg, tmp_path):
    parts = export_vision(hf_model, tmp_path, 2, dtype="float16")
    assert parts["vision_cpu"].inputs[0].dtype == "float16"
    assert parts["vision_gpu"].outputs[0].dtype == "float16"
    enc = VisionEncoder(*sessions(tmp_path, parts), **encoder_kwargs(vcfg))
    grid = (2, 4, 6)
    px = pixels(grid, seed=7)
    embeds, deepstack = enc.encode(px, grid)
    want = hf_encode(hf_model, px, [grid])
    assert embeds.dtype == np.float16 and embeds.shape == want[0].shape
    assert deepstack.shape == want[1].shape
    assert np.isfinite(embeds).all() and np.isfinite(deepstack).all()
    assert_close((embeds.astype(np.float32), deepstack.astype(np.float32)), want, atol=5e-3)
    assert hf_model.model.visual.blocks[0].attn.qkv.weight.dtype == torch.float32   # untouched


def test_large_weights_go_to_external_data(hf_model, vcfg, tmp_path, monkeypatch):
    import exporter.vision as ev
    monkeypatch.setattr(ev, "EXTERNAL_DATA_BYTES", 0)       # treat every graph as large
    parts = export_vision(hf_model, tmp_path, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "vision_cpu.onnx", "vision_cpu.onnx.data", "vision_gpu.onnx", "vision_gpu.onnx.data"]
    assert (tmp_path / "vision_gpu.onnx").stat().st_size < (tmp_path / "vision_gpu.onnx.data").stat().st_size
    enc = VisionEncoder(*sessions(tmp_path, parts), **encoder_kwargs(vcfg))
    px = pixels((1, 4, 6), seed=11)
    assert_close(enc.encode(px, (1, 4, 6)), hf_encode(hf_model, px, [(1, 4, 6)]))


@pytest.mark.slow
def test_dynamo_exporter_matches_hf(hf_model, vcfg, tmp_path):
    parts = export_vision(hf_model, tmp_path, 2, exporter="dynamo")
    enc = VisionEncoder(*sessions(tmp_path, parts), **encoder_kwargs(vcfg))
    px = pixels((3, 4, 6), seed=9)
    assert_close(enc.encode(px, (3, 4, 6)), hf_encode(hf_model, px, [(3, 4, 6)]))


# --- cache -------------------------------------------------------------------------------------------

def arr(n_bytes: int, fill=0) -> np.ndarray:
    return np.full(n_bytes // 4, fill, dtype=np.float32)


def test_cache_lru_by_bytes():
    cache = VisionCache(capacity_bytes=100)
    assert cache.put("a", (arr(40), arr(8))) and cache.put("b", arr(40))
    assert cache.total_bytes == 88
    assert cache.get("a")[0].shape == (10,)          # a is now most recent
    assert cache.put("c", arr(40))                   # 128 > 100: evicts b, the least recent
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.get("b") is None
    assert cache.stats() == {"entries": 2, "bytes": 88, "capacity_bytes": 100, "hits": 1,
                             "misses": 1, "evictions": 1}
    assert not cache.put("huge", arr(104))           # larger than the whole cache
    assert "huge" not in cache and cache.total_bytes == 88
    assert cache.put("a", arr(20)) and cache.total_bytes == 60     # refresh replaces the size
    with pytest.raises(ValueError):
        cache.get("a")[0] = 1.0                      # stored arrays are read-only


def test_cache_thread_safety():
    cache = VisionCache(capacity_bytes=4000)

    def worker(w):
        for i in range(300):
            key = f"{w}-{i % 37}"
            if cache.get(key) is None:
                cache.put(key, arr(4 * (1 + i % 13)))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = cache.stats()
    assert s["hits"] + s["misses"] == 1200
    assert s["bytes"] <= 4000
    assert s["bytes"] == sum(cache.get(k).nbytes for k in list(cache._entries))


def test_content_key_depends_on_content_and_grid():
    px = pixels((1, 2, 2), seed=0)
    assert content_key(px, (1, 2, 2)) == content_key(px.copy(), (1, 2, 2))
    assert content_key(px, (1, 2, 2)) != content_key(px, (1, 2, 2), "other-engine")
    other = px.copy()
    other[0, 0] += 1
    assert content_key(px, (1, 2, 2)) != content_key(other, (1, 2, 2))
    assert content_key(px.reshape(2, -1), (1, 2, 1)) != content_key(px, (1, 2, 2))
