"""Build PROXY protocol headers as a sender does, for the parser's tests and fuzz seeds.

Written from HAProxy's proxy-protocol.txt, independently of the parser under test, so a shared
misreading of the spec would have to be made twice.
"""

from __future__ import annotations

import ipaddress
import struct

import google_crc32c

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
LOCAL, PROXY = 0x20, 0x21  # version 2 in the high nibble
TCP4, UDP4, TCP6, UDP6, UNIX_STREAM, UNIX_DGRAM, UNSPEC = 0x11, 0x12, 0x21, 0x22, 0x31, 0x32, 0x00


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def ssl_tlv(client: int, verify: int, *subs: tuple[int, bytes]) -> bytes:
    return tlv(0x20, struct.pack("!BI", client, verify) + b"".join(tlv(k, v) for k, v in subs))


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    return a.packed + b.packed + struct.pack("!HH", sport, dport)


def unix(src: bytes, dst: bytes) -> bytes:
    return src.ljust(108, b"\0") + dst.ljust(108, b"\0")


def v2(
    ver_cmd: int, fam: int, addresses: bytes = b"", tlvs: bytes = b"", crc: bool = False
) -> bytes:
    """A v2 header; with `crc`, a CRC32C TLV is appended and filled in as the spec says."""
    body = addresses + tlvs
    if crc:
        body += tlv(0x03, b"\0\0\0\0")
    header = SIG + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body
    if crc:
        checksum = struct.pack("!I", google_crc32c.value(header))
        header = header[:-4] + checksum
    return header
