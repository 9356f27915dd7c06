"""The post-login byte pump: two transports, flow control, an idle timer and byte counts.

No coroutine lives here. Each transport gets a `_Side` protocol whose `data_received` writes
straight into the other transport; when a write buffer passes its high-water mark asyncio calls
`pause_writing` and we pause reading on the other side, so a fast sender cannot fill our memory
(the bound is the transport's write buffer limit). An idle session costs two small protocol
objects, the `Relay`, and the transports themselves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mailgate.protocols.farewell import Farewell

# asyncio's defaults are 64 KiB high / 16 KiB low. A larger window keeps the pipe full on
# bulk FETCH/RETR without holding more than this per direction.
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# How much of the last bytes each way we keep, to tell a normal end (LOGOUT, QUIT) from a
# backend that went away.
TAIL = 128


class _Side(asyncio.Protocol):
    __slots__ = ("count", "eof", "peer", "relay", "tail", "transport")

    def __init__(self, relay: Relay, transport: asyncio.Transport) -> None:
        self.relay = relay
        self.transport = transport
        self.peer: _Side
        self.count = 0
        self.eof = False
        self.tail = b""

    def data_received(self, data: bytes) -> None:
        self.count += len(data)
        self.tail = data[-TAIL:]
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
        self.relay.side_lost(self)


class Relay:
    """Relays bytes between a logged-in client and its backend until either side ends."""

    __slots__ = (
        "_done",
        "_timer",
        "backend",
        "client",
        "ended",
        "farewell",
        "idle_timeout",
        "last_activity",
        "loop",
        "on_done",
        "started",
    )

    def __init__(
        self,
        client: asyncio.Transport,
        backend: asyncio.Transport,
        *,
        idle_timeout: float,
        farewell: Farewell,
        on_done: Callable[[Relay], None],
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.client = _Side(self, client)
        self.backend = _Side(self, backend)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.idle_timeout = idle_timeout
        self.farewell = farewell
        self.on_done = on_done
        self.started = self.last_activity = self.loop.time()
        self.ended = "open"
        self._done = False
        self._timer: asyncio.TimerHandle | None = None

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
        if not self._done:  # a side may have been closed already, ending the relay
            self._timer = self.loop.call_later(self.idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        idle = self.loop.time() - self.last_activity
        if idle >= self.idle_timeout:
            self.ended = "idle timeout"
            self.client.transport.write(self.farewell.idle)
            self.close()
        else:
            self._timer = self.loop.call_later(self.idle_timeout - idle, self._check_idle)

    def shutdown(self) -> None:
        """mailgate is stopping: tell the client, then cut."""
        if self.ended == "open":
            self.ended = "shutdown"
            self.client.transport.write(self.farewell.shutdown)
        self.close()

    def close(self) -> None:
        for side in (self.client, self.backend):
            side.transport.close()  # flushes what is buffered first

    def side_lost(self, side: _Side) -> None:
        if self._done:
            return
        if self.ended == "open":
            if side is self.client or self.client.eof:  # the backend answered a half-close
                self.ended = "client closed"
            elif self.farewell.normal_end(self.client.tail, self.backend.tail):
                self.ended = "backend closed"
            else:
                self.ended = "backend lost"
                self.client.transport.write(self.farewell.backend_lost)
        self.close()
        self._finish()

    def _finish(self) -> None:
        if self._done:
            return
        self._done = True
        if self._timer is not None:
            self._timer.cancel()
        self.on_done(self)

    @property
    def bytes_in(self) -> int:
        """Bytes the client sent."""
        return self.client.count

    @property
    def bytes_out(self) -> int:
        """Bytes sent to the client."""
        return self.backend.count
