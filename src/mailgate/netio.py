"""A minimal awaitable connection for the phases before the relay: pre-auth and backend login.

`Channel` is an asyncio Protocol with a small receive buffer and one awaitable `recv`. It is
deliberately not a StreamReader: the same object is handed to `loop.start_tls` for upgrades,
and when the relay starts the transport simply gets a new protocol, with whatever is still
buffered handed over explicitly (`take_buffer`), so nothing is lost and nothing is re-parsed.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import cast

# Reading pauses once this much is buffered and unread. Pre-auth commands are short and the
# core has its own, smaller, line limits; this only bounds what piles up while we wait for
# the auth service or the backend.
MAX_BUFFER = 64 * 1024


class Channel(asyncio.Protocol):
    __slots__ = ("_buf", "_closed", "_eof", "_paused", "_waiter", "on_connect", "transport")

    def __init__(self, on_connect: Callable[[Channel], None] | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.on_connect = on_connect
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed = False
        self._paused = False

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        if self.on_connect is not None:
            self.on_connect(self)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_BUFFER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return False  # let the transport close; before the relay a half-close ends the session

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the driver's side -----------------------------------------------------------------

    async def recv(self, deadline: float | None = None) -> bytes:
        """Everything buffered, or wait for more until `deadline` (loop time), then raise
        TimeoutError; b"" at EOF.

        The deadline is a plain timer on the waiter rather than asyncio.timeout: this runs a
        few times per login, and the context manager's bookkeeping showed in profiles.
        """
        while not self._buf:
            if self._eof or self._closed:
                return b""
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = None if deadline is None else loop.call_at(deadline, expire_waiter, waiter)
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()
        return self.take_buffer()

    def take_buffer(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def discard_buffer(self) -> None:
        """Forget unread bytes: plaintext that arrived before a TLS upgrade must not count."""
        self.take_buffer()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    @property
    def closed(self) -> bool:
        return self._closed or self._eof

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        timeout: float,
    ) -> None:
        """Upgrade in place; raises OSError/ssl.SSLError/TimeoutError on failure."""
        assert self.transport is not None
        self.discard_buffer()
        loop = asyncio.get_running_loop()
        new = await loop.start_tls(
            self.transport,
            self,
            ctx,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=timeout,
        )
        if new is None:
            raise ConnectionError("connection closed during TLS handshake")
        self.transport = new

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def expire_waiter(waiter: asyncio.Future[None]) -> None:
    """A deadline passed: the waiter raises TimeoutError (unless it was answered already)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())
