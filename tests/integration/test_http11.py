"""The pooled HTTP/1.1 client under auth_http: reuse, stale connections, odd answers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from mailgate.auth.http11 import HttpError, HttpPool

OK = b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nContent-Length: 0\r\n\r\n"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, str, list[int]]:
    connections: list[int] = []

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/auth", connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def soon() -> float:
    """A deadline (loop time) no answer here should get near."""
    return asyncio.get_running_loop().time() + 10


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def test_connections_are_reused() -> None:
    async def answer_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(OK)

    async def go() -> None:
        server, url, connections = await serve(answer_forever)
        pool = HttpPool(url, limit=4, keepalive=15)
        for _ in range(5):
            answer = await pool.get([("Host", "127.0.0.1")], soon())
            assert (answer.status, answer.headers["auth-status"]) == (200, "OK")
        assert len(connections) == 1
        await pool.close()
        server.close()

    run(go())


def test_a_connection_the_server_closed_is_retried_once_fresh() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)  # keep-alive promised, then the server drops it (idle timeout)
        await writer.drain()

    async def go() -> None:
        server, url, connections = await serve(answer_once)
        pool = HttpPool(url, limit=4, keepalive=15)
        await pool.get([("Host", "x")], soon())
        await asyncio.sleep(0.1)  # the server has closed the pooled connection
        assert (await pool.get([("Host", "x")], soon())).status == 200
        assert len(connections) == 2
        await pool.close()
        server.close()

    run(go())


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nConnection: close\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n\r\n", False),
        (
            b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            False,
        ),
        (b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nContent-Length: 3\r\n\r\nabc", True),
    ],
)
def test_connections_are_dropped_when_reuse_is_unsafe(answer: bytes, reused: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(answer)

    async def go() -> None:
        server, url, connections = await serve(handler)
        pool = HttpPool(url, limit=4, keepalive=15)
        for _ in range(2):
            assert (await pool.get([("Host", "x")], soon())).headers["auth-status"] == "OK"
        assert len(connections) == (1 if reused else 2)
        await pool.close()
        server.close()

    run(go())


@pytest.mark.parametrize(
    "answer",
    [
        b"SMTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n bad: folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 20000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(40)) + b"\r\n",
    ],
    ids=["not http", "folded header", "huge head", "too many headers"],
)
def test_malformed_answers_are_errors_that_quote_nothing(answer: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer + b"Auth-Pass: hunter2\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def go() -> None:
        server, url, _ = await serve(handler)
        pool = HttpPool(url, limit=4, keepalive=15)
        with pytest.raises(HttpError) as raised:
            await pool.get([("Host", "x")], soon())
        assert "hunter2" not in str(raised.value)
        await pool.close()
        server.close()

    run(go())
