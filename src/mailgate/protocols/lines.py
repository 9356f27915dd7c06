"""A bounded receive buffer for line-based protocols, shared by every core.

Bytes are appended with `feed`; complete lines come out of `next_line`, fixed-size chunks (IMAP
literals, SASL continuations) out of `take`. The buffer never holds more than `max_line` bytes
without a line ending: past that `next_line` raises `LineTooLong`, so a peer that never sends
CRLF cannot make us buffer without end. Searching resumes where the previous search stopped, so
a line trickled in one byte at a time costs linear time, not quadratic.
"""

from __future__ import annotations


class LineTooLong(Exception):
    """More than `max_line` bytes arrived without a line ending."""


class LineBuffer:
    __slots__ = ("_buf", "_scanned", "max_line")

    def __init__(self, max_line: int) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes already known to hold no b"\n"
        self.max_line = max_line

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_line(self) -> bytes | None:
        """Return the next line without its CRLF (a bare LF also ends a line), or None."""
        end = self._buf.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buf)
            if self._scanned > self.max_line:
                raise LineTooLong
            return None
        if end > self.max_line:
            raise LineTooLong
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        self._scanned = 0
        return line[:-1] if line.endswith(b"\r") else line

    def take(self, size: int) -> bytes | None:
        """Return exactly `size` bytes if that many are buffered, else None."""
        if len(self._buf) < size:
            return None
        chunk = bytes(self._buf[:size])
        del self._buf[:size]
        self._scanned = 0
        return chunk

    def take_all(self) -> bytes:
        """Hand over everything buffered (pipelined bytes for the relay)."""
        data = bytes(self._buf)
        self.clear()
        return data

    def clear(self) -> None:
        """Forget everything buffered (plaintext pipelined before a TLS upgrade)."""
        self._buf.clear()
        self._scanned = 0

    def __len__(self) -> int:
        return len(self._buf)
