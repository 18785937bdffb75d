"""Image preprocessing for Qwen3-VL in numpy + Pillow, numerically identical to transformers'
`Qwen2VLImageProcessorPil` (the processor Qwen3-VL uses for images).

Pipeline (`preprocess_image`): decode (EXIF orientation, RGB like transformers' `convert_to_rgb`)
-> server cap (longest side <= `max_side`, BICUBIC, aspect kept) -> `smart_resize` to multiples of
patch*merge -> PIL BICUBIC resize -> `normalize` (x/255 in float64, cast to float32, then
(x - mean) / std in float32: transformers' exact arithmetic order) -> `patchify`.

`smart_resize`, `normalize` and `patchify` are shared with the video path. Patch order is the
invariant of `runtime/vision/inputs.py`: frame groups t-major, then merge blocks in raster order,
then the merge x merge patches of a block in raster order; each row is (C, Tp, P, P) flattened.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from runtime.api import MediaError

# Qwen3-VL defaults (preprocessor_config.json of Qwen3-VL-4B-Instruct).
QWEN3_VL_MIN_PIXELS = 65536
QWEN3_VL_MAX_PIXELS = 16777216
MAX_ASPECT_RATIO = 200
# Raster formats a client may send. Others Pillow knows (EPS runs Ghostscript, WMF, PSD, FITS,
# ...) are refused: less attack surface for untrusted uploads.
ALLOWED_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "QOI", "PPM", "TGA")


@dataclasses.dataclass(frozen=True)
class ImageParams:
    """How an engine wants images prepared (from the manifest's `preprocessing`)."""
    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    min_pixels: int = QWEN3_VL_MIN_PIXELS
    max_pixels: int = QWEN3_VL_MAX_PIXELS
    max_side: int = 1024                     # server cap on the longest side, before smart_resize
    max_input_pixels: int = 8192 * 8192      # refuse larger files from their header (bomb guard;
                                             # under PIL's warning level of ~89M pixels)

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @staticmethod
    def from_preprocessing(pre, max_side: int = 1024,
                           max_input_pixels: int = 8192 * 8192) -> "ImageParams":
        """Build from a `runtime.manifest.Preprocessing`."""
        return ImageParams(patch_size=pre.patch_size, merge_size=pre.merge_size,
                           temporal_patch_size=pre.temporal_patch_size,
                           image_mean=tuple(pre.image_mean), image_std=tuple(pre.image_std),
                           min_pixels=pre.min_pixels, max_pixels=pre.max_pixels,
                           max_side=max_side, max_input_pixels=max_input_pixels)


@dataclasses.dataclass(frozen=True)
class ImageInput:
    """One preprocessed image, ready for the vision encoder."""
    pixel_values: np.ndarray             # float32 [t*h*w, 3 * temporal * patch * patch]
    grid_thw: tuple[int, int, int]       # (1, h, w) in patches
    content_hash: str                    # sha256 hex of the encoded bytes (vision cache key)
    size: tuple[int, int]                # (height, width) fed to the encoder, after smart_resize
    source_size: tuple[int, int]         # (height, width) as decoded, after EXIF orientation

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w


def smart_resize(height: int, width: int, factor: int = 32,
                 min_pixels: int = QWEN3_VL_MIN_PIXELS,
                 max_pixels: int = QWEN3_VL_MAX_PIXELS) -> tuple[int, int]:
    """transformers' qwen2_vl `smart_resize`: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible. Raises MediaError for
    empty sizes or an aspect ratio above 200 (transformers raises ValueError there)."""
    if height < 1 or width < 1:
        raise MediaError(f"image has an empty size {width}x{height}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"image aspect ratio must be at most {MAX_ASPECT_RATIO}:1, got "
                         f"{width}x{height}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalize(rgb_uint8: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [H, W, 3] or [T, H, W, 3] -> float32 [3, H, W] or [T, 3, H, W].

    Same arithmetic as transformers' `rescale` then `normalize`: x * (1/255) in float64, cast to
    float32, then (x - mean) / std with float32 mean/std. A uint8 input has 256 values per
    channel, so the result is computed once per value into a table and gathered (bit-identical)."""
    if rgb_uint8.ndim not in (3, 4) or rgb_uint8.shape[-1] != 3:
        raise ValueError(f"expected [H, W, 3] or [T, H, W, 3], got shape {rgb_uint8.shape}")
    if rgb_uint8.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {rgb_uint8.dtype}")
    lut = _normalize_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    channels_first = np.moveaxis(rgb_uint8, -1, -3)
    out = np.empty(channels_first.shape, dtype=np.float32)
    for c in range(3):
        np.take(lut[c], channels_first[..., c, :, :], out=out[..., c, :, :])
    return out


@functools.lru_cache(maxsize=16)
def _normalize_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """float32 [3, 256]: transformers' rescale + normalize of every uint8 value, per channel."""
    values = (np.arange(256, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    table = (values[None, :] - np.asarray(mean, dtype=np.float32)[:, None]) \
        / np.asarray(std, dtype=np.float32)[:, None]
    table.setflags(write=False)
    return table


def patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int,
             merge_size: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 [T, C, H, W] -> (pixel_values [gt*gh*gw, C*Tp*P*P], (gt, gh, gw)).

    T is padded to a multiple of `temporal_patch_size` by repeating the last frame (an image is
    one frame, so it is repeated Tp times), as transformers does."""
    if frames.ndim != 4:
        raise ValueError(f"expected frames [T, C, H, W], got shape {frames.shape}")
    t, c, h, w = frames.shape
    factor = patch_size * merge_size
    if t < 1 or h % factor or w % factor:
        raise ValueError(f"frames {frames.shape} must have T >= 1 and H, W multiples of {factor}")
    if pad := -t % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)], axis=0)
        t += pad
    gt, gh, gw = t // temporal_patch_size, h // patch_size, w // patch_size
    x = frames.reshape(gt, temporal_patch_size, c, gh // merge_size, merge_size, patch_size,
                       gw // merge_size, merge_size, patch_size)
    # -> (gt, gh/m, gw/m, m, m, C, Tp, P, P), the order of Qwen3VLVideoProcessor.patchify
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    pixel_values = np.ascontiguousarray(
        x.reshape(gt * gh * gw, c * temporal_patch_size * patch_size * patch_size),
        dtype=np.float32)
    return pixel_values, (gt, gh, gw)


def to_rgb(img: Image.Image) -> Image.Image:
    """transformers' `convert_to_rgb` for PIL images: anything with alpha (an A band or palette
    transparency) is composited on white; everything else goes through `convert("RGB")`.
    16-bit greyscale is first scaled to 8 bits (Pillow's own conversion would clip it to white;
    transformers does that, we deliberately do not)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.int64)
        scale = 257.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(np.round(arr / scale), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.size and 0.0 <= arr.min() and arr.max() <= 1.0 else 255.0
        img = Image.fromarray(np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(data: bytes, params: ImageParams = ImageParams()) -> Image.Image:
    """Encoded bytes -> RGB PIL image, upright per EXIF. Raises MediaError for empty, corrupt,
    truncated, unsupported or oversized input; the size is checked from the header before any
    pixel is decoded, so a decompression bomb costs nothing."""
    if not data:
        raise MediaError("image is empty (0 bytes)")
    try:
        # Image.open reads the header only (and itself refuses > 2 * Image.MAX_IMAGE_PIXELS).
        img = Image.open(io.BytesIO(data), formats=_allowed_formats())
        width, height = img.size
        if width < 1 or height < 1:
            raise MediaError(f"image has an empty size {width}x{height}")
        if width * height > params.max_input_pixels:
            raise MediaError(f"image is too large: {width}x{height} pixels, at most "
                             f"{params.max_input_pixels} pixels are accepted")
        img.load()                                   # first frame of animated formats
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except MediaError:
        raise
    except UnidentifiedImageError as e:
        raise MediaError(f"unsupported or unrecognised image format (accepted: "
                         f"{', '.join(_allowed_formats())})") from e
    except Image.DecompressionBombError as e:
        raise MediaError(f"image is too large ({e})") from e
    except MemoryError as e:
        raise MediaError("image is too large to decode") from e
    except Exception as e:  # noqa: BLE001  decoders of untrusted bytes raise all sorts
        raise MediaError(f"image is corrupt or truncated ({type(e).__name__}: {e})") from e


def _allowed_formats() -> list[str]:
    Image.init()
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def cap_side(height: int, width: int, max_side: int) -> tuple[int, int]:
    """(height, width) shrunk (never enlarged) so the longest side is at most `max_side`, aspect
    kept, rounded. The one longest-side rule, for images and video frames alike."""
    if max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return (max(1, min(max_side, round(height * scale))),
            max(1, min(max_side, round(width * scale))))


def cap_longest_side(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink (never enlarge) so the longest side is at most `max_side`, aspect kept, BICUBIC."""
    h, w = cap_side(img.height, img.width, max_side)
    return img if (w, h) == img.size else img.resize((w, h), resample=Image.Resampling.BICUBIC)


def preprocess_rgb(img: Image.Image, params: ImageParams) -> tuple[np.ndarray, tuple[int, int, int],
                                                                    tuple[int, int]]:
    """An RGB image already under the cap -> (pixel_values, grid_thw, (height, width) resized).
    Exactly `Qwen2VLImageProcessorPil` on this image."""
    h, w = smart_resize(img.height, img.width, params.factor, params.min_pixels, params.max_pixels)
    resized = img.resize((w, h), resample=Image.Resampling.BICUBIC)
    chw = normalize(np.asarray(resized, dtype=np.uint8), params.image_mean, params.image_std)
    pixel_values, grid = patchify(chw[None], params.patch_size, params.temporal_patch_size,
                                  params.merge_size)
    return pixel_values, grid, (h, w)


def preprocess_image(data: bytes, params: ImageParams = ImageParams()) -> ImageInput:
    """Encoded image bytes -> ImageInput. Raises MediaError for anything it cannot take."""
    img = decode_image(data, params)
    source_size = (img.height, img.width)
    img = cap_longest_side(img, params.max_side)
    pixel_values, grid, size = preprocess_rgb(img, params)
    return ImageInput(pixel_values=pixel_values, grid_thw=grid,
                      content_hash=hashlib.sha256(data).hexdigest(), size=size,
                      source_size=source_size)
