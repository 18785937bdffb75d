"""Turn parsed `MediaRef`s into engine parts, off the event loop.

data: URLs are base64-decoded in the executor; images get a header-only size check (no pixel
decoding: the engine decodes) against limits.max_image_pixels; `upload://<id>` videos are passed
to the engine as a path, images are read in the executor; http(s) URLs (only when
media.allow_remote_urls) are fetched with a size cap and a timeout.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import Executor

import aiohttp
from PIL import Image, UnidentifiedImageError

from runtime.api import ChatMessage, ImagePart, MediaError, PayloadTooLarge, TextPart, VideoPart
from runtime.config import AppConfig
from runtime.server.openai_format import ChatParams, MediaRef
from runtime.server.uploads import SCHEME, UploadStore


def decode_data_url(url: str, where: str) -> bytes:
    """`data:[<mime>][;base64],<payload>` -> bytes. Runs in the executor (big strings)."""
    head, sep, payload = url.partition(",")
    if not sep or not head.lower().startswith("data:"):
        raise MediaError(f"{where}: malformed data URL")
    if not head.lower().endswith(";base64"):
        raise MediaError(f"{where}: data URLs must be base64-encoded")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: invalid base64 in data URL") from None
    if not data:
        raise MediaError(f"{where}: empty data URL")
    return data


def check_image(data: bytes, max_pixels: int, where: str) -> None:
    """Read only the image header: refuse unknown formats and decompression bombs early."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise MediaError(f"{where}: not a supported image (PNG, JPEG, WebP, GIF, BMP)") from None
    if w * h > max_pixels:
        raise MediaError(f"{where}: image is {w}x{h} = {w * h} pixels; at most "
                         f"{max_pixels} are accepted (limits.max_image_pixels)")


def _load_data_image(url: str, max_pixels: int, where: str) -> bytes:
    data = decode_data_url(url, where)
    check_image(data, max_pixels, where)
    return data


def _read_image_file(path: str, max_pixels: int, where: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    check_image(data, max_pixels, where)
    return data


async def fetch_remote(url: str, cap: int, timeout: float, where: str) -> bytes:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                if r.status != 200:
                    raise MediaError(f"{where}: fetching the URL gave HTTP {r.status}")
                buf = bytearray()
                async for chunk in r.content.iter_chunked(1 << 16):
                    buf += chunk
                    if len(buf) > cap:
                        raise PayloadTooLarge(f"{where}: remote file exceeds {cap} bytes")
                return bytes(buf)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        raise MediaError(f"{where}: could not fetch the URL ({type(e).__name__})") from None


async def resolve_ref(ref: MediaRef, cfg: AppConfig, uploads: UploadStore,
                      executor: Executor) -> ImagePart | VideoPart:
    loop = asyncio.get_running_loop()
    max_px = cfg.limits.max_image_pixels
    if ref.url.startswith(SCHEME):
        up = uploads.resolve(ref.url)
        if ref.kind == "video":
            return VideoPart(path=str(up.path))
        return ImagePart(await loop.run_in_executor(executor, _read_image_file, str(up.path),
                                                    max_px, ref.where))
    if ref.url[:5].lower() == "data:":
        if ref.kind == "video":
            return VideoPart(data=await loop.run_in_executor(executor, decode_data_url, ref.url, ref.where))
        return ImagePart(await loop.run_in_executor(executor, _load_data_image, ref.url, max_px, ref.where))
    # http(s): the parser already refused it unless media.allow_remote_urls
    cap = cfg.limits.max_upload_bytes if ref.kind == "video" else cfg.limits.max_body_bytes
    data = await fetch_remote(ref.url, cap, cfg.media.remote_timeout_seconds, ref.where)
    if ref.kind == "video":
        return VideoPart(data=data)
    await loop.run_in_executor(executor, check_image, data, max_px, ref.where)
    return ImagePart(data)


async def resolve_messages(params: ChatParams, cfg: AppConfig, uploads: UploadStore,
                           executor: Executor) -> tuple[ChatMessage, ...]:
    out = []
    for m in params.messages:
        parts = []
        for p in m.parts:
            parts.append(p if isinstance(p, TextPart) else await resolve_ref(p, cfg, uploads, executor))
        out.append(ChatMessage(m.role, tuple(parts), m.tool_calls, m.tool_call_id))
    return tuple(out)
