"""`DecodeBook`'s stop-string check: decoding a window of recent tokens finds exactly what decoding all would."""

from __future__ import annotations

import random

import pytest

from rlaif_mlx.backends.common import DecodeBook

STOPS = ("\n\n", "é!", "def ", "ü", "```")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


def _first_stop_by_full_decode(tokenizer, ids: list[int], stops: tuple[str, ...]) -> int | None:
    """The reference: the first prefix whose whole decoded text contains a stop string."""
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k], skip_special_tokens=False)
        if any(s in text for s in stops):
            return k
    return None


def _streams(tokenizer, count: int, seed: int = 0) -> list[list[int]]:
    """Token streams mixing random tokens (broken UTF-8 included) with text that holds a stop string."""
    rng = random.Random(seed)
    pieces = ["x = 1\n\n", "café!", "  def f", "über", "text ```py", "ñandú", "a\n b\n", "日本語"]
    streams = []
    for _ in range(count):
        ids = []
        while len(ids) < 60:
            if rng.random() < 0.5:
                ids += [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 6))]
            else:
                ids += tokenizer.encode(rng.choice(pieces), add_special_tokens=False)
        streams.append(ids[:60])
    return streams


def test_windowed_stop_check_matches_decoding_the_whole_completion(tokenizer):
    streams = _streams(tokenizer, 24)
    for stops in (STOPS, ("é!",), ("\n\n",)):
        book = DecodeBook(
            [[1]],
            len(streams),
            eos_ids=(),
            stop=stops,
            decode=lambda ids: tokenizer.decode(ids, skip_special_tokens=False),
        )
        for step in range(60):
            book.add([s[step] for s in streams], [0.0] * len(streams))
        expected = [_first_stop_by_full_decode(tokenizer, s, stops) for s in streams]
        assert sum(e is not None for e in expected) >= 6  # the streams do exercise the stops
        found = [len(ids) if reason == "stop" else None for ids, reason in zip(book.tokens, book.reasons, strict=True)]
        assert found == expected, stops


def test_a_stop_string_spanning_many_single_byte_tokens_is_found(tokenizer):
    """A stop made of tokens of one byte each (the longest span the window must cover)."""
    stop = "ü" * 5  # 10 bytes; byte tokens make it 10 tokens, after 40 tokens of filler
    ids = [b for b in tokenizer.encode("a" * 40, add_special_tokens=False)]
    byte_ids = [
        tokenizer.convert_tokens_to_ids(t)
        for t in tokenizer.convert_ids_to_tokens(tokenizer.encode("ü", add_special_tokens=False))
    ]
    ids += byte_ids * 5 + tokenizer.encode("zz", add_special_tokens=False)
    book = DecodeBook(
        [[1]], 1, eos_ids=(), stop=(stop,), decode=lambda t: tokenizer.decode(t, skip_special_tokens=False)
    )
    for token in ids:
        if not book.add([token], [0.0])[0]:
            break
    assert book.reasons == ["stop"]
    assert len(book.tokens[0]) == _first_stop_by_full_decode(tokenizer, ids, (stop,))
