"""What an operator can set about an engine at start-up (the server's config maps onto this).
Unset fields (None) take the engine's build profile values."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    model_name: str | None = None         # the id /v1/models reports (default: the engine name)
    kv_mode: str | None = None            # "int8" or "float" (needs the fp-KV graph); None: profile
    kv_blocks: int | None = None          # KV pool size in blocks; None: from the profile's plan
    block_size: int | None = None         # tokens per KV block (page size); None: profile
    max_context: int | None = None        # prompt + answer tokens; capped at the profile's
    max_batch: int | None = None          # sequences per decoder step; capped at the profile's
    max_tokens_per_step: int | None = None  # chunked-prefill token budget per step
    max_queue: int = 64                   # requests in flight beyond max_batch before 429
    retry_after: float = 1.0              # Retry-After (seconds) sent with that 429
    max_images_per_request: int = 8
    image_max_side: int = 1024            # server-side cap on the longest image side, in pixels
    max_image_pixels: int = 64_000_000    # larger encoded images are refused before decoding
    video_fps: float = 2.0                # keyframe sampling rate, at most 2
    video_max_frames: int | None = None   # None: the checkpoint's video max_frames
    video_dedup_threshold: float = 0.0    # > 0 drops near-duplicate frames (see VideoParams)
    vision_cache_bytes: int = 256 << 20   # LRU cache of vision embeddings by content hash
    video_cache_bytes: int = 256 << 20    # LRU cache of decoded videos (frames selected, patchified)
    workers: int = 2                      # threads for media decoding, vision, tokenising
    stream_interval_ms: float = 8.0       # steps shorter than this hand their tokens over together
    intra_op_threads: int | None = None   # ONNX Runtime threads; None: profile
    verify_hashes: bool = True            # check every engine file against the manifest
    device: str | None = None             # "cpu" keeps every partition on the CPU; None: the manifest's placement
