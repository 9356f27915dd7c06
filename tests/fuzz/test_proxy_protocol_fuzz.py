"""Invariants of the PROXY protocol parser under any input.

Whatever arrives, split anywhere: the parser answers NEED_MORE, a header, or ProxyProtocolError,
never another exception; a header never consumes more than itself (the trailing bytes are
exactly what followed it, and feeding the header alone gives the same header); and the answer
does not depend on how the bytes were split.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocols.proxy_protocol import (
    NEED_MORE,
    HeaderParsed,
    ProxyHeaderParser,
    ProxyProtocolError,
    may_be_proxy_header,
)
from proxy_wire import LOCAL, PROXY, TCP4, TCP6, UNIX_STREAM, UNSPEC, inet, ssl_tlv, tlv, v2

FUZZ = settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Well-formed pieces so that random input reaches deep states: signatures, headers, TLVs.
PIECES = [
    b"PROXY ",
    b"TCP4 ",
    b"TCP6 ",
    b"UNKNOWN",
    b"192.0.2.1 ",
    b"::1 ",
    b"::ffff:1.2.3.4 ",
    b"65535 ",
    b"0 ",
    b"\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n",
    b"\x20",
    b"\x21",
    b"\x11",
    b"\x21\x00\x0c",
    b"\x00\x00",
    tlv(0x02, b"mail.example.com"),
    tlv(0x03, b"\0\0\0\0"),
    ssl_tlv(7, 0, (0x22, b"cn"), (0x21, b"TLSv1.3")),
    tlv(0xE0, b"x"),
]
HEADERS = [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 40000 143\r\n",
    b"PROXY TCP6 2001:db8::1 ::1 1 993\r\n",
    b"PROXY UNKNOWN\r\n",
    v2(PROXY, TCP4, inet("192.0.2.1", "192.0.2.2", 1, 2), tlv(0x01, b"imap"), crc=True),
    v2(PROXY, TCP6, inet("2001:db8::1", "::1", 3, 4), ssl_tlv(7, 0, (0x22, b"client"))),
    v2(PROXY, UNIX_STREAM, b"/a".ljust(216, b"\0")),
    v2(LOCAL, UNSPEC),
    v2(LOCAL, UNSPEC, tlvs=tlv(0x05, b"id"), crc=True),
]

noise = st.lists(st.one_of(st.sampled_from(PIECES), st.binary(max_size=8)), max_size=30)
inputs = st.one_of(
    noise.map(b"".join),
    st.binary(max_size=300),
    # A valid header with bytes flipped, cut or appended: the edges of the grammar.
    st.builds(
        lambda header, flips, cut, tail: _mutate(header, flips, cut) + tail,
        st.sampled_from(HEADERS),
        st.lists(st.tuples(st.integers(0, 300), st.integers(0, 255)), max_size=3),
        st.integers(0, 300),
        st.binary(max_size=20),
    ),
)
cuts = st.lists(st.integers(0, 400), max_size=8)


def _mutate(header: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    data = bytearray(header)
    for at, value in flips:
        data[at % len(data)] = value
    return bytes(data[: max(1, cut)]) if cut < len(data) else bytes(data)


def split(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(bounds) if data[a:b]]


def run(chunks: list[bytes]) -> tuple[str, object]:
    """('header', HeaderParsed) | ('more', consumed) | ('error', log_text); nothing else."""
    parser = ProxyHeaderParser()
    fed = 0
    for chunk in chunks:
        try:
            result = parser.receive(chunk)
        except ProxyProtocolError as e:
            assert isinstance(e.log_text, str) and e.log_text
            return "error", e.log_text
        fed += len(chunk)
        if isinstance(result, HeaderParsed):
            return "header", (result, fed)
        assert result is NEED_MORE
    return "more", fed


@FUZZ
@given(inputs, cuts)
def test_any_input_gives_a_header_need_more_or_an_error(data, points):
    chunks = split(data, points)
    kind, value = run(chunks)
    whole_kind, whole_value = run([data]) if data else ("more", 0)
    assert kind == whole_kind, "the answer depends on how the bytes were split"
    if kind == "header":
        parsed, fed = value
        assert isinstance(parsed, HeaderParsed)
        header_len = fed - len(parsed.trailing)
        assert header_len == parsed.length > 0
        assert data[header_len:fed] == parsed.trailing, "trailing bytes changed"
        assert whole_value[0].header == parsed.header
        assert whole_value[0].trailing == data[header_len:]
        alone = ProxyHeaderParser().receive(data[:header_len])
        assert isinstance(alone, HeaderParsed) and alone.trailing == b""
        assert alone.header == parsed.header, "the header read bytes beyond itself"
        assert may_be_proxy_header(data[:header_len])
    if kind == "error" and whole_kind == "error":
        assert value == whole_value


@FUZZ
@given(inputs)
def test_eof_anywhere_is_an_error_or_a_complete_header(data):
    parser = ProxyHeaderParser()
    try:
        result = parser.receive(data) if data else NEED_MORE
        if result is NEED_MORE:
            parser.receive(b"")
            raise AssertionError("EOF before a complete header must be an error")
    except ProxyProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=20))
def test_may_be_proxy_header_agrees_with_the_parser(prefix):
    try:
        result = ProxyHeaderParser().receive(prefix) if prefix else NEED_MORE
    except ProxyProtocolError as e:
        if "bad signature" in e.log_text:
            assert not may_be_proxy_header(prefix)
        return
    assert may_be_proxy_header(prefix) or isinstance(result, HeaderParsed)
