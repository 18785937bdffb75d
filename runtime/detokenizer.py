"""Incremental detokenization with stop strings.

Byte-level BPE splits one character (an emoji, a CJK character, an accent) across tokens; decoding
a partial character yields U+FFFD. We decode a short window of tokens twice (vLLM's scheme):
  prefix_text = decode(tokens[prefix_offset:read_offset])   text already emitted
  full_text   = decode(tokens[prefix_offset:])
and emit full_text[len(prefix_text):] only when it does not end in U+FFFD; then the window slides.

Stop strings: text up to (not including) the first stop string is emitted and `stopped` is set;
a tail that could still grow into a stop string is held back until it cannot. finish() flushes
what is held back when generation ends for another reason.
"""
from __future__ import annotations

from tokenizers import Tokenizer

_REPLACEMENT = "\ufffd"
_PREFIX_WINDOW = 5       # tokens of context decoded before the read offset


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int],
                 skip_special_tokens: bool = True, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(s for s in stop if s)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = list(prompt_ids)
        self.read_offset = len(self.tokens)
        self.prefix_offset = max(self.read_offset - _PREFIX_WINDOW, 0)
        self.output = ""          # decoded output text so far (including what is held back)
        self.emitted = 0          # characters of `output` already handed out
        self.stopped = False
        self.stop_string: str | None = None

    @property
    def text(self) -> str:
        """The text handed out so far."""
        return self.output[:self.emitted]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the new text that may be shown (maybe "")."""
        if self.stopped:
            return ""
        self.tokens.append(int(token_id))
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        if len(full_text) > len(prefix_text) and not full_text.endswith(_REPLACEMENT):
            new = full_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return self._release(new)
        return ""

    def _release(self, new: str) -> str:
        searched_from = max(len(self.output) - self._max_stop + 1, 0)
        self.output += new
        if self.stop:
            hits = [(i, s) for s in self.stop if (i := self.output.find(s, searched_from)) >= 0]
            if hits:
                at, s = min(hits)
                self.output = self.output[:at]
                self.stopped, self.stop_string = True, s
                return self._emit(at)
            return self._emit(len(self.output) - self._held_tail())
        return self._emit(len(self.output))

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
        if self.read_offset < len(self.tokens):
            prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
            full_text = self._decode(self.tokens[self.prefix_offset:])
            rest = full_text[len(prefix_text):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        out = self._release(rest) if rest else ""
        return out if self.stopped else out + self._emit(len(self.output))
