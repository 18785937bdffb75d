"""Types that cross the engine boundary: what the HTTP layer hands the engine and gets back.

The server owns JSON and HTTP; the engine sees these dataclasses and raises these typed errors.
"""
from __future__ import annotations

import dataclasses
from concurrent.futures import Executor
from typing import TYPE_CHECKING, AsyncIterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from runtime.media.video import VideoInput


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
class ToolCall:
    """A function call an assistant made earlier in the conversation (rendered by the template)."""
    id: str
    name: str
    arguments: str                   # a JSON text, as OpenAI sends it


@dataclasses.dataclass(frozen=True)
class ChatMessage:
    role: str                        # "system", "user", "assistant" or "tool"
    parts: tuple[Part, ...]
    tool_calls: tuple[ToolCall, ...] = ()      # assistant messages
    tool_call_id: str | None = None            # tool messages: the call this answers


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A constraint on the answer's tokens, enforced while decoding: an llguidance grammar
    (runtime.constrained builds and checks it), and what it is for (logs and errors)."""
    source: str
    description: str


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
    logprobs: bool = False           # report each generated token's log-probability
    top_logprobs: int = 0            # ... and the this-many most likely alternatives (0..20)
    n: int = 1                       # answers from one prompt (they share its KV blocks)


    grammar: Grammar | None = None   # structured output / forced tool calls (runtime.constrained)
    frequency_penalty: float = 0.0   # minus this x (times the token was generated so far)
    presence_penalty: float = 0.0    # minus this once a token has been generated
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit)


MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    messages: tuple[ChatMessage, ...]
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""
    prompt: str | None = None        # a raw prompt (legacy completions): no chat template, no
                                     # media; `messages` is then empty
    tools: tuple[dict, ...] = ()     # OpenAI tool objects, rendered by the chat template


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    time_to_first_token: float | None    # seconds from submission to the first token


@dataclasses.dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str                       # the token's text as decoded alone ("\ufffd" for a piece
                                     # of a multi-byte character)
    bytes: bytes                     # the token's raw bytes (byte-level BPE)
    logprob: float


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability: log-softmax of the model's raw logits at that
    position (before temperature, top-k/top-p and any grammar mask), with the most likely
    alternatives (most likely first; as many as top_logprobs asked)."""
    token_id: int
    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class TokenDelta:
    text: str                        # new text, never a broken UTF-8 sequence
    token_ids: tuple[int, ...]
    finish_reason: str | None = None # "stop", "length", "cancelled", "error" on the last delta
    usage: Usage | None = None       # set on the last delta
    index: int = 0                   # which of the request's n answers (0..n-1)
    logprobs: tuple[TokenLogprob, ...] | None = None   # one per token id, when asked for


@dataclasses.dataclass(frozen=True)
class Tokenized:
    token_ids: tuple[int, ...]
    pieces: tuple[str, ...]          # each token's text as decoded alone


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


class ModelNotFound(AppError):
    status, code, type = 404, "model_not_found", "invalid_request_error"


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


class EngineFailure(AppError):
    """The engine failed while serving this request (a decoder step raised, the loop stopped).
    The message is generic; the server log has the cause."""
    status, code, type = 500, "engine_error", "server_error"


def check_text(text: str, where: str) -> None:
    """Text the tokenizer can encode: valid Unicode (JSON can carry a lone UTF-16 surrogate such
    as "\\ud800", which no UTF-8 encoder accepts)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"{where} is not valid Unicode text ({e.reason} at position "
                             f"{e.start})") from None


def validate_request(request: GenerationRequest) -> None:
    """What the engine checks of a request before any work: messages (or a raw prompt) present,
    every text and stop string encodable. (Sampling parameters: runtime.sampling.validate.)"""
    if request.prompt is not None:
        if request.messages:
            raise InvalidRequest("send messages or a prompt, not both")
        if not request.prompt:
            raise InvalidRequest("prompt must not be empty")
        check_text(request.prompt, "prompt")
    elif not request.messages:
        raise InvalidRequest("messages must not be empty")
    for i, m in enumerate(request.messages):
        for j, part in enumerate(m.parts):
            if isinstance(part, TextPart):
                check_text(part.text, f"messages[{i}].content[{j}]")
    for k, stop in enumerate(request.sampling.stop):
        check_text(stop, f"stop[{k}]")


@runtime_checkable
class EngineAPI(Protocol):
    """Everything the server needs from an engine (runtime.engine.AsyncEngine; the tests' fake
    engine implements the same contract, and the same contract tests run against both)."""
    model_name: str

    @property
    def ready(self) -> bool:
        """True between a successful start() and stop()."""
        ...

    @property
    def max_context(self) -> int | None:
        """Prompt + answer tokens per request; None until the engine has loaded."""
        ...

    @property
    def executor(self) -> Executor:
        """The one worker pool for media work (decoding, base64, headers, upload writes)."""
        ...

    async def start(self) -> None:
        """Load what is not loaded yet (slow; off the event loop) and start serving."""
        ...

    async def stop(self) -> None:
        """Cancel what is running (their streams raise NotReady), stop, release the workers."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Stream deltas; every generated token appears in exactly one delta's token_ids, and
        the last delta has finish_reason "stop", "length" (or "cancelled" after cancel()) and
        the usage. With sampling.n > 1 the n answers' deltas interleave, each carrying its
        `index`; each answer ends with one delta that has its finish_reason, and the last of
        those (the stream's last delta) carries the usage of all of them (the prompt counted
        once). With sampling.logprobs each delta has one TokenLogprob per token id. A failure
        raises an
        AppError (EngineFailure, NotReady, InvalidRequest, QueueFull, ...) instead, before or
        after some deltas. Closing the iterator (or cancelling the task consuming it) cancels
        the request and frees its KV blocks."""
        ...

    async def cancel(self, request_id: str) -> bool:
        """Cancel a request by id: its stream ends with finish_reason "cancelled" and its KV
        blocks are freed. False if no such request is running."""
        ...

    async def tokenize(self, text: str | None = None,
                       messages: tuple[ChatMessage, ...] | None = None, *,
                       add_special: bool = False, add_generation_prompt: bool = True) -> Tokenized:
        """Token ids of raw text (no template), or of text-only messages through the chat
        template. NotReady until loaded; InvalidRequest for media or unencodable text."""
        ...

    async def detokenize(self, token_ids: tuple[int, ...]) -> str:
        """The text of token ids (special tokens included); InvalidRequest naming the first id
        outside the vocabulary."""
        ...

    async def preview_video(self, source: bytes | str) -> "VideoInput":
        """What the model will see of a video (bytes or a path), without vision encoding."""
        ...

    def stats(self) -> EngineStats:
        """A snapshot; never waits for a decoder step."""
        ...
