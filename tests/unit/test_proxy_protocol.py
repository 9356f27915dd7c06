"""The PROXY protocol parser: the spec's examples and HAProxy-style headers, bytes in, header out.

Every valid case is fed three ways: whole, one byte at a time (the header must complete exactly
at its last byte, with nothing consumed past it), and followed by the mail protocol's first
bytes, which must come back unchanged as `trailing`.
"""

from __future__ import annotations

import pytest

from mailgate.protocols.proxy_protocol import (
    MAX_V2_HEADER,
    NEED_MORE,
    Command,
    Family,
    HeaderParsed,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
    Transport,
    may_be_proxy_header,
    parse_header,
)
from mailgate.protocols.proxy_tlvs import CLIENT_CERT_CONN, CLIENT_CERT_SESS, CLIENT_SSL, SslInfo
from proxy_wire import (
    LOCAL,
    PROXY,
    TCP4,
    TCP6,
    UDP4,
    UNIX_STREAM,
    UNSPEC,
    inet,
    ssl_tlv,
    tlv,
    unix,
    v2,
)

# What a client sends first after the header; it belongs to IMAP and must survive untouched.
MAIL = b"a1 CAPABILITY\r\n\x00\xff\r\n"


def parse_every_way(data: bytes) -> ProxyHeader:
    """The header parsed from `data` fed whole, bytewise and with trailing bytes (all agree)."""
    whole = ProxyHeaderParser().receive(data)
    assert isinstance(whole, HeaderParsed) and whole.trailing == b""

    bytewise = ProxyHeaderParser()
    for byte in data[:-1]:
        assert bytewise.receive(bytes([byte])) is NEED_MORE
    last = bytewise.receive(data[-1:])
    assert isinstance(last, HeaderParsed) and last.trailing == b""

    trailing = ProxyHeaderParser().receive(data + MAIL)
    assert isinstance(trailing, HeaderParsed) and trailing.trailing == MAIL

    split = ProxyHeaderParser()
    assert split.receive(data[:5]) is NEED_MORE
    rest = split.receive(data[5:] + MAIL[:3])
    assert isinstance(rest, HeaderParsed) and rest.trailing == MAIL[:3]

    assert whole.header == last.header == trailing.header == rest.header
    assert whole.length == last.length == trailing.length == rest.length == len(data)
    assert parse_header(data + MAIL) == trailing
    return whole.header


def refused(data: bytes) -> str:
    """The log text of the error `data` raises, fed whole and bytewise (same text both ways)."""
    with pytest.raises(ProxyProtocolError) as whole:
        ProxyHeaderParser().receive(data)
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError) as bytewise:
        for byte in data:
            parser.receive(bytes([byte]))
    assert whole.value.log_text == bytewise.value.log_text
    return whole.value.log_text


# --- version 1 --------------------------------------------------------------------------------


def test_v1_spec_example_keeps_the_request_after_it():
    header = parse_every_way(b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n")
    assert header == ProxyHeader(
        1, Command.PROXY, Family.INET, Transport.STREAM, "192.168.0.1", 56324, "192.168.0.11", 443
    )
    assert header.client == ("192.168.0.1", 56324)
    done = ProxyHeaderParser().receive(
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n"
    )
    assert isinstance(done, HeaderParsed) and done.trailing == b"GET / HTTP/1.1\r\n"


def test_v1_tcp6_as_haproxy_writes_it():
    header = parse_every_way(b"PROXY TCP6 2001:db8::1 2001:db8:0:0:0:0:0:2 40000 993\r\n")
    assert (header.family, header.source_ip, header.destination_ip) == (
        Family.INET6,
        "2001:db8::1",
        "2001:db8::2",
    )
    assert (header.source_port, header.destination_port) == (40000, 993)


def test_v1_ipv4_mapped_client_is_given_in_its_ipv4_form():
    header = parse_every_way(b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 1 143\r\n")
    assert header.client == ("192.0.2.7", 1)
    assert header.destination_ip == "10.0.0.1"


def test_v1_longest_lines_the_spec_allows():
    full = "ffff:" * 7 + "ffff"
    tcp6 = f"PROXY TCP6 {full} {full} 65535 65535\r\n".encode()
    assert len(tcp6) == 104
    assert parse_every_way(tcp6).source_port == 65535
    worst = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(worst) == 107
    assert parse_every_way(worst).family is Family.UNSPEC


def test_v1_line_over_107_bytes_is_refused_without_waiting_for_more():
    long = b"PROXY UNKNOWN " + b"f" * 91 + b"\r\n"
    assert len(long) == 107
    parse_every_way(long)
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107"):
        parser.receive(b"PROXY UNKNOWN " + b"f" * 92 + b"\r")


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN 1.2.3.4 x y z\r\n"])
def test_v1_unknown_means_use_the_real_connection(line):
    header = parse_every_way(line)
    assert header == ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
    assert header.client is None


@pytest.mark.parametrize(
    ("line", "why"),
    [
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "canonical IPv4"),
        (b"PROXY TCP4 0x1.2.3.4 5.6.7.8 1 2\r\n", "dotted decimal"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "dotted decimal"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6"),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "zone"),
        (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "canonical IPv6"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 143\r\n", "leading zero"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 143\r\n", "above 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 143\r\n", "not a decimal"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 143\r\n", "not a decimal"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8  143\r\n", "not a decimal"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "4 fields"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "4 fields"),
        (b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n", "4 fields"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY UNKNOWNX\r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY \r\n", "not TCP4, TCP6 or UNKNOWN"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "control"),
        (b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n", "control"),
        (b"PROXY TCP4 1.2.3.4\t5.6.7.8 1 2\r\n", "control"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\xc2\xa0\r\n", "control or non-ASCII"),
        (b"PROXY UNKNOWN \x00\r\n", "control"),
        (b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad signature"),
        (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "bad signature"),
    ],
)
def test_v1_malformed_lines_are_refused(line, why):
    assert why in refused(line)


def test_v1_bare_lf_is_refused_at_once_not_at_107_bytes():
    parser = ProxyHeaderParser()
    assert parser.receive(b"PROXY TCP4 1.2.3.4") is NEED_MORE
    with pytest.raises(ProxyProtocolError, match="control"):
        parser.receive(b"\n")


def test_error_text_never_echoes_the_peer():
    for data in (b"PROXY TCP4 secret-token 5.6.7.8 1 2\r\n", b"secret-token\r\n"):
        assert "secret" not in refused(data)


# --- version 2 --------------------------------------------------------------------------------


def test_v2_proxy_tcp4():
    header = parse_every_way(v2(PROXY, TCP4, inet("203.0.113.9", "10.0.0.5", 51234, 143)))
    assert header == ProxyHeader(
        2, Command.PROXY, Family.INET, Transport.STREAM, "203.0.113.9", 51234, "10.0.0.5", 143
    )
    assert header.client == ("203.0.113.9", 51234)


def test_v2_proxy_tcp6_and_mapped():
    header = parse_every_way(v2(PROXY, TCP6, inet("2001:db8::7", "2001:db8::1", 1, 993)))
    assert (header.family, header.client) == (Family.INET6, ("2001:db8::7", 1))
    mapped = parse_every_way(v2(PROXY, TCP6, inet("::ffff:198.51.100.2", "::1", 2, 143)))
    assert mapped.client == ("198.51.100.2", 2)


def test_v2_udp_is_parsed_and_says_so():
    header = parse_every_way(v2(PROXY, UDP4, inet("192.0.2.1", "192.0.2.2", 53, 53)))
    assert (header.transport, header.client) == (Transport.DGRAM, ("192.0.2.1", 53))


def test_v2_unix_paths():
    header = parse_every_way(v2(PROXY, UNIX_STREAM, unix(b"/run/client.sock", b"\0abstract")))
    assert (header.family, header.transport) == (Family.UNIX, Transport.STREAM)
    assert (header.source_path, header.destination_path) == ("/run/client.sock", "")
    assert header.source_ip is None and header.client is None


def test_v2_proxy_unspec_uses_the_real_connection():
    header = parse_every_way(v2(PROXY, UNSPEC))
    assert header.family is Family.UNSPEC and header.client is None


def test_v2_local_health_check():
    header = parse_every_way(v2(LOCAL, UNSPEC))
    assert header == ProxyHeader(2, Command.LOCAL, Family.UNSPEC, Transport.UNSPEC)
    assert header.client is None


def test_v2_local_ignores_addresses_family_and_a_block_that_does_not_parse():
    with_addresses = parse_every_way(v2(LOCAL, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2)))
    assert with_addresses.source_ip is None and with_addresses.client is None
    assert parse_every_way(v2(LOCAL, 0xFF, b"junk")).family is Family.UNSPEC
    assert parse_every_way(v2(LOCAL, TCP4, b"short")).source_ip is None
    assert parse_every_way(v2(LOCAL, UNSPEC, b"\x01\xff")).alpn is None
    checked = parse_every_way(v2(LOCAL, UNSPEC, tlvs=tlv(0x02, b"mail.example.com"), crc=True))
    assert checked.authority == "mail.example.com" and checked.crc32c_checked


def test_v2_tlvs_as_haproxy_sends_them():
    ssl = ssl_tlv(
        CLIENT_SSL | CLIENT_CERT_CONN | CLIENT_CERT_SESS,
        0,
        (0x21, b"TLSv1.3"),
        (0x22, "Jürgen Client".encode()),
        (0x23, b"TLS_AES_256_GCM_SHA384"),
        (0x24, b"RSA-SHA256"),
        (0x25, b"RSA2048"),
        (0x2F, b"unknown sub-TLV"),
    )
    tlvs = (
        tlv(0x01, b"imap")
        + tlv(0x02, b"mail.example.com")
        + tlv(0x04, b"")
        + tlv(0x05, b"\x00" * 128)
        + ssl
        + tlv(0x30, b"blue")
        + tlv(0xE0, b"custom")
        + tlv(0x04, b"pad")
        + tlv(0xEA, b"\x01vpce-123")
    )
    header = parse_every_way(v2(PROXY, TCP4, inet("192.0.2.1", "192.0.2.2", 1, 993), tlvs))
    assert header.alpn == b"imap"
    assert header.authority == "mail.example.com"
    assert header.unique_id == b"\x00" * 128
    assert header.netns == "blue"
    assert header.skipped_tlvs == (0xE0, 0xEA)
    assert header.ssl == SslInfo(
        7, 0, "TLSv1.3", "Jürgen Client", "TLS_AES_256_GCM_SHA384", "RSA-SHA256", "RSA2048"
    )
    assert header.ssl.tls and header.ssl.client_cert and header.ssl.cert_verified
    assert not header.crc32c_checked


def test_v2_ssl_without_a_certificate_is_not_verified():
    ssl = ssl_tlv(CLIENT_SSL, 0, (0x21, b"TLSv1.2"))
    header = parse_every_way(v2(PROXY, TCP4, inet("1.1.1.1", "2.2.2.2", 1, 2), ssl))
    assert header.ssl is not None and header.ssl.tls
    assert not header.ssl.client_cert and not header.ssl.cert_verified
    failed = ssl_tlv(CLIENT_SSL | CLIENT_CERT_CONN, 21, (0x22, b"mallory"))
    header = parse_every_way(v2(PROXY, TCP4, inet("1.1.1.1", "2.2.2.2", 1, 2), failed))
    assert header.ssl.cn == "mallory" and not header.ssl.cert_verified


def test_v2_crc32c_checked():
    addresses = inet("192.0.2.1", "192.0.2.2", 1000, 143)
    good = v2(PROXY, TCP4, addresses, tlv(0x02, b"sni.example"), crc=True)
    assert parse_every_way(good).crc32c_checked
    for at in (17, len(good) - 9, len(good) - 1):  # an address, a TLV and the CRC itself
        bad = bytearray(good)
        bad[at] ^= 0x01
        assert "CRC32C does not match" in refused(bytes(bad))
    local = bytearray(v2(LOCAL, UNSPEC, crc=True))
    local[-1] ^= 0xFF
    assert "CRC32C does not match" in refused(bytes(local))


def test_v2_length_cap_is_checked_before_the_body_arrives():
    parser = ProxyHeaderParser()
    fixed = v2(PROXY, TCP4, b"\0" * (MAX_V2_HEADER - 16 + 1))[:16]
    with pytest.raises(ProxyProtocolError, match="over the cap of 4096"):
        parser.receive(fixed)
    at_cap = v2(PROXY, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2), tlv(0xE1, b"x" * 4065))
    assert len(at_cap) == MAX_V2_HEADER
    assert parse_every_way(at_cap).skipped_tlvs == (0xE1,)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (v2(0x11, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2)), "version is 1, not 2"),
        (v2(0x31, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2)), "version is 3"),
        (v2(0x22, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2)), "command 2"),
        (v2(0x2F, UNSPEC), "command 15"),
        (v2(PROXY, 0x41, b"\0" * 12), "family/transport 0x41"),
        (v2(PROXY, 0x13, b"\0" * 12), "family/transport 0x13"),
        (v2(PROXY, TCP4, b"\0" * 11), "address block truncated to 11"),
        (v2(PROXY, TCP6, b"\0" * 12), "address block truncated to 12"),
        (v2(PROXY, UNIX_STREAM, b"\0" * 215), "address block truncated to 215"),
        (v2(PROXY, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2), b"\x02\x00"), "inside a TLV header"),
        (v2(PROXY, TCP4, inet("1.2.3.4", "5.6.7.8", 1, 2), b"\x02\x00\x05abc"), "runs past"),
        (v2(PROXY, UNSPEC, tlvs=b"\xe0\x00\x09abc"), "TLV 0xe0 runs past"),
        (v2(PROXY, UNSPEC, tlvs=tlv(2, b"a") + tlv(2, b"b")), "AUTHORITY appears twice"),
        (v2(PROXY, UNSPEC, tlvs=tlv(2, b"a\r\nb")), "control character"),
        (v2(PROXY, UNSPEC, tlvs=tlv(2, b"\xff")), "not UTF-8"),
        (v2(PROXY, UNSPEC, tlvs=tlv(2, b"")), "empty"),
        (v2(PROXY, UNSPEC, tlvs=tlv(0x30, "é".encode())), "NETNS is not ASCII"),
        (v2(PROXY, UNSPEC, tlvs=tlv(5, b"u" * 129)), "UNIQUE_ID is 129 bytes"),
        (v2(PROXY, UNSPEC, tlvs=tlv(3, b"abc")), "CRC32C TLV is 3 bytes"),
        (v2(PROXY, UNSPEC, tlvs=tlv(0x20, b"\x01\0\0\0")), "SSL TLV is 4 bytes"),
        (v2(PROXY, UNSPEC, tlvs=ssl_tlv(1, 0, (0x22, b"a\x00"))), "SSL CN is empty or"),
        (v2(PROXY, UNSPEC, tlvs=ssl_tlv(1, 0, (0x21, b"a"), (0x21, b"b"))), "VERSION appears"),
        (v2(PROXY, UNSPEC, tlvs=tlv(0x20, b"\x01\0\0\0\0\x22\x00")), "SSL TLV ends inside"),
        (b"\r\n\r\n\x00\r\nQUIT\r", "bad signature"),
        (b"\r\n\r\n\x00\n", "bad signature"),
    ],
)
def test_v2_malformed_headers_are_refused(data, why):
    assert why in refused(data)


def test_v2_bad_version_command_and_family_are_refused_before_the_length_arrives():
    for prefix, why in [
        (b"\r\n\r\n\x00\r\nQUIT\n\x11", "version"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x23", "command"),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x44", "family"),
    ]:
        with pytest.raises(ProxyProtocolError, match=why):
            ProxyHeaderParser().receive(prefix)
    assert ProxyHeaderParser().receive(b"\r\n\r\n\x00\r\nQUIT\n\x20\x44") is NEED_MORE


# --- the stream around the header -------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"PROXY TCP4 1.2.3.4 5.6.7.8 1", b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c\x01\x02"],
)
def test_eof_before_the_header_is_complete(data):
    parser = ProxyHeaderParser()
    if data:
        assert parser.receive(data) is NEED_MORE
    with pytest.raises(ProxyProtocolError, match=f"closed after {len(data)} bytes"):
        parser.receive(b"")


def test_a_mail_client_is_refused_at_its_first_byte():
    for first in (b"a", b"E", b"\x16", b"P\x00", b"\r\n\r\nX"):
        assert not may_be_proxy_header(first)
        with pytest.raises(ProxyProtocolError, match="bad signature"):
            ProxyHeaderParser().receive(first)


@pytest.mark.parametrize(
    "data",
    [b"", b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 junk", b"\r", b"\r\n\r\n\x00\r\nQUI",
     v2(PROXY, UNSPEC) + b"anything"],
)  # fmt: skip
def test_may_be_proxy_header(data):
    assert may_be_proxy_header(data)


@pytest.mark.parametrize(
    "data", [b"a1 LOGIN", b"EHLO x", b"USER x", b"\x16\x03\x01", b"GET /", b"PROXY\r\n"]
)
def test_cannot_be_proxy_header(data):
    assert not may_be_proxy_header(data)


def test_the_parser_is_single_use():
    parser = ProxyHeaderParser()
    assert isinstance(parser.receive(v2(LOCAL, UNSPEC)), HeaderParsed)
    with pytest.raises(RuntimeError):
        parser.receive(b"x")
    failed = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        failed.receive(b"x")
    with pytest.raises(RuntimeError):
        failed.receive(b"PROXY UNKNOWN\r\n")


def test_parse_header_is_one_look_without_state():
    data = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n\x16\x03\x01"
    assert parse_header(b"") is NEED_MORE
    assert parse_header(data[:20]) is NEED_MORE
    peeked = parse_header(data)
    assert isinstance(peeked, HeaderParsed)
    assert peeked.length == len(data) - 3 and peeked.trailing == b"\x16\x03\x01"
    with pytest.raises(ProxyProtocolError):
        parse_header(b"\x16\x03\x01")
