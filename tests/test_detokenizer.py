"""Incremental detokenization with the seed model's byte-level BPE tokenizer: characters split
across tokens never come out broken, stop strings cut the text exactly."""
from __future__ import annotations

import pytest
from tokenizers import Tokenizer

from runtime.detokenizer import IncrementalDetokenizer

TEXT = "Voilà: 你好 🙂 naïve 日本語 👩‍👩‍👧 café — done"


@pytest.fixture(scope="module")
def tok(seed_model_dir) -> Tokenizer:
    return Tokenizer.from_file(str(seed_model_dir / "tokenizer.json"))


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    pieces = [detok.add(i) for i in ids]
    return pieces + [detok.finish()]


def test_pieces_are_whole_characters_and_add_up(tok):
    prompt = tok.encode("<|im_start|>assistant\n").ids
    ids = tok.encode(TEXT).ids
    # The tokenizer really does split characters across tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = stream(detok, ids)
    assert "".join(pieces) == TEXT == detok.text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 10        # it streams, not all at the end


def test_prompt_context_does_not_leak_and_specials_are_skipped(tok):
    prompt = tok.encode("Hello there 🙂").ids
    end = tok.token_to_id("<|im_end|>")
    ids = tok.encode(" world é").ids + [end]
    assert "".join(stream(IncrementalDetokenizer(tok, prompt), ids)) == " world é"
    kept = "".join(stream(IncrementalDetokenizer(tok, prompt, skip_special_tokens=False), ids))
    assert kept == " world é<|im_end|>"


def test_stop_string_cuts_before_it_even_across_tokens(tok):
    ids = tok.encode("The answer is 你好 and more text").ids
    detok = IncrementalDetokenizer(tok, [], stop=("你好",))
    pieces = []
    for i in ids:
        pieces.append(detok.add(i))
        if detok.stopped:
            break
    assert "".join(pieces) == "The answer is " == detok.text
    assert detok.stop_string == "你好"
    assert detok.add(ids[-1]) == "" and detok.finish() == ""


def test_a_possible_stop_prefix_is_held_back_then_released(tok):
    ids = tok.encode("one two three").ids          # one | _two | _three
    detok = IncrementalDetokenizer(tok, [], stop=("two four",))
    assert [detok.add(i) for i in ids] == ["one", " ", "two three"]   # "two" might grow into the stop
    assert detok.finish() == "" and not detok.stopped
    detok = IncrementalDetokenizer(tok, [], stop=("thr", "xyz"))
    assert "".join(stream(detok, ids)) == "one two " and detok.stopped


def test_finish_releases_a_held_tail(tok):
    ids = tok.encode("hello wor").ids
    detok = IncrementalDetokenizer(tok, [], stop=("world",))
    early = "".join(detok.add(i) for i in ids)
    assert early == "hello "                       # "wor" could be the start of "world"
    assert early + detok.finish() == "hello wor"
    assert not detok.stopped


def test_earliest_of_several_stop_strings_wins(tok):
    ids = tok.encode("a red circle and a blue square").ids
    detok = IncrementalDetokenizer(tok, [], stop=("square", "circle", "blue"))
    assert "".join(stream(detok, ids)) == "a red " and detok.stop_string == "circle"


def test_random_token_streams_add_up_to_the_full_decode(tok):
    import random
    prompt = tok.encode("<|im_start|>assistant\n").ids
    normal = [i for i in range(tok.get_vocab_size()) if not tok.id_to_token(i).startswith("<|")]
    for seed in range(100):
        rnd = random.Random(seed)
        ids = [rnd.choice(normal) for _ in range(30)]
        detok = IncrementalDetokenizer(tok, prompt)
        pieces = [detok.add(i) for i in ids]
        assert "".join(pieces) + detok.finish() == tok.decode(ids)
        # A piece never ends in a partial character (random bytes may be broken mid-text).
        assert not any(p.endswith("\ufffd") for p in pieces)
