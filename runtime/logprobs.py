"""Log-probabilities of generated tokens: computed in the engine core off the raw logits, named
and spelled (text and bytes) in the async front.

Values are the log-softmax of the logits the model produced for the position, before
temperature, top-k/top-p and any grammar mask: what the model thinks, as OpenAI documents its
`logprobs`, not the distribution a sampler drew from. Only requests that asked pay for them.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
from tokenizers import Tokenizer

from runtime.api import TokenLogprob, TopLogprob


@dataclasses.dataclass(frozen=True)
class RawLogprob:
    """One sampled token's log-probability and the top alternatives, as ids (no text yet)."""
    token_id: int
    logprob: float
    top_ids: tuple[int, ...] = ()
    top_logprobs: tuple[float, ...] = ()


def log_softmax(row: np.ndarray) -> np.ndarray:
    """float64 log-softmax of one logits row [V] (a masked -inf stays -inf)."""
    x = np.asarray(row, np.float64)
    top = x.max()
    return x - (top + np.log(np.exp(x - top).sum()))


def top_k(logp: np.ndarray, k: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """The k most likely ids, most likely first (lower id first on ties)."""
    if k <= 0:
        return (), ()
    k = min(k, logp.shape[0])
    part = np.argpartition(-logp, k - 1)[:k]
    order = np.lexsort((part, -logp[part]))
    ids = part[order]
    return tuple(int(i) for i in ids), tuple(float(logp[i]) for i in ids)


def raw_logprob(logp: np.ndarray, token_id: int, k: int) -> RawLogprob:
    ids, lps = top_k(logp, k)
    return RawLogprob(int(token_id), float(logp[token_id]), ids, lps)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (the alphabet byte-level BPE vocabularies use)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenTexts:
    """Each token id's text (decoded alone, special tokens included) and raw bytes. Byte-level
    vocabularies give a token's exact bytes (a piece of a multi-byte character included); an
    added token, or any other vocabulary, gives the UTF-8 of its decoded text."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._added = {i for i in tokenizer.get_added_tokens_decoder()}
        decoder = tokenizer.decoder
        self._byte_level = decoder is not None and "ByteLevel" in repr(decoder)

    @functools.lru_cache(maxsize=65536)
    def text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    @functools.lru_cache(maxsize=65536)
    def bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level and token_id not in self._added:
            table = _byte_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return self.text(token_id).encode("utf-8")

    def named(self, raw: RawLogprob) -> TokenLogprob:
        top = tuple(TopLogprob(i, self.text(i), self.bytes(i), lp)
                    for i, lp in zip(raw.top_ids, raw.top_logprobs))
        t = raw.token_id
        return TokenLogprob(t, self.text(t), self.bytes(t), raw.logprob, top)
