"""The channel between the supervisor and one worker: JSON messages, one per line, over a
socketpair made before the fork.

Either side may send a request (it carries an id and gets exactly one reply) or a notice (no
reply). Messages are JSON arrays, `[kind, id, ...]`, small and cheap to parse on the login
path; the few large ones (the session lists behind `mailgate who`) are still one line.

A request that gets no answer within its timeout, or whose link is lost, raises
`LinkError`: callers treat that as "the other side is unavailable", never as an answer.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("mailgate.link")

# The longest message: a worker's list of 20,000 sessions is a few MB; anything longer is a
# broken peer, and the link is closed rather than buffer it.
MAX_MESSAGE = 64 * 1024 * 1024
REQUEST, REPLY, NOTICE = "q", "r", "n"

Handler = Callable[[str, list[Any]], Any]  # (operation, arguments) -> reply (or awaitable)


class LinkError(Exception):
    """The other side did not answer: lost, or too slow."""


class Link(asyncio.Protocol):
    """One end. `handler(op, args)` answers the other side's requests and notices; it may
    return an awaitable, whose result is the reply."""

    def __init__(self, handler: Handler, name: str = "link") -> None:
        self._handler = handler
        self._name = name
        self._buf = bytearray()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Future[Any]] = set()  # handlers still running
        self._loop: asyncio.AbstractEventLoop | None = None
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.closed_callback: Callable[[], None] | None = None  # called once, when it is lost

    # --- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        start = 0
        while (end := self._buf.find(b"\n", start)) >= 0:
            self._message(bytes(self._buf[start:end]))
            start = end + 1
        del self._buf[:start]
        if len(self._buf) > MAX_MESSAGE:
            log.error("%s: message over %d bytes; closing the link", self._name, MAX_MESSAGE)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        for future in self._pending.values():
            if not future.done():
                future.set_exception(LinkError(f"{self._name} lost"))
        self._pending.clear()
        if self.closed_callback is not None:
            self.closed_callback()

    # --- sending ------------------------------------------------------------------------------

    async def request(self, op: str, *args: Any, timeout: float) -> Any:
        if self.lost or self.transport is None or self._loop is None:
            raise LinkError(f"{self._name} is not connected")
        request_id = next(self._ids)
        future = self._loop.create_future()
        self._pending[request_id] = future
        self._write([REQUEST, request_id, op, *args])
        timer = self._loop.call_later(timeout, _expire, future, self._name, op)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    def notify(self, op: str, *args: Any) -> None:
        if not self.lost and self.transport is not None:
            self._write([NOTICE, 0, op, *args])

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _write(self, message: list[Any]) -> None:
        assert self.transport is not None
        self.transport.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    # --- receiving ----------------------------------------------------------------------------

    def _message(self, line: bytes) -> None:
        try:
            kind, message_id, *rest = json.loads(line)
        except (ValueError, TypeError):
            log.error("%s: malformed message; ignored", self._name)
            return
        if kind == REPLY:
            future = self._pending.get(message_id)
            if future is not None and not future.done():
                ok, value = rest
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(LinkError(str(value)))
            return
        op, args = rest[0], rest[1:]
        try:
            result = self._handler(op, args)
        except Exception as e:
            log.exception("%s: handling %s failed", self._name, op)
            if kind == REQUEST:
                self._write([REPLY, message_id, False, type(e).__name__])
            return
        if not (asyncio.iscoroutine(result) or isinstance(result, asyncio.Future)):
            if kind == REQUEST:
                self._write([REPLY, message_id, True, result])
            return
        task = asyncio.ensure_future(result)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if kind == REQUEST:
            task.add_done_callback(lambda done: self._reply_later(message_id, done))

    def _reply_later(self, message_id: int, done: asyncio.Future[Any]) -> None:
        if self.lost:
            return
        if done.cancelled():
            self._write([REPLY, message_id, False, "cancelled"])
        elif done.exception() is not None:
            self._write([REPLY, message_id, False, type(done.exception()).__name__])
        else:
            self._write([REPLY, message_id, True, done.result()])


def _expire(future: asyncio.Future[Any], name: str, op: str) -> None:
    if not future.done():
        future.set_exception(LinkError(f"{name}: no answer to {op}"))


def pair() -> tuple[socket.socket, socket.socket]:
    """A connected pair for one worker: (supervisor's end, worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return ours, theirs


async def connect(sock: socket.socket, handler: Handler, name: str) -> Link:
    """Wrap one end of a socketpair in a Link on the running loop."""
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    _, link = await loop.connect_accepted_socket(lambda: Link(handler, name), sock=sock)
    return link
