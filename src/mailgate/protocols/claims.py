"""The real client's address as a trusted peer in front claims it (Dovecot's
login_trusted_networks): a webmail host or another proxy logs in for a user and says who the
user is talking from, so that throttling, limits, logs and the auth request see the user's
address, not the webmail's.

Two ways to say it, both parsed here:
- IMAP `ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "51234")` (Dovecot's keys);
- POP3 and SMTP `XCLIENT ADDR=192.0.2.7 PORT=51234` (Postfix's command, which Dovecot's
  pop3-login and submission-login take too): attributes are xtext (RFC 3461 4), an IPv6
  address may carry Postfix's `IPV6:` prefix, `[UNAVAILABLE]` and `[TEMPUNAVAIL]` mean "not
  known".

Whether a claim counts is the core's decision (its policy says whether the connection comes
from `trusted_networks`); what counts is an address ipaddress can read and a port 1..65535.
Sans-I/O and pure.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

ID_IP = b"x-originating-ip"
ID_PORT = b"x-originating-port"
# The attributes Postfix's XCLIENT defines, and Dovecot's additions; others are a syntax error,
# as in Postfix ("501 5.5.4 Bad XCLIENT attribute name").
XCLIENT_NAMES = frozenset(
    {
        "NAME",
        "ADDR",
        "PORT",
        "PROTO",
        "HELO",
        "LOGIN",
        "REVERSE_NAME",
        "DESTADDR",
        "DESTPORT",
        "TTL",
        "SESSION",
        "FORWARD",
        "TIMEOUT",
        "CLIENT-TRANSPORT",
    }
)
UNKNOWN_VALUES = frozenset({"[UNAVAILABLE]", "[TEMPUNAVAIL]"})
# Attributes per XCLIENT line: Postfix's whole list fits well inside.
MAX_ATTRIBUTES = 16
_XTEXT_HEX = re.compile(r"\+([0-9A-F]{2})")


@dataclass(frozen=True, slots=True)
class AddressClaim:
    """Who the client really is, as a trusted peer says: an address, perhaps a port."""

    ip: str
    port: int | None = None


class ClaimSyntax(ValueError):
    """An XCLIENT line that cannot be read (the ID command is lenient: a bad value is
    ignored, as Dovecot ignores it)."""


def from_id(params: Iterable[tuple[bytes, bytes | None]] | None) -> AddressClaim | None:
    """The claim in an IMAP ID parameter list (keys compared without case), if any."""
    ip: str | None = None
    port: int | None = None
    for key, value in params or ():
        name = key.lower()
        if name == ID_IP and value is not None:
            ip = _address(value.decode("ascii", "replace"))
        elif name == ID_PORT and value is not None:
            port = _port(value.decode("ascii", "replace"))
    return AddressClaim(ip, port) if ip is not None else None


def names_address(params: Iterable[tuple[bytes, bytes | None]] | None) -> bool:
    """The ID parameters try to claim an address (to log when the claim does not count)."""
    return any(key.lower() in (ID_IP, ID_PORT) for key, _ in params or ())


def from_xclient(args: bytes) -> AddressClaim | None:
    """The claim in XCLIENT's attributes; None if ADDR is absent or unknown. Raises
    ClaimSyntax for an attribute that is not NAME=xtext, an unknown name, or an ADDR / PORT
    that is neither an address / port nor [UNAVAILABLE]."""
    tokens = args.split()
    if not tokens or len(tokens) > MAX_ATTRIBUTES:
        raise ClaimSyntax("XCLIENT needs 1 to 16 attributes")
    ip: str | None = None
    port: int | None = None
    for token in tokens:
        name, sep, raw = token.decode("ascii", "replace").partition("=")
        name = name.upper()
        if not sep or name not in XCLIENT_NAMES:
            raise ClaimSyntax("bad XCLIENT attribute name")
        value = _xtext(raw)
        if name not in ("ADDR", "PORT") or value.upper() in UNKNOWN_VALUES:
            continue
        if name == "ADDR":
            ip = _address(value[5:] if value[:5].upper() == "IPV6:" else value)
            if ip is None:
                raise ClaimSyntax("bad XCLIENT ADDR")
        else:
            port = _port(value)
            if port is None:
                raise ClaimSyntax("bad XCLIENT PORT")
    return AddressClaim(ip, port) if ip is not None else None


def _xtext(raw: str) -> str:
    """RFC 3461 4: "+HH" stands for the octet HH."""
    if "+" not in raw:
        return raw
    return _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), raw)


def _address(text: str) -> str | None:
    """An IPv4 or IPv6 address in its normal form (an IPv4-mapped one as IPv4), or None."""
    try:
        address = ipaddress.ip_address(text.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _port(text: str) -> int | None:
    text = text.strip()
    if not text.isdigit() or len(text) > 5 or not 0 < int(text) < 65536:
        return None
    return int(text)
