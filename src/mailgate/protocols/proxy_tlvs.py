"""The TLVs of a PROXY protocol v2 header (HAProxy's proxy-protocol.txt, section 2.2).

`parse_tlvs(block)` reads the type-length-value list that follows the address block. It only
checks structure and decodes the types mailgate uses; the CRC32C is returned with its offset
so `proxy_protocol.py`, which holds the whole header, can check it. Unknown types are skipped
(their numbers are kept for the log). Every failure is a `TlvError` with a safe text.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum

# The spec limits PP2_TYPE_UNIQUE_ID to 128 bytes.
MAX_UNIQUE_ID = 128
TLV_HEADER = 3  # type, 16-bit length


class Tlv(Enum):
    ALPN = 0x01
    AUTHORITY = 0x02
    CRC32C = 0x03
    NOOP = 0x04
    UNIQUE_ID = 0x05
    SSL = 0x20
    NETNS = 0x30


class SslSubTlv(Enum):
    VERSION = 0x21
    CN = 0x22
    CIPHER = 0x23
    SIG_ALG = 0x24
    KEY_ALG = 0x25


# PP2_CLIENT_* bits of the SSL TLV's client field.
CLIENT_SSL = 0x01
CLIENT_CERT_CONN = 0x02
CLIENT_CERT_SESS = 0x04

# Sub-TLVs of PP2_TYPE_SSL we read, with their encoding; others are skipped.
_SSL_ENCODING = {
    SslSubTlv.VERSION: "ascii",
    SslSubTlv.CN: "utf-8",
    SslSubTlv.CIPHER: "ascii",
    SslSubTlv.SIG_ALG: "ascii",
    SslSubTlv.KEY_ALG: "ascii",
}
_SSL_SUBTYPES = frozenset(s.value for s in SslSubTlv)


class TlvError(ValueError):
    """The TLV block is malformed. The message is ours (numbers and names), safe to log."""


@dataclass(frozen=True, slots=True)
class SslInfo:
    """PP2_TYPE_SSL: what the proxy knows of the client's TLS session (when it terminates it)."""

    client: int  # CLIENT_* bits
    verify: int  # 0: the certificate verified, or none was presented (see cert_verified)
    version: str | None = None  # "TLSv1.3"
    cn: str | None = None  # the client certificate's subject CN
    cipher: str | None = None  # "TLS_AES_256_GCM_SHA384"
    sig_alg: str | None = None  # of the certificate, e.g. "RSA-SHA256"
    key_alg: str | None = None  # e.g. "RSA2048", "EC256"

    @property
    def tls(self) -> bool:
        return bool(self.client & CLIENT_SSL)

    @property
    def client_cert(self) -> bool:
        """The client presented a certificate on this connection or its TLS session."""
        return bool(self.client & (CLIENT_CERT_CONN | CLIENT_CERT_SESS))

    @property
    def cert_verified(self) -> bool:
        # verify is 0 also when no certificate was presented, so the flags must say one was.
        return self.client_cert and self.verify == 0


@dataclass(frozen=True, slots=True)
class Tlvs:
    alpn: bytes | None = None
    authority: str | None = None  # the client's SNI as the proxy saw it
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: SslInfo | None = None
    # (offset of the 4 checksum bytes within the block, the checksum) when a CRC32C is present
    crc32c: tuple[int, int] | None = None
    skipped: tuple[int, ...] = ()  # types not interpreted, in order


NO_TLVS = Tlvs()


def tlv_items(block: bytes, where: str = "TLV block") -> list[tuple[int, int, bytes]]:
    """(type, offset of the value within `block`, value) of each TLV, bounds checked."""
    items, at = [], 0
    while at < len(block):
        if at + TLV_HEADER > len(block):
            raise TlvError(f"v2 {where} ends inside a TLV header")
        kind, length = block[at], struct.unpack_from("!H", block, at + 1)[0]
        start = at + TLV_HEADER
        if start + length > len(block):
            raise TlvError(f"v2 {where}: TLV 0x{kind:02x} runs past the end")
        items.append((kind, start, block[start : start + length]))
        at = start + length
    return items


def parse_tlvs(block: bytes) -> Tlvs:
    """The TLVs of `block` (everything after the address block). Raises TlvError."""
    alpn: bytes | None = None
    authority: str | None = None
    unique_id: bytes | None = None
    netns: str | None = None
    ssl: SslInfo | None = None
    crc32c: tuple[int, int] | None = None
    skipped: list[int] = []
    seen: set[int] = set()
    for kind, offset, value in tlv_items(block):
        if kind in seen and kind in _INTERPRETED:
            raise TlvError(f"v2 TLV {Tlv(kind).name} appears twice")
        seen.add(kind)
        if kind == Tlv.ALPN.value:
            alpn = value
        elif kind == Tlv.AUTHORITY.value:
            authority = text(value, "AUTHORITY", "utf-8")
        elif kind == Tlv.CRC32C.value:
            if len(value) != 4:
                raise TlvError(f"v2 CRC32C TLV is {len(value)} bytes, not 4")
            crc32c = offset, struct.unpack("!I", value)[0]
        elif kind == Tlv.UNIQUE_ID.value:
            if len(value) > MAX_UNIQUE_ID:
                raise TlvError(f"v2 UNIQUE_ID is {len(value)} bytes, over {MAX_UNIQUE_ID}")
            unique_id = value
        elif kind == Tlv.SSL.value:
            ssl = _ssl(value)
        elif kind == Tlv.NETNS.value:
            netns = text(value, "NETNS", "ascii")
        elif kind != Tlv.NOOP.value:
            skipped.append(kind)
    return Tlvs(alpn, authority, unique_id, netns, ssl, crc32c, tuple(skipped))


# Types whose meaning we take: a second copy would be ambiguous, so it is refused.
_INTERPRETED = frozenset(t.value for t in Tlv) - {Tlv.NOOP.value}


def text(value: bytes, what: str, encoding: str) -> str:
    """A string TLV. Control bytes are refused: these values reach logs and auth headers."""
    try:
        decoded = value.decode(encoding)
    except UnicodeDecodeError:
        raise TlvError(f"v2 {what} is not {encoding.upper()}") from None
    if not decoded or any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise TlvError(f"v2 {what} is empty or holds a control character")
    return decoded


def _ssl(value: bytes) -> SslInfo:
    if len(value) < 5:
        raise TlvError(f"v2 SSL TLV is {len(value)} bytes, under 5")
    client, verify = struct.unpack_from("!BI", value)
    found: dict[SslSubTlv, str] = {}
    for kind, _, sub in tlv_items(value[5:], "SSL TLV"):
        if kind not in _SSL_SUBTYPES:
            continue  # unknown sub-TLVs are skipped like unknown TLVs
        subtype = SslSubTlv(kind)
        if subtype in found:
            raise TlvError(f"v2 SSL sub-TLV {subtype.name} appears twice")
        found[subtype] = text(sub, f"SSL {subtype.name}", _SSL_ENCODING[subtype])
    return SslInfo(
        client, verify,
        found.get(SslSubTlv.VERSION), found.get(SslSubTlv.CN), found.get(SslSubTlv.CIPHER),
        found.get(SslSubTlv.SIG_ALG), found.get(SslSubTlv.KEY_ALG),
    )  # fmt: skip
