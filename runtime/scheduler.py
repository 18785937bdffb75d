"""Continuous batching with chunked prefill (vLLM v1 style).

Each running sequence catches num_computed_tokens up to num_tokens: a prefill is a run of chunks,
a decode is a chunk of one token, and a prefix hit simply starts the catch-up further along.
One step:

  plan = scheduler.schedule()            # who runs, which tokens, which slots
  ... the runner computes plan.entries, samples a token for each entry with needs_logits ...
  finished = scheduler.postprocess(plan, {seq_id: token_id})

Policy: running decodes are served first (oldest first, one token each), then running prefills,
then waiting requests are admitted (FIFO) into the token budget that is left, so a long new
prompt never stalls running streams. A request is admitted only when blocks for all its known
tokens fit. When a decode needs a block and none is free, the newest running request is
preempted (its blocks freed, back to the head of the queue to recompute).

n answers from one prompt (sampling.n > 1, made by `Sequence.family`): the parent prefills all
but its last prompt token once, then forks into its n - 1 pre-made children, which share its
computed full blocks (reference counts) and get a copy of its last, partial block (copy-on-write,
done on the device: `StepPlan.copies`); each answer then computes the last prompt token as its
first decode step and samples with its own generator. Admission reserves the n batch slots and
the children's blocks. After the fork they are ordinary sequences (preemption recomputes them,
reusing the shared blocks by prefix hash); a parent that ends before forking ends its children.

Not thread-safe: call everything from the engine's step loop (apply cancellations between steps).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np

from runtime.kv_cache.block_manager import BlockManager
from runtime.sequence import RequestState, Sequence


@dataclasses.dataclass(frozen=True)
class ScheduledChunk:
    """Tokens [start, start + num_new_tokens) of one sequence to compute this step."""
    seq: Sequence
    start: int                   # == past length: keys at positions < start are in the pool
    num_new_tokens: int
    token_ids: tuple[int, ...]   # seq.token_ids[start:start + num_new_tokens]
    block_table: tuple[int, ...]  # covers at least start + num_new_tokens tokens
    slots: np.ndarray            # int64 [num_new_tokens]: flat pool slots of the new tokens
    needs_logits: bool           # the chunk reaches the last known token: sample after it
    is_prefill: bool             # the sequence is catching up (not a one-token decode step)

    @property
    def seq_id(self) -> int:
        return self.seq.seq_id


@dataclasses.dataclass(frozen=True)
class StepPlan:
    entries: tuple[ScheduledChunk, ...]
    preempted: tuple[Sequence, ...] = ()    # sent back to the queue while planning this step
    finished: tuple[Sequence, ...] = ()     # ended while planning (could never fit the pool)
    copies: tuple[tuple[int, int], ...] = ()  # (src, dst) KV blocks to copy before running

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    @property
    def logit_entries(self) -> list[ScheduledChunk]:
        return [e for e in self.entries if e.needs_logits]


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_batch: int, max_tokens_per_step: int = 512,
                 eos_token_ids: tuple[int, ...] = (), max_model_len: int | None = None):
        if max_batch < 1 or max_tokens_per_step < 1:
            raise ValueError("max_batch and max_tokens_per_step must be >= 1")
        self.bm = block_manager
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []              # in admission order: newest last
        self._live: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self.generated_tokens_total = 0
        self.family_ended: list[Sequence] = []     # unforked children ended with their parent

    # --- intake ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request. Admission (how many may wait) and the prompt's length against
        the context are decided before this, once, by the engine (runtime.engine)."""
        if seq.state is not RequestState.WAITING or seq.seq_id in self._live:
            raise ValueError(f"{seq.request_id} is not a new request")
        if seq.sampling.n > self.max_batch or len(seq.fork_children) != seq.sampling.n - 1:
            raise ValueError(f"{seq.request_id}: n={seq.sampling.n} needs n - 1 children and at "
                             f"most max_batch={self.max_batch} answers")
        self.waiting.append(seq)
        self._live[seq.seq_id] = seq
        for child in seq.fork_children:
            self._live[child.seq_id] = child

    def get(self, seq_id: int) -> Sequence | None:
        return self._live.get(seq_id)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # --- planning ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """Plan one step, or None when there is nothing to run."""
        budget = self.max_tokens_per_step
        entries: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        finished: list[Sequence] = []
        scheduled: set[int] = set()
        copies = self._fork_ready(preempted)

        # 1. Running decodes, oldest first; preempt the newest when a block is missing.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.state is not RequestState.DECODING:
                i += 1
                continue
            while not self.bm.can_append(seq, 1):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    # Alone and still out of blocks: the pool is its hard length limit.
                    self._finish(seq, RequestState.FINISHED, "length")
                    finished.append(seq)
                    break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.state is not RequestState.DECODING:
                continue          # finished or preempted itself: running[i] is now the next one
            self.bm.may_append(seq, 1)
            entries.append(self._chunk(seq, 1))
            scheduled.add(seq.seq_id)
            budget -= 1
            i += 1

        # 2. Running prefills take chunks from what is left.
        for seq in self.running:
            if budget <= 0:
                break
            if seq.state is RequestState.PREFILLING and seq.seq_id not in scheduled:
                n = min(seq.prefill_target - seq.num_computed_tokens, budget)
                if n <= 0:
                    continue      # a parent waiting to fork
                entries.append(self._chunk(seq, n))
                scheduled.add(seq.seq_id)
                budget -= n

        # 3. Admit waiting requests, in order, while their blocks fit.
        while self.waiting and budget > 0 and self._slots() < self.max_batch:
            seq = self.waiting[0]
            if self.bm.blocks_needed(seq.num_tokens + 1) > self.bm.num_blocks:
                # A preempted request that grew past what the whole pool holds.
                self.waiting.popleft()
                self._finish(seq, RequestState.FINISHED, "length")
                finished.append(seq)
                continue
            if self._slots() + seq.sampling.n > self.max_batch \
                    or not self.bm.can_allocate(seq, extra=seq.sampling.n - 1):
                break
            self.waiting.popleft()
            self.bm.allocate(seq)
            seq.set_state(RequestState.PREFILLING)
            self.running.append(seq)
            n = min(seq.prefill_target - seq.num_computed_tokens, budget)
            if n > 0:
                entries.append(self._chunk(seq, n))
                scheduled.add(seq.seq_id)
                budget -= n

        finished += self.family_ended
        self.family_ended = []
        if not entries and not preempted and not finished and not copies \
                and not any(self._ready_to_fork(s) for s in self.running):
            return None
        return StepPlan(tuple(entries), tuple(preempted), tuple(finished), tuple(copies))

    # --- n answers from one prompt -------------------------------------------------------------
    def _slots(self) -> int:
        """Batch slots taken: running sequences, plus the children a parent will fork into."""
        return len(self.running) + sum(len(s.fork_children) for s in self.running)

    @staticmethod
    def _ready_to_fork(seq: Sequence) -> bool:
        return seq.fork_pending and seq.num_computed_tokens == seq.prefill_target

    def _fork_ready(self, preempted: list[Sequence]) -> list[tuple[int, int]]:
        """Fork every parent whose shared prefix is computed; the blocks to copy on the device."""
        copies: list[tuple[int, int]] = []
        for parent in [s for s in self.running if self._ready_to_fork(s)]:
            kids = [c for c in parent.fork_children if not c.is_finished]
            need = len(kids) * self.bm.blocks_to_fork(parent)
            while self.bm.num_free_blocks < need:
                others = [s for s in self.running if s is not parent]
                if not others:
                    break
                self._preempt(others[-1])
                preempted.append(others[-1])
            for kid in kids:
                if self.bm.num_free_blocks < self.bm.blocks_to_fork(parent):
                    # the whole pool cannot hold this many answers beside the prompt
                    self._finish(kid, RequestState.FINISHED, "length")
                    self.family_ended.append(kid)
                    continue
                copy = self.bm.fork(parent, kid)
                if copy is not None:
                    copies.append(copy)
                kid.set_state(RequestState.PREFILLING)
                kid.set_state(RequestState.DECODING)
                self.running.append(kid)
            parent.end_fork()
            parent.set_state(RequestState.DECODING)
        return copies

    def _chunk(self, seq: Sequence, n: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(
            seq=seq, start=start, num_new_tokens=n,
            token_ids=tuple(seq.token_ids[start:start + n]),
            block_table=tuple(seq.block_table),
            slots=seq.slot_mapping(start, start + n, self.bm.block_size),
            needs_logits=start + n == seq.num_tokens,
            is_prefill=seq.state is RequestState.PREFILLING)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.deallocate(seq)
        seq.set_state(RequestState.WAITING)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # --- results -----------------------------------------------------------------------------
    def postprocess(self, plan: StepPlan, sampled: dict[int, int | None]) -> list[Sequence]:
        """Record a computed step: advance each entry's computed tokens, append the sampled
        token of each entry with needs_logits, finish on stop token / max_tokens / context
        length. Entries whose sequence ended meanwhile (cancelled) are skipped. Returns the
        sequences that finished in this call."""
        done = []
        for e in plan.entries:
            seq = e.seq
            if seq.is_finished or seq not in self.running or seq.num_computed_tokens != e.start:
                continue
            seq.num_computed_tokens += e.num_new_tokens
            self.bm.cache_computed_blocks(seq)
            if not e.needs_logits:
                continue
            token = sampled.get(seq.seq_id)
            if token is None:
                raise ValueError(f"no sampled token for {seq.request_id}, whose chunk needed logits")
            seq.append_token(token)
            self.generated_tokens_total += 1
            if seq.state is RequestState.PREFILLING:
                seq.set_state(RequestState.DECODING)
            reason = self._stop_reason(seq, int(token))
            if reason:
                self._finish(seq, RequestState.FINISHED, reason)
                done.append(seq)
        return done

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        if token in seq.sampling.stop_token_ids or (token in self.eos_token_ids
                                                     and not seq.sampling.ignore_eos):
            return "stop"
        if seq.num_output_tokens >= seq.sampling.max_tokens:
            return "length"
        if self.max_model_len is not None and seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    # --- endings -----------------------------------------------------------------------------
    def finish(self, seq_id: int, reason: str = "stop") -> bool:
        """End a request normally (e.g. the detokenizer saw a stop string)."""
        seq = self._live.get(seq_id)
        return seq is not None and self._finish(seq, RequestState.FINISHED, reason)

    def cancel(self, seq_id: int) -> bool:
        """Cancel in any state; frees its blocks at once. False if it already ended."""
        seq = self._live.get(seq_id)
        return seq is not None and self._finish(seq, RequestState.CANCELLED, "cancelled")

    def take_family_endings(self) -> list[Sequence]:
        """Children that ended with their parent before forking (for the caller to report)."""
        out, self.family_ended = self.family_ended, []
        return out

    def fail(self, seq_id: int, reason: str) -> bool:
        seq = self._live.get(seq_id)
        if seq is None:
            return False
        seq.error = reason
        return self._finish(seq, RequestState.FAILED, "error")

    def _finish(self, seq: Sequence, state: RequestState, reason: str) -> bool:
        if seq.is_finished:
            return False
        for kid in seq.fork_children:       # ended before forking: its answers end with it
            if not kid.is_finished:
                kid.error = seq.error
                kid.set_state(state)
                kid.finish_reason = reason
                self._live.pop(kid.seq_id, None)
                self.family_ended.append(kid)
        seq.fork_children = []
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.block_table:
            self.bm.deallocate(seq)
        seq.set_state(state)
        seq.finish_reason = reason
        self._live.pop(seq.seq_id, None)
        return True

    # --- checks ------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Block ref counts match the running sequences' tables; waiting ones hold none."""
        for seq in self.waiting:
            if seq.block_table or seq.state is not RequestState.WAITING:
                raise AssertionError(f"waiting {seq} holds blocks or has the wrong state")
        for seq in self.running:
            if seq.state not in (RequestState.PREFILLING, RequestState.DECODING):
                raise AssertionError(f"running {seq} has the wrong state")
            if len(seq.block_table) < self.bm.blocks_needed(seq.num_computed_tokens):
                raise AssertionError(f"{seq} has fewer blocks than computed tokens")
        self.bm.check_integrity(live=self.running)
