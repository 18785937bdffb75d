"""Incremental detokenization with stop strings, for one request.

Whole characters come from `tokenizers.decoders.DecodeStream` (it buffers the tokens of a
character byte-level BPE splits, e.g. an emoji, and returns None until the character is complete);
this module adds only what DecodeStream lacks:

- stop strings: text up to (not including) the first stop string is released and `stopped` is
  set; a tail that could still grow into a stop string is held back until it cannot;
- finish(): when generation ends for another reason, what is held back is released (a trailing
  partial character as U+FFFD, as a full decode would show it).

Text only: which tokens a request produced is the engine's business, so a token that yields no
text (a partial character, a held-back stop prefix, a skipped special token) is still counted.
"""
from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

_PREFIX_WINDOW = 5       # prompt tokens given as context (a word-initial space decodes right)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self._stream = DecodeStream([int(t) for t in prompt_ids[-_PREFIX_WINDOW:]],
                                    skip_special_tokens=skip_special_tokens)
        self._pending: list[int] = []   # tokens DecodeStream holds (no text yet)
        self.output = ""                # decoded output so far (including what is held back)
        self.emitted = 0                # characters of `output` already handed out
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self.output[:self.emitted]

    def add(self, token_id: int) -> str:
        """Take one generated token; return the new text that may be shown (maybe "")."""
        if self.stopped:
            return ""
        piece = self._stream.step(self.tokenizer, int(token_id))
        if piece is None:
            self._pending.append(int(token_id))
            return ""
        self._pending.clear()
        return self._release(piece)

    def _release(self, new: str) -> str:
        searched_from = max(len(self.output) - self._max_stop + 1, 0)
        self.output += new
        if not self.stop:
            return self._emit(len(self.output))
        hits = [(i, s) for s in self.stop if (i := self.output.find(s, searched_from)) >= 0]
        if hits:
            at, s = min(hits)
            self.output = self.output[:at]
            self.stopped, self.stop_string = True, s
            return self._emit(at)
        return self._emit(len(self.output) - self._held_tail())

    def _held_tail(self) -> int:
        """Length of the longest suffix of the output that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(self.output) - self.emitted), 0, -1):
            tail = self.output[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.output[self.emitted:upto]
        self.emitted = upto
        return out

    def finish(self) -> str:
        """Generation ended (not by a stop string): release any held-back text, including a
        trailing partial character as decoded (U+FFFD)."""
        if self.stopped:
            return ""
        rest = ""
        if self._pending:
            rest = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
            self._pending.clear()
        out = self._release(rest) if rest else ""
        return out if self.stopped else out + self._emit(len(self.output))
