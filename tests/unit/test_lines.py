"""LineBuffer: the bounded line reader every core shares."""

from __future__ import annotations

import pytest

from mailgate.protocols.lines import LineBuffer, LineTooLong


def lines_of(buf: LineBuffer) -> list[bytes]:
    out = []
    while (line := buf.next_line()) is not None:
        out.append(line)
    return out


def test_crlf_and_bare_lf_both_end_a_line():
    buf = LineBuffer(100)
    buf.feed(b"one\r\ntwo\nthree\r\n")
    assert lines_of(buf) == [b"one", b"two", b"three"]
    assert len(buf) == 0


def test_only_the_final_cr_is_stripped():
    buf = LineBuffer(100)
    buf.feed(b"a\rb\r\r\n\r\n")
    assert lines_of(buf) == [b"a\rb\r", b""]


def test_partial_line_waits_for_its_end():
    buf = LineBuffer(100)
    buf.feed(b"USER al")
    assert buf.next_line() is None
    assert len(buf) == 7
    buf.feed(b"ice\r")
    assert buf.next_line() is None
    buf.feed(b"\nNEXT")
    assert buf.next_line() == b"USER alice"
    assert buf.next_line() is None
    assert buf.take_all() == b"NEXT"


def test_trickled_one_byte_at_a_time():
    data = b"first line\r\nsecond\n"
    buf = LineBuffer(100)
    got = []
    for i in range(len(data)):
        buf.feed(data[i : i + 1])
        got += lines_of(buf)
    assert got == [b"first line", b"second"]


def test_limit_counts_bytes_before_the_lf():
    buf = LineBuffer(10)
    buf.feed(b"a" * 9 + b"\r\n" + b"b" * 10 + b"\n")
    assert buf.next_line() == b"a" * 9
    assert buf.next_line() == b"b" * 10
    buf.feed(b"c" * 10 + b"\r\n")
    with pytest.raises(LineTooLong):
        buf.next_line()


def test_endless_line_raises_once_past_the_limit_even_when_trickled():
    buf = LineBuffer(10)
    for _ in range(10):
        buf.feed(b"x")
        assert buf.next_line() is None
    buf.feed(b"x")
    with pytest.raises(LineTooLong):
        buf.next_line()


def test_take_returns_exact_chunks():
    buf = LineBuffer(100)
    buf.feed(b"abc")
    assert buf.take(4) is None
    buf.feed(b"def\r\nrest\r\n")
    assert buf.take(4) == b"abcd"
    assert buf.next_line() == b"ef"
    assert buf.take(0) == b""
    assert buf.next_line() == b"rest"


def test_take_after_a_failed_search_still_finds_later_lines():
    buf = LineBuffer(100)
    buf.feed(b"abcdef")
    assert buf.next_line() is None  # remembers that six bytes hold no LF
    assert buf.take(5) == b"abcde"
    buf.feed(b"\nZ\n")
    assert buf.next_line() == b"f"
    assert buf.next_line() == b"Z"


def test_take_all_and_clear():
    buf = LineBuffer(100)
    buf.feed(b"a\r\nb")
    assert buf.take_all() == b"a\r\nb"
    assert buf.take_all() == b""
    buf.feed(b"xyz")
    buf.next_line()
    buf.clear()
    assert len(buf) == 0
    buf.feed(b"q\n")
    assert buf.next_line() == b"q"
