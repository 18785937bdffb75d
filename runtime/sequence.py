"""One request inside the engine: its tokens, its KV block table and its lifecycle state.

Vocabulary (shared with the block manager, scheduler and runner):
  num_tokens           prompt + generated tokens known so far
  num_prompt_tokens    the prompt's length (fixed at creation)
  num_computed_tokens  tokens whose keys/values are in the KV pool; the scheduler catches this up
                       to num_tokens in chunks (prefill) or one token at a time (decode)
  num_cached_tokens    how many of the computed tokens came from prefix reuse at admission
  block_table          KV block ids, in order; token i lives at slot
                       block_table[i // block_size] * block_size + i % block_size
  is_prefill           more than one token is still to be computed (or none sampled yet)

Invariant: num_cached_tokens <= num_computed_tokens <= num_tokens, and while the sequence is
scheduled its block table covers at least num_computed_tokens tokens.
"""
from __future__ import annotations

import dataclasses
import enum
import itertools
import time
from typing import TYPE_CHECKING

import numpy as np

from runtime.api import SamplingParams
from runtime.sampling import answer_rng, new_rng

if TYPE_CHECKING:
    from runtime.constrained import Matcher
    from runtime.runner import Visual


class RequestState(enum.Enum):
    WAITING = "waiting"          # queued (new, or preempted and waiting to recompute)
    PREFILLING = "prefilling"    # admitted; computing its known tokens, chunk by chunk
    DECODING = "decoding"        # all known tokens computed; generating one token per step
    FINISHED = "finished"        # stop token, stop string or length limit
    CANCELLED = "cancelled"      # the client left or asked to stop
    FAILED = "failed"            # an error specific to this request

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED})

_ALLOWED: dict[RequestState, frozenset[RequestState]] = {
    RequestState.WAITING: frozenset({RequestState.PREFILLING, RequestState.FINISHED,
                                     RequestState.CANCELLED, RequestState.FAILED}),
    RequestState.PREFILLING: frozenset({RequestState.DECODING, RequestState.WAITING,
                                        RequestState.FINISHED, RequestState.CANCELLED,
                                        RequestState.FAILED}),
    RequestState.DECODING: frozenset({RequestState.WAITING, RequestState.FINISHED,
                                      RequestState.CANCELLED, RequestState.FAILED}),
    RequestState.FINISHED: frozenset(),
    RequestState.CANCELLED: frozenset(),
    RequestState.FAILED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A state change the request lifecycle does not allow (a bug in the caller)."""


@dataclasses.dataclass(frozen=True)
class MediaSpan:
    """Where one image or video sits in a prompt: tokens [start, end) (its whole expansion,
    timestamps included), the runs of pad tokens inside it, and a hash of its content.

    Image pad tokens all share one id, so the KV prefix cache keys blocks on the hash too. The
    prompt builder leaves the hash empty; request preparation fills it in."""
    start: int
    end: int
    content_hash: str = ""
    kind: str = "image"                             # "image" or "video"
    runs: tuple[tuple[int, int], ...] = ()          # [start, end) of each pad run (1 per image,
                                                    # t per video)

    @property
    def num_pad_tokens(self) -> int:
        return sum(e - s for s, e in self.runs)


@dataclasses.dataclass(frozen=True)
class RequestInputs:
    """What the runner reads of one request besides its tokens: the prompt's MRoPE positions
    (i64[3, num_prompt_tokens]) and the offset of positions after it, and the visual embeddings
    aligned with the prompt (None for a text-only request)."""
    positions: np.ndarray
    rope_delta: int = 0
    visual: "Visual | None" = None

    @staticmethod
    def text_only(num_prompt_tokens: int) -> "RequestInputs":
        """Plain 1-D positions broadcast to the three MRoPE axes (no images, no video)."""
        return RequestInputs(np.tile(np.arange(num_prompt_tokens, dtype=np.int64), (3, 1)))


_ids = itertools.count()


class Sequence:
    """Mutable per-request state. Owned by the scheduler; the runner reads it, never writes it."""

    def __init__(self, prompt_token_ids: list[int], sampling: SamplingParams = SamplingParams(),
                 media: tuple[MediaSpan, ...] = (), request_id: str = "",
                 arrival_time: float | None = None, inputs: RequestInputs | None = None,
                 rng: np.random.Generator | None = None):
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id: int = next(_ids)
        self.request_id = request_id or f"seq-{self.seq_id}"
        self.token_ids: list[int] = [int(t) for t in prompt_token_ids]
        self.num_prompt_tokens = len(self.token_ids)
        self.sampling = sampling
        self.media: tuple[MediaSpan, ...] = tuple(media)
        self.state = RequestState.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []     # chained hashes of full blocks, filled lazily
        self.num_published_blocks = 0           # leading blocks already in the prefix hash map
        self.num_cached_tokens = 0
        self.num_computed_tokens = 0
        self.num_preemptions = 0
        self.finish_reason: str | None = None   # "stop", "length", "cancelled", "error"
        self.error: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.rng = rng if rng is not None else new_rng(sampling.seed)   # seed None: fresh entropy
        self.inputs = inputs or RequestInputs.text_only(self.num_prompt_tokens)
        self.constraint: "Matcher | None" = None   # the grammar its answer follows, if any
        # n > 1: the other answers, made now, forked from this one once its prompt is computed
        self.fork_children: list[Sequence] = []

    @staticmethod
    def family(prompt_token_ids: list[int], sampling: SamplingParams, **kw) -> list["Sequence"]:
        """The sampling.n sequences of one request: [parent, child 1, ..., child n-1]. The
        parent carries the children and forks into them (runtime.scheduler); answer i draws from
        its own generator, derived from (seed, i), so a seed reproduces every answer."""
        n = sampling.n
        if n == 1:
            return [Sequence(prompt_token_ids, sampling, **kw)]
        rid = kw.pop("request_id", "")
        one = dataclasses.replace(sampling, n=1)
        parent = Sequence(prompt_token_ids, sampling, request_id=rid,
                          rng=answer_rng(sampling.seed, 0, n), **kw)
        parent.fork_children = [
            Sequence(prompt_token_ids, one, request_id=f"{parent.request_id}#{i}",
                     rng=answer_rng(sampling.seed, i, n), **kw) for i in range(1, n)]
        return [parent, *parent.fork_children]

    @property
    def fork_pending(self) -> bool:
        return self.sampling.n > 1

    @property
    def prefill_target(self) -> int:
        """Tokens to compute before sampling: all of them, or all but the last prompt token for
        a parent (its children compute that one each, as their first decode step)."""
        return self.num_tokens - 1 if self.fork_pending else self.num_tokens

    def end_fork(self) -> None:
        """The children have their blocks: from here on this is one answer of n."""
        self.sampling = dataclasses.replace(self.sampling, n=1)
        self.fork_children = []

    # --- sizes -------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefill(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1 or self.state is RequestState.PREFILLING

    @property
    def is_finished(self) -> bool:
        return self.state.is_terminal

    def num_blocks(self, block_size: int, num_tokens: int | None = None) -> int:
        """Blocks needed to hold the first num_tokens tokens (default: all known tokens)."""
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size

    def block_tokens(self, index: int, block_size: int) -> list[int]:
        return self.token_ids[index * block_size:(index + 1) * block_size]

    def slot_mapping(self, start: int, end: int, block_size: int) -> np.ndarray:
        """Flat pool slot ids (block * block_size + offset) of tokens [start, end)."""
        if end - start == 1:                  # a decode step: no index arrays
            return np.array([self.block_table[start // block_size] * block_size
                             + start % block_size], np.int64)
        pos = np.arange(start, end, dtype=np.int64)
        table = np.asarray(self.block_table, dtype=np.int64)
        return table[pos // block_size] * block_size + pos % block_size

    # --- lifecycle ---------------------------------------------------------------------------
    def set_state(self, new: RequestState) -> None:
        if new not in _ALLOWED[self.state]:
            raise InvalidTransition(f"{self.request_id}: {self.state.name} -> {new.name}")
        self.state = new
        if new.is_terminal:
            self.finish_time = time.monotonic()

    def append_token(self, token_id: int) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.token_ids.append(int(token_id))

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}, {self.state.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
