"""PROXY protocol v1 and v2, receiver side (HAProxy's proxy-protocol.txt), sans-I/O.

A load balancer in front of mailgate (HAProxy `send-proxy` / `send-proxy-v2`) prepends one
header to each connection that names the real client. `ProxyHeaderParser.receive(data)` takes
the first bytes of a connection, fed in any split, and returns `NEED_MORE` or `HeaderParsed`
(the header plus the bytes after it, which belong to the mail protocol and are returned exactly
as they came); anything that is not a well-formed header raises `ProxyProtocolError`, whose
`log_text` is built from our own words and numbers only, never from the peer's bytes.

The parser never buffers more than the header can be: 107 bytes for v1 (the spec's limit) and
`MAX_V2_HEADER` for v2. It fails as early as the bytes allow, so a peer that is not speaking
the protocol is refused at its first wrong byte instead of at the timeout.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from enum import Enum

import google_crc32c

from mailgate.protocols.proxy_tlvs import NO_TLVS, SslInfo, TlvError, Tlvs, parse_tlvs

__all__ = [
    "MAX_V2_HEADER",
    "NEED_MORE",
    "Command",
    "Family",
    "HeaderParsed",
    "NeedMore",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyProtocolError",
    "SslInfo",
    "Transport",
    "may_be_proxy_header",
    "parse_header",
]

V1_PREFIX = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's worst case, "PROXY UNKNOWN <ipv6> <ipv6> 65535 65535\r\n", is 107 bytes.
V1_MAX_LINE = 107
V2_FIXED = 16  # signature, version/command, family/transport, length
# v2 allows 16 + 65535 bytes. HAProxy sends a few hundred at most (addresses, ALPN, authority,
# unique id up to 128, the SSL TLV with version, cipher, algorithms and client CN), and the spec
# means the header to fit one 536-byte segment without TLVs; 4096 leaves room for any sane
# sender while a hostile one cannot make us hold 64 KiB per connection before we know anything.
MAX_V2_HEADER = 4096

_V1_FAMILIES = {b"TCP4": 4, b"TCP6": 6}
_DIGITS = frozenset(b"0123456789")
_PRINTABLE = frozenset(range(0x20, 0x7F))


class Command(Enum):
    LOCAL = 0  # the proxy's own connection (health check): use the real endpoints
    PROXY = 1  # relayed for a client named in the header


class Family(Enum):
    UNSPEC = 0
    INET = 1
    INET6 = 2
    UNIX = 3


class Transport(Enum):
    UNSPEC = 0
    STREAM = 1
    DGRAM = 2


# Address block length per v2 family (both addresses and, for INET/INET6, both ports).
_ADDRESS_LENGTH = {Family.UNSPEC: 0, Family.INET: 12, Family.INET6: 36, Family.UNIX: 216}


class ProxyProtocolError(Exception):
    """Not a valid PROXY header: the connection must be closed. `log_text` is safe to log."""

    def __init__(self, log_text: str) -> None:
        super().__init__(log_text)
        self.log_text = log_text


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. Addresses are None for LOCAL, UNKNOWN/UNSPEC and (ip) UNIX."""

    version: int  # 1 or 2
    command: Command
    family: Family
    transport: Transport
    source_ip: str | None = None  # an IPv4-mapped IPv6 address is given in its IPv4 form
    source_port: int | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    source_path: str | None = None  # AF_UNIX only
    destination_path: str | None = None
    alpn: bytes | None = None
    authority: str | None = None  # the client's SNI, as the proxy saw it
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: SslInfo | None = None
    crc32c_checked: bool = False  # a PP2_TYPE_CRC32C was present and matched
    skipped_tlvs: tuple[int, ...] = ()  # types we do not interpret, in order

    @property
    def client(self) -> tuple[str, int] | None:
        """The real client's (ip, port), or None: then use the connection's own peer."""
        if self.command is Command.PROXY and self.source_ip is not None:
            assert self.source_port is not None
            return self.source_ip, self.source_port
        return None


@dataclass(frozen=True, slots=True)
class NeedMore:
    """The header is not complete yet: read more and call `receive` again."""


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class HeaderParsed:
    header: ProxyHeader
    length: int  # bytes the header took on the wire
    trailing: bytes  # the bytes after it that were fed: the mail protocol's (or TLS's) first


def parse_header(data: bytes) -> NeedMore | HeaderParsed:
    """One look at a connection's first bytes, keeping no state: for a peek (MSG_PEEK).

    On an implicit-TLS listener the driver can peek, then consume exactly `length` bytes, so
    the ClientHello behind the header stays in the socket for the TLS layer. Raises
    ProxyProtocolError as `ProxyHeaderParser.receive` does.
    """
    return ProxyHeaderParser().receive(data) if data else NEED_MORE


def may_be_proxy_header(data: bytes) -> bool:
    """False once `data` cannot be the start of a v1 or v2 header (a client speaking mail)."""
    return any(data[: len(sig)] == sig[: len(data)] for sig in (V1_PREFIX, V2_SIGNATURE))


class ProxyHeaderParser:
    """Incremental parser for the one header at the start of a connection. Single use."""

    __slots__ = ("_buffer", "_done", "_max_v2")

    def __init__(self, max_v2_header: int = MAX_V2_HEADER) -> None:
        self._buffer = bytearray()
        self._max_v2 = max_v2_header
        self._done = False

    def receive(self, data: bytes) -> NeedMore | HeaderParsed:
        """Feed bytes as they arrive; b"" means the peer closed. Raises ProxyProtocolError."""
        if self._done:
            raise RuntimeError("the PROXY header was already parsed")
        if not data:
            self._done = True
            raise ProxyProtocolError(f"closed after {len(self._buffer)} bytes of a PROXY header")
        self._buffer += data
        try:
            result = self._parse()
        except ProxyProtocolError:
            self._done = True
            raise
        if isinstance(result, HeaderParsed):
            self._done = True
            self._buffer = bytearray()
        return result

    def _parse(self) -> NeedMore | HeaderParsed:
        buf = bytes(self._buffer)
        if not may_be_proxy_header(buf):
            raise ProxyProtocolError("not a PROXY protocol header (bad signature)")
        if buf.startswith(V1_PREFIX):
            return _parse_v1(buf)
        if buf.startswith(V2_SIGNATURE):
            return _parse_v2(buf, self._max_v2)
        return NEED_MORE


# --- version 1: one line of text --------------------------------------------------------------


def _parse_v1(buf: bytes) -> NeedMore | HeaderParsed:
    end = buf.find(b"\r\n", 0, V1_MAX_LINE)
    line = buf[: end if end >= 0 else min(len(buf), V1_MAX_LINE)]
    if not _PRINTABLE.issuperset(line.removesuffix(b"\r")):
        raise ProxyProtocolError("v1 line holds a control or non-ASCII byte")
    if end < 0:
        if len(buf) >= V1_MAX_LINE:
            raise ProxyProtocolError(f"v1 line has no CRLF within {V1_MAX_LINE} bytes")
        return NEED_MORE
    return HeaderParsed(_v1_header(line[len(V1_PREFIX) :]), end + 2, buf[end + 2 :])


def _v1_header(rest: bytes) -> ProxyHeader:
    parts = rest.split(b" ")
    if parts[0] == b"UNKNOWN":
        # The spec: the receiver ignores whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(1, Command.PROXY, Family.UNSPEC, Transport.UNSPEC)
    version = _V1_FAMILIES.get(parts[0])
    if version is None:
        raise ProxyProtocolError("v1 protocol is not TCP4, TCP6 or UNKNOWN")
    if len(parts) != 5:
        raise ProxyProtocolError("v1 line does not have 4 fields after the protocol")
    source, destination = (_v1_address(p, version) for p in parts[1:3])
    source_port, destination_port = (_v1_port(p) for p in parts[3:5])
    family = Family.INET if version == 4 else Family.INET6
    return ProxyHeader(
        1, Command.PROXY, family, Transport.STREAM,
        source, source_port, destination, destination_port,
    )  # fmt: skip


def _v1_address(text: bytes, version: int) -> str:
    """The address in the canonical form the spec asks for (no leading zeros, no zone)."""
    if version == 4 and not _DIGITS.union(b".").issuperset(text):
        raise ProxyProtocolError("v1 IPv4 address is not dotted decimal")
    if version == 6 and b"%" in text:
        raise ProxyProtocolError("v1 IPv6 address carries a zone")
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except ValueError:
        raise ProxyProtocolError(f"v1 address is not a canonical IPv{version} address") from None
    if address.version != version:
        raise ProxyProtocolError(f"v1 address is not an IPv{version} address")
    return _ip_text(address)


def _v1_port(text: bytes) -> int:
    if not text or not _DIGITS.issuperset(text) or len(text) > 5:
        raise ProxyProtocolError("v1 port is not a decimal number")
    if text.startswith(b"0") and text != b"0":
        raise ProxyProtocolError("v1 port has a leading zero")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError("v1 port is above 65535")
    return port


def _ip_text(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    # A proxy listening on :: reports an IPv4 client as ::ffff:a.b.c.d; one client, one text.
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped if mapped is not None else address)


# --- version 2: binary ------------------------------------------------------------------------


def _parse_v2(buf: bytes, max_header: int) -> NeedMore | HeaderParsed:
    if len(buf) > 12:
        _check_version_and_command(buf[12])
    if len(buf) > 13 and buf[12] & 0x0F == Command.PROXY.value:
        _family(buf[13])  # a PROXY command needs a family we know
    if len(buf) < V2_FIXED:
        return NEED_MORE
    length = struct.unpack_from("!H", buf, 14)[0]
    total = V2_FIXED + length
    if total > max_header:
        raise ProxyProtocolError(f"v2 header of {total} bytes is over the cap of {max_header}")
    command = Command(buf[12] & 0x0F)
    if command is Command.PROXY and length < _ADDRESS_LENGTH[_family(buf[13])[0]]:
        raise ProxyProtocolError(f"v2 address block truncated to {length} bytes")
    if len(buf) < total:
        return NEED_MORE
    return HeaderParsed(_v2_header(buf[:total], command), total, buf[total:])


def _check_version_and_command(byte: int) -> None:
    if byte >> 4 != 2:
        raise ProxyProtocolError(f"v2 version is {byte >> 4}, not 2")
    if byte & 0x0F not in (Command.LOCAL.value, Command.PROXY.value):
        raise ProxyProtocolError(f"v2 command {byte & 0x0F} is neither LOCAL nor PROXY")


def _family(byte: int) -> tuple[Family, Transport]:
    try:
        return Family(byte >> 4), Transport(byte & 0x0F)
    except ValueError:
        raise ProxyProtocolError(f"v2 family/transport 0x{byte:02x} is not defined") from None


def _v2_header(header: bytes, command: Command) -> ProxyHeader:
    if command is Command.LOCAL:
        return _v2_local(header)
    family, transport = _family(header[13])
    start, end = V2_FIXED, V2_FIXED + _ADDRESS_LENGTH[family]
    try:
        tlvs = parse_tlvs(header[end:])
    except TlvError as e:
        raise ProxyProtocolError(str(e)) from None
    _check_crc32c(header, end, tlvs)
    return _build(2, command, family, transport, _addresses(family, header[start:end]), tlvs)


def _v2_local(header: bytes) -> ProxyHeader:
    """LOCAL: the spec says to accept it and ignore the address block and even the family.

    HAProxy's health checks send no addresses but may send TLVs after them; those are parsed
    when the family says where they start, and a block that does not parse is ignored. A CRC32C
    that is present and wrong still refuses the connection, as the spec requires.
    """
    try:
        family, transport = _family(header[13])
    except ProxyProtocolError:
        family, transport = Family.UNSPEC, Transport.UNSPEC
    end = V2_FIXED + _ADDRESS_LENGTH[family]
    try:
        tlvs = parse_tlvs(header[end:]) if end <= len(header) else NO_TLVS
    except TlvError:
        tlvs = NO_TLVS
    _check_crc32c(header, end, tlvs)
    return _build(2, Command.LOCAL, family, transport, _Addresses(), tlvs)


def _check_crc32c(header: bytes, tlv_start: int, tlvs: Tlvs) -> None:
    if tlvs.crc32c is None:
        return
    offset, expected = tlvs.crc32c
    at = tlv_start + offset
    if google_crc32c.value(header[:at] + b"\0\0\0\0" + header[at + 4 :]) != expected:
        raise ProxyProtocolError("v2 CRC32C does not match the header")


@dataclass(slots=True)
class _Addresses:
    source_ip: str | None = None
    source_port: int | None = None
    destination_ip: str | None = None
    destination_port: int | None = None
    source_path: str | None = None
    destination_path: str | None = None


def _addresses(family: Family, block: bytes) -> _Addresses:
    if family is Family.INET or family is Family.INET6:
        size = 4 if family is Family.INET else 16
        source = ipaddress.ip_address(block[:size])
        destination = ipaddress.ip_address(block[size : 2 * size])
        source_port, destination_port = struct.unpack_from("!HH", block, 2 * size)
        return _Addresses(_ip_text(source), source_port, _ip_text(destination), destination_port)
    if family is Family.UNIX:
        return _Addresses(source_path=_unix_path(block[:108]),
                          destination_path=_unix_path(block[108:]))  # fmt: skip
    return _Addresses()


def _unix_path(raw: bytes) -> str:
    # sun_path is NUL-padded; an abstract socket starts with NUL and comes out empty.
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def _build(
    version: int,
    command: Command,
    family: Family,
    transport: Transport,
    where: _Addresses,
    tlvs: Tlvs,
) -> ProxyHeader:
    return ProxyHeader(
        version, command, family, transport,
        where.source_ip, where.source_port, where.destination_ip, where.destination_port,
        where.source_path, where.destination_path,
        tlvs.alpn, tlvs.authority, tlvs.unique_id, tlvs.netns, tlvs.ssl,
        tlvs.crc32c is not None, tlvs.skipped,
    )  # fmt: skip
