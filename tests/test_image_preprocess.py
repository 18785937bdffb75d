"""Image preprocessing against transformers' `Qwen2VLImageProcessorPil` (the oracle), and the
refusal of bad input with MediaError."""
from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.api import MediaError
from runtime.media.image import (ImageParams, cap_longest_side, decode_image,
                                 normalize, patchify, preprocess_image, smart_resize)

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from transformers import Qwen2VLImageProcessorPil  # noqa: E402
from transformers.image_transforms import convert_to_rgb  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import \
    smart_resize as hf_smart_resize  # noqa: E402
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor  # noqa: E402

REAL_CONFIG = Path("/work/shared/reference/qwen3-vl-4b-instruct.preprocessor_config.json")


def processors(cfg: dict) -> tuple[Qwen2VLImageProcessorPil, ImageParams]:
    cfg = {k: v for k, v in cfg.items() if k not in ("image_processor_type", "processor_class")}
    params = ImageParams(patch_size=cfg["patch_size"], merge_size=cfg["merge_size"],
                         temporal_patch_size=cfg["temporal_patch_size"],
                         image_mean=tuple(cfg["image_mean"]), image_std=tuple(cfg["image_std"]),
                         min_pixels=cfg["size"]["shortest_edge"],
                         max_pixels=cfg["size"]["longest_edge"])
    return Qwen2VLImageProcessorPil(**cfg), params


def config_sources(seed_model_dir):
    yield "seed", json.loads((seed_model_dir / "preprocessor_config.json").read_text())
    if REAL_CONFIG.is_file():
        yield "qwen3-vl-4b", json.loads(REAL_CONFIG.read_text())


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    if fmt == "PNG":
        kw.setdefault("compress_level", 1)
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus noise, so resampling differences would show."""
    rng = np.random.default_rng(seed)
    x = (np.arange(w, dtype=np.float32) * (255 / max(w - 1, 1))).astype(np.uint8)
    y = (np.arange(h, dtype=np.float32) * (255 / max(h - 1, 1))).astype(np.uint8)
    arr = np.empty((h, w, 3), dtype=np.uint8)
    arr[..., 0], arr[..., 1] = x[None, :], y[:, None]
    arr[..., 2] = x[None, :] // 2 + y[:, None] // 2
    arr ^= rng.integers(0, 64, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr)


# (height, width): tiny, strips that need min_pixels, odd sizes, ones over the cap.
SIZES = [(1, 1), (3, 5), (1, 150), (150, 1), (7, 13), (31, 33), (64, 64), (224, 224),
         (333, 517), (480, 640), (720, 1024), (1024, 1024), (1000, 37), (2000, 1500), (600, 3000)]


def test_parity_with_transformers(seed_model_dir):
    for name, cfg in config_sources(seed_model_dir):
        hf, params = processors(cfg)
        for i, (h, w) in enumerate(SIZES):
            original = noise(h, w, seed=i)
            data = encode(original, "BMP")      # uncompressed: fast to write and read
            capped = cap_longest_side(original, params.max_side)
            expected = hf(images=[capped], return_tensors="np")
            got = preprocess_image(data, params)
            label = f"{name} {h}x{w}"
            assert got.grid_thw == tuple(expected["image_grid_thw"][0]), label
            assert got.pixel_values.dtype == np.float32, label
            assert got.pixel_values.shape == expected["pixel_values"].shape, label
            assert np.abs(got.pixel_values - expected["pixel_values"]).max() <= 1e-5, label
            assert got.source_size == (h, w)
            assert max(capped.size) <= params.max_side
            assert got.size[0] % params.factor == 0 and got.size[1] % params.factor == 0


def test_parity_jpeg_and_modes(seed_model_dir):
    """Decoding (palette, greyscale, alpha, CMYK, JPEG) matches transformers' convert_to_rgb."""
    _, cfg = next(config_sources(seed_model_dir))
    hf, params = processors(cfg)
    rgb = noise(90, 70, seed=3)
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray(np.tile(np.arange(70, dtype=np.uint8) * 3, (90, 1))))
    palette_t = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette_t.info["transparency"] = 0
    cases = {
        "jpeg": encode(rgb, "JPEG", quality=85),
        "png_rgba": encode(rgba),
        "png_la": encode(rgba.convert("LA")),
        "png_l": encode(rgb.convert("L")),
        "png_1bit": encode(rgb.convert("1")),
        "png_palette": encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)),
        "png_palette_transparency": encode(palette_t, transparency=0),
        "jpeg_cmyk": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "webp_rgba": encode(rgba, "WEBP", lossless=True),
        "gif": encode(palette_t, "GIF"),
        "bmp": encode(rgb, "BMP"),
        "tiff": encode(rgba, "TIFF"),
    }
    for name, data in cases.items():
        ours = np.asarray(decode_image(data, params))
        theirs = np.asarray(convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
        expected = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")
        got = preprocess_image(data, params)
        assert np.abs(got.pixel_values - expected["pixel_values"]).max() <= 1e-5, name
    # alpha really is composited on white: a fully transparent pixel becomes white
    clear = Image.new("RGBA", (40, 40), (10, 200, 30, 0))
    assert (np.asarray(decode_image(encode(clear), params)) == 255).all()


def test_smart_resize_matches_transformers():
    for h in (1, 2, 15, 16, 17, 31, 100, 255, 999, 1024, 4000):
        for w in (1, 3, 32, 33, 64, 150, 777, 1024, 2048):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(MediaError):
                    smart_resize(h, w, 32, 64 * 64, 512 * 512)
                continue
            for lo, hi in ((64 * 64, 512 * 512), (65536, 16777216)):
                assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi), (h, w)


def test_normalize_matches_transformers_arithmetic():
    hf = Qwen2VLImageProcessorPil()
    rng = np.random.default_rng(1)
    frame = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    expected = hf.normalize(hf.rescale(np.moveaxis(frame, -1, 0), 1 / 255), mean, std)
    got = normalize(frame, mean, std)
    assert got.dtype == np.float32 and got.shape == (3, 4, 5)
    np.testing.assert_array_equal(got, expected)
    video = rng.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    got = normalize(video, mean, std)
    assert got.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(got[1], normalize(video[1], mean, std))


@pytest.mark.parametrize("frames", [1, 2, 3, 4])
def test_patchify_matches_transformers_video_layout(frames):
    rng = np.random.default_rng(frames)
    x = rng.standard_normal((frames, 3, 64, 96)).astype(np.float32)
    got, grid = patchify(x, patch_size=16, temporal_patch_size=2, merge_size=2)
    ref, gt, gh, gw = Qwen3VLVideoProcessor.patchify(None, torch.from_numpy(x)[None], 16, 2, 2)
    assert grid == (gt, gh, gw) == ((frames + 1) // 2, 4, 6)
    np.testing.assert_array_equal(got, ref[0].numpy())
    if frames == 1:   # an image: the image processor's layout too
        hf_img, gh2, gw2 = Qwen2VLImageProcessorPil().patchify(x[0], 16, 2, 2)
        np.testing.assert_array_equal(got, hf_img)


def test_exif_orientation_is_applied():
    img = noise(20, 40)                           # 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6                              # rotate 90 degrees clockwise on display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_sixteen_bit_is_scaled_not_clipped():
    ramp = (np.arange(64, dtype=np.uint16) * 1040).reshape(8, 8)
    img = Image.fromarray(ramp)                   # mode I;16
    out = np.asarray(decode_image(encode(img)))
    assert out.shape == (8, 8, 3)
    np.testing.assert_array_equal(out[..., 0], np.round(ramp / 257).astype(np.uint8))


def test_cap_keeps_aspect_and_content_hash():
    data = encode(noise(600, 3000))
    got = preprocess_image(data, ImageParams(max_side=1024))
    assert got.source_size == (600, 3000)
    h, w = got.size
    assert abs(w / h - 5.0) < 0.5 and max(h, w) <= 1024
    assert cap_longest_side(noise(600, 3000), 1024).size == (1024, 205)
    import hashlib
    assert got.content_hash == hashlib.sha256(data).hexdigest()
    assert got.num_patches == got.pixel_values.shape[0] == np.prod(got.grid_thw)


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size, with a tiny IDAT."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


def test_bad_inputs_raise_media_error():
    good = encode(noise(64, 64))
    jpeg = encode(noise(64, 64), "JPEG")
    bad = {
        "empty": b"",
        "garbage": b"this is not an image at all" * 10,
        "html": b"<html><body>hi</body></html>",
        "truncated_png": good[: len(good) // 2],
        "truncated_jpeg": jpeg[: len(jpeg) // 3],
        "header_only_png": good[:40],
        "bomb_30000x30000": png_header_only(30000, 30000),
        "bomb_100000x1": png_header_only(200000, 1000),
        "extreme_aspect": encode(noise(1, 300)),
        "eps_not_allowed": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
        "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    }
    for name, data in bad.items():
        with pytest.raises(MediaError):
            preprocess_image(data, ImageParams())
    with pytest.raises(MediaError, match="too large"):
        decode_image(png_header_only(30000, 30000), ImageParams())
    # a small bomb limit refuses images a larger one admits
    with pytest.raises(MediaError, match="too large"):
        decode_image(good, ImageParams(max_input_pixels=64 * 63))
    assert decode_image(good, ImageParams(max_input_pixels=64 * 64)).size == (64, 64)
