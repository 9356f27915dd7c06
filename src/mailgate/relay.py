"""The post-login byte pump: two transports, flow control, an idle timer and byte counts.

No coroutine lives here. Each transport gets a `_Side` protocol whose `data_received` writes
straight into the other transport; when a write buffer passes its high-water mark asyncio calls
`pause_writing` and we pause reading on the other side, so a fast sender cannot fill our memory
(the bound is the transport's write buffer limit). An idle session costs two small protocol
objects, the `Relay`, and the transports themselves.

When mailgate ends a session (the backend vanished, idle timeout, shutdown, kick) the client
gets the protocol's goodbye only at a response boundary, as the protocol's tracker sees it;
inside a FETCH literal or a RETR body the connection is just closed, so no goodbye is ever
stored as part of a message. A closing side lingers LINGER seconds to flush, then is aborted.

The relay knows no protocol: its words and its tracker come from the session (from the
protocol's record), so this module imports nothing of mailgate's protocols.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from mailgate.values import CloseReason, Goodbyes

# asyncio's defaults are 64 KiB high / 16 KiB low. A larger window keeps the pipe full on
# bulk FETCH/RETR without holding more than this per direction.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# How much of the last bytes each way we keep, to tell a normal end (LOGOUT, QUIT) from a
# backend that went away.
TAIL = 128
# How long a closing side may take to flush before it is aborted.
LINGER = 2.0


class Boundary(Protocol):
    """Where the backend's stream stands (see protocols/boundary.py)."""

    @property
    def at_boundary(self) -> bool: ...

    def client(self, data: bytes) -> None: ...

    def server(self, data: bytes) -> None: ...


class _Side(asyncio.Protocol):
    __slots__ = ("count", "eof", "linger", "lost", "peer", "relay", "tail", "transport", "watch")

    def __init__(
        self, relay: Relay, transport: asyncio.Transport, watch: Callable[[bytes], None]
    ) -> None:
        self.relay = relay
        self.transport = transport
        self.watch = watch  # the boundary tracker's view of this direction
        self.peer: _Side
        self.count = 0
        self.eof = False
        self.lost = False
        self.tail = b""
        # The abort if a close does not finish within LINGER; cancelled when it does, so a
        # closed session is freed at once, not LINGER seconds later.
        self.linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.tail = data[-TAIL:]
        self.watch(data)
        self.relay.last_activity = self.relay.loop.time()
        self.peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        relay = self.relay
        peer = self.peer.transport
        if (
            self is relay.client
            and not self.peer.eof
            and peer.can_write_eof()
            # A TLS client's close_notify cannot be half a close: asyncio closes its side.
            and self.transport.get_extra_info("ssl_object") is None
        ):
            # The client half-closed (e.g. after LOGOUT): pass it on and still deliver the
            # backend's last replies.
            peer.write_eof()
            return True
        # A backend never half-closes on purpose in these protocols: it is gone.
        relay.side_lost(self)
        return False

    def pause_writing(self) -> None:
        self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.relay.side_lost(self)
        self.relay.descriptor_closed(self)


class Relay:
    """Relays bytes between a logged-in client and its backend until either side ends."""

    __slots__ = (
        "_done",
        "backend",
        "boundary",
        "client",
        "ended",
        "goodbyes",
        "idle_timeout",
        "last_activity",
        "loop",
        "normal_end",
        "on_client_lost",
        "on_done",
        "started",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        idle_timeout: float,
        goodbyes: Goodbyes,
        boundary: Boundary,
        normal_end: Callable[[bytes, bytes], bool],
        on_done: Callable[[Relay], None],
        on_client_lost: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.boundary = boundary
        self.client = _Side(self, client, boundary.client)
        self.backend = _Side(self, backend, boundary.server)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.idle_timeout = idle_timeout
        self.goodbyes = goodbyes
        self.normal_end = normal_end
        self.on_done = on_done
        self.on_client_lost = on_client_lost  # the client's descriptor is closed
        self.started = self.last_activity = self.loop.time()
        self.ended: CloseReason | None = None
        self._done = False

    def start(self, to_backend: bytes, to_client: bytes) -> None:
        """Take over both transports. Bytes already read from either side go first."""
        for side in (self.client, self.backend):
            side.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
            side.transport.set_protocol(side)
        if to_client:
            self.backend.data_received(to_client)
        if to_backend:
            self.client.data_received(to_backend)
        for side in (self.client, self.backend):
            if side.transport.is_closing():
                side.connection_lost(None)
            else:
                side.transport.resume_reading()

    def check_idle(self, now: float) -> None:
        """End the session if nothing moved for idle_timeout. The worker's sweep calls this
        for every relay (session.py, Sessions.sweep_idle): one timer for all of them rather
        than one each, which was a tenth of an idle session's memory."""
        if not self._done and now - self.last_activity >= self.idle_timeout:
            self.end(CloseReason.IDLE_TIMEOUT, self.goodbyes.idle)

    def shutdown(self) -> None:
        """mailgate is stopping: tell the client, then cut."""
        self.end(CloseReason.SHUTDOWN, self.goodbyes.shutdown)

    def kick(self) -> None:
        """An operator ends the session."""
        self.end(CloseReason.KICKED, self.goodbyes.kicked)

    def end(self, reason: CloseReason, goodbye: bytes) -> None:
        """mailgate ends the session: the goodbye goes out only at a response boundary."""
        if self._done:
            return
        if self.ended is None:
            self.ended = reason
            if self.boundary.at_boundary and not self.client.lost:
                self.client.transport.write(goodbye)
        self._close()
        self._finish()

    def side_lost(self, side: _Side) -> None:
        if self._done:
            return
        if self.ended is None:
            if side is self.client or self.client.eof:  # the backend answered a half-close
                self.ended = CloseReason.CLIENT_CLOSED
            elif self.normal_end(self.client.tail, self.backend.tail):
                self.ended = CloseReason.BACKEND_CLOSED
            else:
                self.end(CloseReason.BACKEND_LOST, self.goodbyes.backend_lost)
                return
        self._close()
        self._finish()

    def descriptor_closed(self, side: _Side) -> None:
        if side is self.client and self.on_client_lost is not None:
            on_lost, self.on_client_lost = self.on_client_lost, None
            on_lost()

    def _close(self) -> None:
        for side in (self.client, self.backend):
            if not side.lost and side.linger is None:
                side.transport.close()  # flushes what is buffered first, for LINGER at most
                side.linger = self.loop.call_later(LINGER, _abort_if_open, side)

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        self.on_done(self)

    @property
    def bytes_in(self) -> int:
        """Bytes the client sent."""
        return self.client.count

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the client."""
        return self.backend.count


def _abort_if_open(side: _Side) -> None:
    if not side.lost:
        side.transport.abort()
