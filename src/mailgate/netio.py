"""The one I/O layer of the phases before the relay: the client's pre-auth phase and the backend
login both run on a `Channel` driven by `exchange`.

Every read is bounded, every write is bounded and timed, every wait has a deadline:
- reads go into a small scratch buffer (asyncio's BufferedProtocol), so one read never takes
  more than READ_SIZE bytes, and reading pauses while READ_SIZE bytes wait unconsumed;
- writes pause the reader of commands: `exchange` handles no further command while more than
  SEND_BUFFER bytes wait to be sent (nginx's `s->blocked`), and waits for them to drain no
  longer than the send timeout;
- a channel that is finished lingers LINGER seconds to flush its last words, then is aborted;
  its `on_lost` callback runs when the descriptor is really closed, which is when the worker
  stops counting it.

`Channel` is also what `loop.start_tls` upgrades in place, and what hands its unread bytes to
the relay (`take`), so nothing reaches into a stream's private buffer.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

from mailgate.protocols.events import Send, StartTLS
from mailgate.protocols.proxy_protocol import ProxyHeader

# The largest read: the longest pre-auth line is longer, but it arrives over several reads
# into the core's own bounded line buffer; a bigger read would only hold more per session.
READ_SIZE = 16 * 1024
# Unsent bytes above which no further command is handled: a few replies' worth. A client that
# pipelines commands and never reads gets no more than this buffered for it.
SEND_BUFFER = 16 * 1024
# How long a finished session may take to flush its goodbye before it is aborted.
LINGER = 2.0

# Reads land here and are copied out at once (one copy, as data_received would make). Every
# get_buffer() is followed by its buffer_updated() before the loop runs anything else, so
# one buffer serves every connection of the process.
_SCRATCH = bytearray(READ_SIZE)
_SCRATCH_VIEW = memoryview(_SCRATCH)


class Channel(asyncio.BufferedProtocol):
    __slots__ = (
        "_closed",
        "_drain_waiter",
        "_eof",
        "_held",
        "_linger",
        "_loop",
        "_pending",
        "_read_paused",
        "_waiter",
        "_write_paused",
        "on_lost",
        "on_made",
        "origin",
        "transport",
    )

    def __init__(
        self,
        on_made: Callable[[Channel], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.transport: asyncio.Transport | None = None
        self._loop = loop  # given by who creates it: a lookup costs a getpid in 3.11
        self.on_made = on_made  # called once connected (the worker admits the session there)
        self.on_lost: Callable[[], None] | None = None  # called once the descriptor is closed
        # The PROXY protocol header the connection began with (the real client), if any.
        self.origin: ProxyHeader | None = None
        self._pending = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._closed = False
        self._read_paused = False
        self._held = False  # reading stays paused until release(), whatever is consumed
        self._write_paused = False
        self._linger: asyncio.TimerHandle | None = None

    # --- asyncio callbacks ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(SEND_BUFFER)
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self.on_made is not None:
            self.on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return _SCRATCH_VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self._pending += _SCRATCH_VIEW[:nbytes]
        if len(self._pending) >= READ_SIZE and not self._read_paused:
            self._pause_reading()
        _wake(self._waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._waiter)
        return False  # before the relay a half-close ends the session

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._write_paused = False
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        _wake(self._waiter)
        _wake(self._drain_waiter)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost()

    # --- the driver's side -----------------------------------------------------------------

    async def recv(self, deadline: float) -> bytes:
        """Everything buffered, or wait for more until `deadline` (loop time), then raise
        TimeoutError; b"" at EOF.

        The deadline is a plain timer on the waiter rather than asyncio.timeout: this runs a
        few times per login, and the context manager's bookkeeping showed in profiles.
        """
        while not self._pending:
            if self._eof or self._closed:
                return b""
            self._waiter = self.loop.create_future()
            try:
                await _until(self.loop, self._waiter, deadline)
            finally:
                self._waiter = None
        return self.take()

    def take(self) -> bytes:
        """Hand over every unread byte (to the core, or to the relay at login)."""
        data = bytes(self._pending)
        self._pending.clear()
        if self._read_paused and not self._held:
            self._resume_reading()
        return data

    def hold(self) -> None:
        """Read nothing more until `release` (while a login is decided, as nginx does)."""
        self._held = True
        if not self._read_paused:
            self._pause_reading()

    def release(self) -> None:
        self._held = False
        if self._read_paused and len(self._pending) < READ_SIZE:
            self._resume_reading()

    def write(self, data: bytes) -> None:
        # A transport closed under us (a worker's shutdown) may not have told connection_lost
        # yet: uvloop raises on a write then, where asyncio drops it.
        transport = self.transport
        if transport is not None and not self._closed and not transport.is_closing():
            transport.write(data)

    @property
    def write_blocked(self) -> bool:
        """More than SEND_BUFFER bytes wait to be sent."""
        return self._write_paused

    async def drain(self, deadline: float) -> None:
        """Wait until the unsent bytes are below SEND_BUFFER; TimeoutError at `deadline`."""
        while self._write_paused and not self._closed:
            self._drain_waiter = self.loop.create_future()
            try:
                await _until(self.loop, self._drain_waiter, deadline)
            finally:
                self._drain_waiter = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The channel's event loop, looked up once (each lookup costs a getpid in 3.11)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    @property
    def closed(self) -> bool:
        return self._closed or self._eof

    async def start_tls(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        deadline: float,
    ) -> None:
        """Upgrade in place; raises OSError/ssl.SSLError/TimeoutError on failure."""
        assert self.transport is not None
        self.take()  # plaintext that arrived before the upgrade must not count
        loop = self.loop
        new = await loop.start_tls(
            self.transport,
            self,
            ctx,
            server_side=server_side,
            server_hostname=server_hostname,
            ssl_handshake_timeout=max(0.001, deadline - loop.time()),
        )
        if new is None:
            raise ConnectionError("connection closed during TLS handshake")
        self.transport = new
        new.set_write_buffer_limits(SEND_BUFFER)

    def finish(self, linger: float = LINGER) -> None:
        """Close after flushing what is buffered; abort if that takes longer than `linger`."""
        transport = self.transport
        if transport is None or self._closed:
            return
        transport.close()
        if not self._closed and self._linger is None:
            self._linger = self.loop.call_later(linger, transport.abort)

    def abort(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.abort()

    def detach(self) -> Callable[[], None] | None:
        """The relay takes the transport over: it gets `on_lost` and the linger duty."""
        on_lost, self.on_lost = self.on_lost, None
        return on_lost

    def _pause_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self._read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        self._read_paused = False
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()


def _wake(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)


async def _until(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[None], deadline: float
) -> None:
    """Wait for `future` until `deadline` (loop time), then raise TimeoutError."""
    timer = loop.call_at(deadline, expire_waiter, future)
    try:
        await future
    finally:
        timer.cancel()


class Deadline:
    """`with Deadline(loop, when):` raises TimeoutError in the current task at `when` (loop
    time): asyncio.timeout_at without its per-use bookkeeping (two getpid calls and half a
    dozen Python calls each, on the login path several times). Like asyncio's, it cancels the
    task and turns that cancellation, and only that one, into TimeoutError."""

    __slots__ = ("_fired", "_handle", "_task")

    def __init__(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        task = asyncio.current_task(loop)
        assert task is not None, "Deadline outside a task"
        self._task = task
        self._fired = False
        self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    def __enter__(self) -> Deadline:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: object, tb: object) -> None:
        self._handle.cancel()
        if self._fired and kind is asyncio.CancelledError and self._task.uncancel() == 0:
            raise TimeoutError from None


def expire_waiter(waiter: asyncio.Future[None]) -> None:
    """A deadline passed: the waiter raises TimeoutError (unless it was answered already)."""
    if not waiter.done():
        waiter.set_exception(TimeoutError())


# --- the driver loop --------------------------------------------------------------------------


class Machine(Protocol):
    """What `exchange` drives: a client core or a backend login core."""

    def feed(self, data: bytes) -> None: ...

    def next_events(self) -> list[Any]: ...

    def tls_started(self) -> list[Any]: ...


async def exchange(
    chan: Channel,
    machine: Machine,
    events: list[Any],
    *,
    read_timeout: float,
    send_timeout: float,
    deadline: float,
    start_tls: Callable[[], Awaitable[None]],
) -> Any:
    """Perform `Send` and `StartTLS` events and feed the machine what the peer sends, until
    it asks for something else (Authenticate, Close, BackendReady, BackendFailed): that event
    is returned. Reads wait `read_timeout`, writes `send_timeout`, everything `deadline`."""
    loop = chan.loop
    while True:
        for event in events:
            if type(event) is Send:
                chan.write(event.data)
            elif type(event) is StartTLS:
                await start_tls()
                events = machine.tls_started()
                break
            else:
                return event
        else:
            if chan.write_blocked:
                await chan.drain(min(deadline, loop.time() + send_timeout))
            events = machine.next_events()
            if not events:
                machine.feed(await chan.recv(min(deadline, loop.time() + read_timeout)))
                events = machine.next_events()
