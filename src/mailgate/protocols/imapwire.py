"""IMAP4 tokens a server reads before login, named after the RFC 9051 section 9 grammar (RFC 3501
is the same here), with RFC 7888 LITERAL+, RFC 4959 SASL-IR and RFC 2971 ID.

Pure functions and one small `Reader` over bytes: no state beyond a read position, no I/O. The
core assembles one command at a time, literals inline exactly as on the wire
(`line {n}CRLF <n bytes> rest-of-line`), and hands it to a `Reader`. `literal_header` lets the
core see a literal announced at the end of a line, and check its size, before any literal byte
is buffered.

`WireError` messages are fixed text from this module: they are safe to put in a BAD reply and
never contain anything the client sent.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

CRLF = b"\r\n"


class WireError(Exception):
    """The bytes do not fit the grammar. `text` is the fixed reply text (ASCII, no client data)."""

    def __init__(self, text: bytes) -> None:
        super().__init__(text.decode("ascii"))
        self.text = text


_SYNTAX = b"Syntax error"
_INVALID_TAG = b"Invalid tag"
_BAD_BASE64 = b"Invalid base64 data"


def _chars(excluded: bytes) -> frozenset[int]:
    """Printable ASCII (CHAR minus CTL and SP) without `excluded`."""
    return frozenset(c for c in range(0x21, 0x7F) if c not in excluded)


# atom-specials = "(" / ")" / "{" / SP / CTL / list-wildcards ("%" "*") / quoted-specials
# (DQUOTE "\") / resp-specials ("]"); SP and CTL are outside 0x21-0x7E already.
ATOM_CHARS = _chars(b'(){%*"\\]')
# ASTRING-CHAR = ATOM-CHAR / resp-specials
ASTRING_CHARS = ATOM_CHARS | {ord("]")}
# tag = 1*<any ASTRING-CHAR except "+">
TAG_CHARS = ASTRING_CHARS - {ord("+")}


def _run_of(chars: frozenset[int]) -> re.Pattern[bytes]:
    return re.compile(b"[" + b"".join(b"\\x%02x" % c for c in sorted(chars)) + b"]+")


_ATOM = _run_of(ATOM_CHARS)
_ASTRING_ATOM = _run_of(ASTRING_CHARS)
_TAG = _run_of(TAG_CHARS)
# quoted = DQUOTE *QUOTED-CHAR DQUOTE. QUOTED-CHAR is any TEXT-CHAR but quoted-specials, or an
# escaped quoted-special; RFC 9051 adds UTF-8, and any 8-bit byte is accepted here because some
# clients still send Latin-1 passwords. NUL is never a CHAR.
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_QUOTED_PAIR = re.compile(rb'\\(["\\])')
# literal = "{" number64 ["+"] "}" CRLF *CHAR8; 19 digits hold any number64.
_LITERAL = re.compile(rb"\{([0-9]{1,19})(\+?)\}\r\n")
_BASE64 = re.compile(rb"[A-Za-z0-9+/]+={0,2}")
# RFC 2971 section 3.3: at most 30 field-value pairs.
MAX_ID_PARAMS = 30
# A literal size past this many digits is too large whatever the limit (number64 has 19).
_MAX_DIGITS = 19
TOO_LARGE = 1 << 63  # the size reported for a literal whose number does not fit number64


@dataclass(frozen=True, slots=True)
class LiteralHeader:
    """`{size}` (synchronising: the client waits for "+") or `{size+}` (RFC 7888: it does not)."""

    size: int
    sync: bool


def literal_header(line: bytes) -> LiteralHeader | None:
    """The literal announced at the end of `line` (without its CRLF), if any.

    Only the size is read; whether the literal stands where the grammar allows one is the
    Reader's business once the command is complete.
    """
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    if start < 0:
        return None
    inner = line[start + 1 : -1]
    sync = not inner.endswith(b"+")
    digits = inner if sync else inner[:-1]
    if not digits or not digits.isdigit():  # bytes.isdigit is ASCII only
        return None
    size = int(digits) if len(digits) <= _MAX_DIGITS else TOO_LARGE
    return LiteralHeader(min(size, TOO_LARGE), sync)


class LiteralTooLarge(Exception):
    """A literal was announced past the per-literal or the per-command limit."""


class CommandTooLong(Exception):
    """The lines of one command, with its literals, add up past the limit."""


class CommandAssembler:
    """One command read as on the wire (RFC 9051 4.3, RFC 7888): its first line, then for each
    literal announced at the end of a line, CRLF, the literal's bytes and the next line.

    A literal's size is checked when it is announced, before any of its bytes is buffered; the
    whole command is held to `max_size`, so a client cannot chain literals without end.
    """

    __slots__ = ("_data", "_max_literal", "_max_size", "literal")

    def __init__(self, max_literal: int, max_size: int) -> None:
        self._data = bytearray()
        self._max_literal = max_literal
        self._max_size = max_size
        self.literal: int | None = None  # literal bytes awaited; None: a line is next

    def start(self, line: bytes) -> None:
        self._data = bytearray(line)
        self.literal = None

    def announce(self, header: LiteralHeader) -> None:
        size = header.size
        if size > self._max_literal or len(self._data) + size > self._max_size:
            raise LiteralTooLarge
        self._data += CRLF
        self.literal = size

    def clear(self) -> None:
        self.start(b"")

    def add_literal(self, data: bytes) -> None:
        self._data += data
        self.literal = None

    def add_line(self, line: bytes) -> LiteralHeader | None:
        """Append the line that follows a literal; the next literal it announces, if any."""
        if len(self._data) + len(line) > self._max_size:
            raise CommandTooLong
        self._data += line
        return literal_header(line)

    def take(self) -> bytes:
        data = bytes(self._data)
        self._data = bytearray()
        return data


_NOT_TEXT = re.compile("[^ -~]+")


def text(message: str, limit: int) -> bytes:
    """resp-text made from `message`: printable ASCII only (no CR or LF), at most `limit` long."""
    return _NOT_TEXT.sub("", message)[:limit].strip().encode("ascii")


def is_atom(data: bytes) -> bool:
    return _ATOM.fullmatch(data) is not None


def continue_req(challenge: bytes) -> bytes:
    """continue-req = "+" SP base64 CRLF; an empty challenge is "+ " CRLF."""
    return b"+ " + base64.b64encode(challenge) + CRLF


def decode_base64(data: bytes) -> bytes:
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error:
        raise WireError(_BAD_BASE64) from None


@dataclass(frozen=True, slots=True)
class SaslCancel:
    """The client answered a challenge with "*" (RFC 9051 section 6.2.2)."""


def sasl_response(line: bytes) -> bytes | SaslCancel:
    """A client line during AUTHENTICATE: base64 of the response, or "*" to cancel."""
    if line == b"*":
        return SaslCancel()
    return decode_base64(line)


class Reader:
    """Reads one assembled command from `pos` on, one method per grammar rule."""

    __slots__ = ("_data", "pos")

    def __init__(self, data: bytes, pos: int = 0) -> None:
        self._data = data
        self.pos = pos

    def at_end(self) -> bool:
        return self.pos >= len(self._data)

    def end(self) -> None:
        """The command must end here: anything more is a syntax error."""
        if not self.at_end():
            raise WireError(_SYNTAX)

    def sp(self) -> None:
        self._expect(b" ")

    def _expect(self, byte: bytes) -> None:
        if self._data[self.pos : self.pos + 1] != byte:
            raise WireError(_SYNTAX)
        self.pos += 1

    def _accept(self, byte: bytes) -> bool:
        if self._data[self.pos : self.pos + 1] == byte:
            self.pos += 1
            return True
        return False

    def _match(self, pattern: re.Pattern[bytes]) -> re.Match[bytes]:
        found = pattern.match(self._data, self.pos)
        if found is None:
            raise WireError(_SYNTAX)
        self.pos = found.end()
        return found

    def tag(self) -> bytes:
        """tag, which must be followed by SP or the end of the line."""
        found = _TAG.match(self._data, self.pos)
        end = found.end() if found else self.pos
        if found is None or self._data[end : end + 1] not in (b"", b" "):
            raise WireError(_INVALID_TAG)
        self.pos = end
        return found.group()

    def atom(self) -> bytes:
        return self._match(_ATOM).group()

    def quoted(self) -> bytes:
        return _QUOTED_PAIR.sub(rb"\1", self._match(_QUOTED).group(1))

    def literal(self) -> bytes:
        found = self._match(_LITERAL)
        size = int(found.group(1))
        data = self._data[self.pos : self.pos + size]
        if len(data) != size or b"\x00" in data:  # CHAR8 excludes NUL
            raise WireError(_SYNTAX)
        self.pos += size
        return data

    def string(self) -> bytes:
        """string = quoted / literal"""
        if self._data[self.pos : self.pos + 1] == b"{":
            return self.literal()
        return self.quoted()

    def astring(self) -> bytes:
        """astring = 1*ASTRING-CHAR / string"""
        if self._data[self.pos : self.pos + 1] in (b'"', b"{"):
            return self.string()
        return self._match(_ASTRING_ATOM).group()

    def nil(self) -> bool:
        """Consume the atom NIL (any case) if it is next."""
        end = self.pos + 3
        if self._data[self.pos : end].upper() != b"NIL":
            return False
        if end < len(self._data) and self._data[end] in ATOM_CHARS:  # "NILS" is not NIL
            return False
        self.pos = end
        return True

    def nstring(self) -> bytes | None:
        """nstring = string / nil"""
        return None if self.nil() else self.string()

    def id_params_list(self) -> tuple[tuple[bytes, bytes | None], ...] | None:
        """RFC 2971: "(" [string SP nstring *(SP string SP nstring)] ")" / nil"""
        if self.nil():
            return None
        self._expect(b"(")
        params: list[tuple[bytes, bytes | None]] = []
        while not self._accept(b")"):
            if params:
                self.sp()
            key = self.string()
            self.sp()
            params.append((key, self.nstring()))
            if len(params) > MAX_ID_PARAMS:
                raise WireError(_SYNTAX)
        return tuple(params)

    def auth_type(self) -> str:
        """auth-type = atom, compared case-insensitively (RFC 9051 section 6.2.2)."""
        return self.atom().decode("ascii").upper()

    def initial_response(self) -> bytes:
        """RFC 4959: initial-response = base64 / "=" ("=" is an empty response)."""
        if self._accept(b"="):
            return b""
        found = _BASE64.match(self._data, self.pos)
        if found is None:
            raise WireError(_BAD_BASE64)
        self.pos = found.end()
        return decode_base64(found.group())
