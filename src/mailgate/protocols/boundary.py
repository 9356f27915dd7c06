"""Where the relayed stream from a backend stands: at a response boundary, or inside a response.

mailgate says goodbye to a logged-in client (the backend vanished, an idle timeout, shutdown)
only where a response may begin. Written into a FETCH literal or a RETR body, the `* BYE` or
`-ERR` text would be stored by the client as part of the message; there the connection is
just closed.

The relay calls `server(data)` for every chunk from the backend (and, for POP3, `client(data)`
for every chunk from the client) and reads `at_boundary`. The trackers are built to cost
almost nothing per byte: inside an IMAP literal or a POP3 body they skip or search in C
(`bytes.find`), and they parse nothing they need not. A tracker that loses its way (a peer
that breaks the protocol) errs towards "not at a boundary", where the cost is only a bare close.

Sans-I/O: no sockets, no clock.
"""

from __future__ import annotations

import re
from collections import deque

# "{1234}" or "{1234+}" just before a line end: an IMAP literal follows (RFC 9051 4.3).
_LITERAL_END = re.compile(rb"\{([0-9]{1,19})\+?\}\r?\n\Z")
# Bytes of a line end kept between chunks, enough for "{" + 19 digits + "+}\r\n".
_CARRY = 24
# POP3 commands whose +OK response is multi-line (RFC 1939, RFC 2449 CAPA); LIST and UIDL
# only without an argument.
_POP3_MULTI = frozenset({b"RETR", b"TOP", b"CAPA"})
_POP3_MULTI_WITHOUT_ARG = frozenset({b"LIST", b"UIDL"})
# A POP3 client line longer than this is no command we need to understand (RFC 2449: 255).
_POP3_MAX_COMMAND = 512
# Responses a POP3 tracker remembers as expected; a client pipelining more than this is
# not tracked precisely any more (and is then treated as never at a boundary).
_POP3_MAX_PENDING = 1024


class ImapBoundary:
    """Backend to client: lines, and literals announced by `{n}` at a line's end."""

    __slots__ = ("_carry", "_literal", "_mid_line")

    def __init__(self) -> None:
        self._literal = 0  # literal bytes still to come
        self._mid_line = False  # the last byte seen was not the end of a response line
        self._carry = b""  # the end of an unfinished line, for a "{n}" split across chunks

    @property
    def at_boundary(self) -> bool:
        return not self._literal and not self._mid_line

    def client(self, data: bytes) -> None:
        """Client bytes tell nothing about where IMAP responses end."""

    def server(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._literal:
                taken = min(self._literal, end - pos)
                self._literal -= taken
                pos += taken
                self._mid_line = True  # a literal is always followed by more of its line
                continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._carry = (self._carry + data[pos:])[-_CARRY:]
                self._mid_line = True
                return
            tail = data[max(pos, newline + 1 - _CARRY) : newline + 1]
            if newline + 1 - pos < _CARRY:
                tail = (self._carry + tail)[-_CARRY:]
            self._carry = b""
            self._mid_line = False
            found = _LITERAL_END.search(tail)
            if found is not None:
                self._literal = int(found.group(1))
                self._mid_line = True
            pos = newline + 1


class Pop3Boundary:
    """Backend to client: one response per client command; a +OK to RETR, TOP, CAPA and
    argument-less LIST/UIDL is followed by lines up to "CRLF . CRLF" (RFC 1939 3)."""

    __slots__ = ("_body", "_carry", "_client_line", "_lost", "_pending", "_status")

    def __init__(self) -> None:
        self._pending: deque[bool] = deque()  # per command sent: is its +OK multi-line?
        self._client_line = b""  # an unfinished client command line
        self._body = False  # inside a multi-line response
        self._status: bytes | None = None  # the start of an unfinished status line
        self._carry = b""  # the last bytes of a body, for a terminator split across chunks
        self._lost = False  # too much pipelined to follow: never at a boundary again

    @property
    def at_boundary(self) -> bool:
        return not self._body and self._status is None and not self._lost

    def client(self, data: bytes) -> None:
        lines = (self._client_line + data).split(b"\n")
        self._client_line = lines.pop()
        if len(self._client_line) > _POP3_MAX_COMMAND:
            self._client_line = b""
            self._lost = True
        for line in lines:
            words = line.rstrip(b"\r").split(b" ")
            verb = words[0].upper()
            multi = verb in _POP3_MULTI or (verb in _POP3_MULTI_WITHOUT_ARG and len(words) == 1)
            self._pending.append(multi)
        if len(self._pending) > _POP3_MAX_PENDING:
            self._pending.clear()
            self._lost = True

    def server(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            if self._body:
                found = self._terminator(data, pos)
                if found < 0:
                    self._carry = (self._carry + data[max(pos, end - 4) :])[-4:]
                    return
                pos = found
                self._carry = b""
                self._body = False
                continue
            newline = data.find(b"\n", pos)
            line_end = end if newline < 0 else newline
            self._status = ((self._status or b"") + data[pos : min(line_end, pos + 4)])[:4]
            if newline < 0:
                return
            multi = self._pending.popleft() if self._pending else False
            if multi and self._status.startswith(b"+OK"):
                self._body = True
                self._carry = b"\r\n"  # the status line's end may precede the terminator
            self._status = None
            pos = newline + 1

    def _terminator(self, data: bytes, pos: int) -> int:
        """Where the body's "CRLF . CRLF" ends, counting bytes carried from earlier; or -1."""
        joint = self._carry + data[pos : pos + 4]
        found = joint.find(b"\r\n.\r\n")
        if found >= 0:
            return pos + found + 5 - len(self._carry)
        found = data.find(b"\r\n.\r\n", pos)
        return found + 5 if found >= 0 else -1


class SmtpBoundary:
    """Backend to client: replies of one or more lines, "250-" on all but the last."""

    __slots__ = ("_head", "_mid_reply")

    def __init__(self) -> None:
        self._mid_reply = False
        self._head = b""  # the first bytes of an unfinished line

    @property
    def at_boundary(self) -> bool:
        return not self._mid_reply

    def client(self, data: bytes) -> None:
        """Client bytes tell nothing about where SMTP replies end."""

    def server(self, data: bytes) -> None:
        last_newline = data.rfind(b"\n")
        if last_newline < 0:  # the whole chunk continues the current line
            self._head = (self._head + data)[:4]
            self._mid_reply = True
            return
        previous = data.rfind(b"\n", 0, last_newline)
        # The last complete line starts after `previous`, or began in an earlier chunk.
        head = data[previous + 1 : previous + 5] if previous >= 0 else (self._head + data)[:4]
        rest = data[last_newline + 1 :]
        self._head = rest[:4]
        # "250-" on the last complete line: more lines of this reply follow.
        self._mid_reply = bool(rest) or head[3:4] == b"-"
