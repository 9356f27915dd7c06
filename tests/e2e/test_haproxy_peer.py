"""Real HAProxy in front of a tiny asyncio server: the PROXY headers it sends parse as expected.

The server reads each connection's header with mailgate's parser, then what follows it. A
client connected through HAProxy must be named in the header by its real address and port,
and its first bytes must follow the header untouched; HAProxy's health checks must arrive too
(v2: as LOCAL headers), since mailgate must accept them without counting a failed login.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import peers
import pytest

from mailgate.protocols.proxy_protocol import (
    NEED_MORE,
    Command,
    Family,
    HeaderParsed,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)

from .conftest import require

# Generous bounds for a loaded 2-core machine; no test asserts on timing.
WAIT = 20.0
CHECK_INTERVAL = 0.2  # seconds between HAProxy's health checks
FIRST_BYTES = b"a1 CAPABILITY\r\n"


@dataclass(frozen=True)
class Arrival:
    header: ProxyHeader | None
    error: str | None
    after: bytes  # the bytes that followed the header, until the peer closed or a line ended
    peer: tuple[str, int]  # the TCP peer: HAProxy itself


async def read_connection(reader: asyncio.StreamReader, peer: tuple[str, int]) -> Arrival:
    parser, result = ProxyHeaderParser(), NEED_MORE
    try:
        while result is NEED_MORE:
            result = parser.receive(await reader.read(4096))
    except ProxyProtocolError as e:
        return Arrival(None, e.log_text, b"", peer)
    assert isinstance(result, HeaderParsed)
    after = result.trailing
    try:
        while not after.endswith(b"\n"):
            more = await reader.read(4096)
            if not more:
                break
            after += more
    except ConnectionError:
        pass  # a health check resets its connection right after the header
    return Arrival(result.header, None, after, peer)


def is_check(arrival: Arrival, backend_port: int) -> bool:
    """HAProxy's own health check: v2 sends LOCAL, v1 the check connection's real endpoints."""
    header = arrival.header
    assert header is not None
    return header.command is Command.LOCAL or header.destination_port == backend_port


async def through_haproxy(tmp_path: Path, send_proxy: str) -> tuple[list[Arrival], int, int, int]:
    """Arrivals at the server until a client session and a health check came through HAProxy;
    the client's port, HAProxy's frontend port and the server's port."""
    arrivals: asyncio.Queue[Arrival] = asyncio.Queue()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrival = await read_connection(reader, writer.get_extra_info("peername")[:2])
        await arrivals.put(arrival)
        if arrival.after:
            writer.write(b"* BYE seen\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    backend_port = server.sockets[0].getsockname()[1]
    front = peers.free_port()
    haproxy = await asyncio.to_thread(
        peers.start_haproxy,
        tmp_path,
        port=front,
        backend_port=backend_port,
        send_proxy=send_proxy,
        check_interval=CHECK_INTERVAL,
    )
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", front)
        client_port = writer.get_extra_info("sockname")[1]
        writer.write(FIRST_BYTES)
        assert await asyncio.wait_for(reader.readline(), WAIT) == b"* BYE seen\r\n"
        writer.close()
        seen: list[Arrival] = []
        while not any(a.after for a in seen) or not any(
            a.header and is_check(a, backend_port) for a in seen
        ):
            seen.append(await asyncio.wait_for(arrivals.get(), WAIT))
        return seen, client_port, front, backend_port
    finally:
        await asyncio.to_thread(haproxy.stop)
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("send_proxy", ["v2", "v1"])
def test_haproxy_names_the_client_and_its_health_checks_arrive(
    tmp_path: Path, send_proxy: str
) -> None:
    require("haproxy")
    arrivals, client_port, front, backend_port = asyncio.run(through_haproxy(tmp_path, send_proxy))
    assert [a.error for a in arrivals] == [None] * len(arrivals), arrivals

    session = [a for a in arrivals if a.after]
    assert len(session) == 1
    header = session[0].header
    assert header is not None
    assert header.version == (2 if send_proxy == "v2" else 1)
    assert header.command is Command.PROXY and header.family is Family.INET
    assert header.client == ("127.0.0.1", client_port)
    assert (header.destination_ip, header.destination_port) == ("127.0.0.1", front)
    assert session[0].peer[1] != client_port  # the TCP peer is HAProxy, not the client
    assert session[0].after == FIRST_BYTES

    checks = [a for a in arrivals if is_check(a, backend_port)]
    assert checks and all(not check.after for check in checks)
    for check in checks:
        assert check.header is not None
        if send_proxy == "v2":  # LOCAL, no address: mailgate keeps HAProxy's own
            assert check.header.command is Command.LOCAL and check.header.client is None
        else:  # v1 has no LOCAL: the check names its own connection
            assert check.header.client == check.peer
