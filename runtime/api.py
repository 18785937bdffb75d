"""Types that cross the engine boundary: what the HTTP layer hands the engine and gets back.

The server owns JSON and HTTP; the engine sees these dataclasses and raises these typed errors.
"""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator, Protocol


@dataclasses.dataclass(frozen=True)
class TextPart:
    text: str


@dataclasses.dataclass(frozen=True)
class ImagePart:
    data: bytes                      # encoded image file (PNG, JPEG, WebP, ...)


@dataclasses.dataclass(frozen=True)
class VideoPart:
    data: bytes | None = None        # encoded container bytes, or
    path: str | None = None          # a file on disk (uploads), read lazily


Part = TextPart | ImagePart | VideoPart


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str                        # "system", "user" or "assistant"
    parts: tuple[Part, ...]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0         # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0                   # 0 means no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False         # keep generating past end-of-sequence (benchmarks, tests)


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token: float | None    # seconds from submission to the first token


@dataclasses.dataclass(frozen=True)
class TokenDelta:
    text: str                        # new text, never a broken UTF-8 sequence
    token_ids: tuple[int, ...]
    finish_reason: str | None = None # "stop", "length", "cancelled", "error" on the last delta
    usage: Usage | None = None       # set on the last delta


@dataclasses.dataclass(frozen=True)
class EngineStats:
    kv_blocks_used: int
    kv_blocks_total: int
    requests_running: int
    requests_waiting: int
    generated_tokens_total: int
    kv_bytes_per_token: int
    device: str                      # "cpu" or "cuda"
    gpu_memory_bytes: int | None = None


class AppError(Exception):
    """Base of errors the server maps to an HTTP status; the message is safe to show a client."""
    status = 500
    code = "internal_error"
    type = "server_error"


class InvalidRequest(AppError):
    status, code, type = 400, "invalid_request", "invalid_request_error"


class MediaError(InvalidRequest):
    """A corrupt, truncated, unsupported or oversized image or video."""
    code = "invalid_media"


class PromptTooLong(InvalidRequest):
    code = "context_length_exceeded"


class PayloadTooLarge(AppError):
    status, code, type = 413, "payload_too_large", "invalid_request_error"


class QueueFull(AppError):
    status, code, type = 429, "queue_full", "rate_limit_error"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NotReady(AppError):
    status, code, type = 503, "not_ready", "server_error"


class EngineAPI(Protocol):
    """What the server needs from an engine."""
    model_name: str

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas; the last has finish_reason and usage. Closing the iterator (or
        cancelling the task consuming it) cancels the request and frees its KV blocks."""
        ...

    def stats(self) -> EngineStats: ...
