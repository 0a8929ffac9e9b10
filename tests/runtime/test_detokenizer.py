"""Incremental detokenizing: valid UTF-8 only, stop strings across token boundaries never leak."""

from __future__ import annotations

import pytest

from engine.runtime.detokenizer import Detokenizer


class ByteTokenizer:
    """Each id is a byte string: lets a test split characters and stop strings anywhere."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def run(pieces: list[bytes], stop: tuple[str, ...] = ()) -> tuple[list[str], Detokenizer]:
    tok = ByteTokenizer(pieces)
    detok = Detokenizer(tok, stop)
    deltas = [detok.add([i]) for i in range(len(pieces))]
    deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_are_never_split() -> None:
    text = "héllo 世界 🙂!"
    data = text.encode()
    pieces = [data[i : i + 1] for i in range(len(data))]  # one byte per token
    deltas, _ = run(pieces)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_spanning_tokens_is_not_emitted() -> None:
    deltas, detok = run([b"Hello ", b"wor", b"ld<", b"|st", b"op|> tail"], stop=("<|stop|>",))
    assert "".join(deltas) == "Hello world"
    assert detok.stopped


def test_prefix_of_stop_is_held_then_released() -> None:
    deltas, detok = run([b"a <", b"|s", b"x"], stop=("<|stop|>",))
    assert deltas[0] == "a "  # '<' could start the stop string
    assert deltas[1] == ""
    assert "".join(deltas) == "a <|sx"
    assert not detok.stopped


def test_held_back_text_is_flushed_at_the_end() -> None:
    deltas, _ = run([b"x", b"<|st"], stop=("<|stop|>",))
    assert deltas[-1] == "<|st"
    assert "".join(deltas) == "x<|st"


@pytest.mark.parametrize("stops", [("END", "STOP"), ("STOP", "END")])
def test_earliest_of_several_stops_wins(stops: tuple[str, ...]) -> None:
    deltas, _ = run([b"1 EN", b"D 2 STOP"], stop=stops)
    assert "".join(deltas) == "1 "


def test_nothing_after_stop() -> None:
    tok = ByteTokenizer([b"abc", b"STOP", b"more"])
    detok = Detokenizer(tok, ("STOP",))
    assert detok.add([0]) == "abc"
    assert detok.add([1]) == ""
    assert detok.stopped
    assert detok.add([2]) == ""
    assert detok.flush() == ""
