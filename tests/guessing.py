"""Issue 8's attacker: hundreds of password guesses at once for one user, over real sockets,
from one source address or from hundreds (127.0.x.y all route to loopback on Linux), with the
right password among them. Shared by the per-node and the cluster tests."""

from __future__ import annotations

import asyncio

VICTIM = "victim@example.com"
RIGHT = "the right one"
GUESSES = 300
BUDGET = 20


def deciding(backend_port: int):  # type: ignore[no-untyped-def]
    """An auth service that knows the victim's password."""

    def answer(request: dict[str, str]) -> dict[str, str]:
        if request.get("Auth-Pass") == RIGHT.replace(" ", "%20"):
            return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(backend_port)}
        return {"Auth-Status": "Invalid login or password"}

    return answer


async def guess(port: int, password: str, source: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        await asyncio.wait_for(reader.readline(), 10)
        writer.write(b'a LOGIN "%s" "%s"\r\n' % (VICTIM.encode(), password.encode()))
        await writer.drain()
        while True:
            line = await asyncio.wait_for(reader.readline(), 30)
            if line.startswith(b"a ") or not line:
                return line
    finally:
        writer.close()


async def attack(port: int | list[int], many_sources: bool) -> list[bytes]:
    """GUESSES logins at once, the last with the right password; over several ports (nodes)
    in turn when given a list."""
    ports = port if isinstance(port, list) else [port]
    guesses = [
        guess(
            ports[i % len(ports)],
            RIGHT if i == GUESSES - 1 else f"guess {i}",
            f"127.0.{1 + i // 250}.{2 + i % 250}" if many_sources else "127.0.0.1",
        )
        for i in range(GUESSES)
    ]
    return list(await asyncio.gather(*guesses))
