"""A small pooled HTTP/1.1 GET client, just enough for auth_http.

Why not aiohttp's client: an auth_http exchange is one GET with a dozen headers and an answer
that is all headers, once per login, on the hottest path mailgate has. Profiling a login storm
put aiohttp's request machinery (URL objects, multidicts, cookie handling, tracing hooks,
response objects) at a third of mailgate's CPU per login. This module does only what auth_http
needs: keep-alive connections on asyncio Protocols, a bounded response head, a bounded body
that is read and dropped, and one retry when a pooled connection turns out to be closed.

Everything is bounded: the number of connections, the size of the answer, and (by the caller,
with asyncio.timeout) the time. Error messages never quote the answer, which may hold a
password in Auth-Pass.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from mailgate.netio import expire_waiter

# nginx reads the whole answer into one 1 KiB buffer. We allow 4 KiB per header line so a
# long Auth-Pass still fits (sasl.MAX_FIELD is 1 KiB, and escaping can triple it).
MAX_HEADER_LINE = 4096
# An answer carries at most eight auth headers, plus what a web framework adds on its own
# (Date, Server, Content-Type, Content-Length, Connection ...).
MAX_HEADERS = 32
MAX_HEAD = MAX_HEADER_LINE * 4  # the status line and every header together
# The body means nothing to auth_http. One this small is read and dropped so the connection
# can be reused; a larger or unknown-length body is not read: the connection is closed.
MAX_BODY = 4096


class HttpError(Exception):
    """The answer is not HTTP we accept. The message never quotes the answer."""


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: dict[str, str]  # lower-case names; the last of repeated headers wins (as nginx)


class _Connection(asyncio.Protocol):
    __slots__ = ("_buf", "_waiter", "idle_since", "lost", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self.lost = False
        self.idle_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's do not subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if len(self._buf) > MAX_HEAD + MAX_BODY and self.transport is not None:
            self.transport.pause_reading()  # enough to decide; the rest is never read
        self._wake()

    def eof_received(self) -> bool:
        self.lost = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _more(self, deadline: float) -> None:
        if self.lost:
            raise ConnectionResetError("auth_http server closed the connection")
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_at(deadline, expire_waiter, waiter)  # cheaper than asyncio.timeout here
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()

    async def exchange(self, request: bytes, deadline: float) -> tuple[Answer, bool]:
        """Send one request; return the answer and whether the connection can be reused."""
        assert self.transport is not None
        self._buf.clear()
        self.transport.write(request)
        while (end := self._buf.find(b"\r\n\r\n")) < 0:
            if len(self._buf) > MAX_HEAD:
                raise HttpError("auth_http answer head too large")
            await self._more(deadline)
        answer, version = _parse_head(bytes(self._buf[:end]))
        del self._buf[: end + 4]
        reusable = _keep_alive(version, answer.headers)
        length = _body_length(answer)
        if length is None or length > MAX_BODY:
            return answer, False  # an unknown or large body is not read: drop the connection
        while len(self._buf) < length:
            await self._more(deadline)
        return answer, reusable and len(self._buf) == length


def _parse_head(head: bytes) -> tuple[Answer, str]:
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[1].isdigit():
        raise HttpError("auth_http answer has no HTTP status line")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError("auth_http answer has too many headers")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or len(line) > MAX_HEADER_LINE or name != name.strip():
            raise HttpError("auth_http answer has a malformed header line")
        # latin-1 maps bytes 1:1, so Auth-Pass reaches the backend exactly as sent.
        headers[name.decode("latin-1").lower()] = value.strip(b" \t").decode("latin-1")
    return Answer(int(parts[1]), headers), parts[0].decode("ascii")


def _keep_alive(version: str, headers: dict[str, str]) -> bool:
    connection = headers.get("connection", "").lower()
    if version == "HTTP/1.0":
        return connection == "keep-alive"
    return connection != "close"


def _body_length(answer: Answer) -> int | None:
    if answer.status in (204, 304) or 100 <= answer.status < 200:
        return 0
    if "transfer-encoding" in answer.headers:
        return None
    text = answer.headers.get("content-length", "")
    return int(text) if text.isdigit() and len(text) < 10 else None


class HttpPool:
    """Keep-alive connections to one auth_http URL, at most `limit` requests at once."""

    def __init__(self, url: str, *, limit: int, keepalive: float) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"auth_http url must be http://host[:port]/path, got {url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._keepalive = keepalive
        self._slots = asyncio.BoundedSemaphore(limit)
        self._idle: list[_Connection] = []
        self._closed = False

    async def get(self, headers: list[tuple[str, str]], deadline: float) -> Answer:
        """GET the URL with these headers (Host included); TimeoutError past `deadline`
        (loop time)."""
        lines = [f"GET {self.target} HTTP/1.1\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers]
        lines.append("\r\n")
        request = "".join(lines).encode("utf-8", "surrogateescape")
        if self._slots.locked():  # every connection busy: wait for one, but not forever
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        else:
            await self._slots.acquire()
        try:
            conn = self._pooled()
            if conn is not None:
                try:
                    return await self._exchange(conn, request, deadline)
                except ConnectionError:
                    pass  # the server closed an idle connection: one retry, fresh
            async with asyncio.timeout_at(deadline):
                conn = await self._connect()
            return await self._exchange(conn, request, deadline)
        finally:
            self._slots.release()

    def _pooled(self) -> _Connection | None:
        loop_time = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()
            if not conn.lost and loop_time - conn.idle_since < self._keepalive:
                return conn
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self._host, self._port, ssl=self._ssl)
        return conn

    async def _exchange(self, conn: _Connection, request: bytes, deadline: float) -> Answer:
        reusable = False
        try:
            answer, reusable = await conn.exchange(request, deadline)
            return answer
        finally:  # on errors, timeouts and cancellation alike, a half-used connection goes
            if reusable and not conn.lost and not self._closed:
                conn.idle_since = asyncio.get_running_loop().time()
                self._idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
