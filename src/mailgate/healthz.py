"""The health endpoint a load balancer polls (`health_listen`): `GET /healthz`.

200 "ok" while the node serves; 503 "starting" until its first workers are ready and 503
"draining" from the moment it begins to shut down (SIGTERM), while it still serves for
`drain_delay` seconds: the balancer stops sending new clients before the listeners close
(HAProxy: `option httpchk GET /healthz` and `check port`; after `fall` failed checks of
`inter` apart the server is down, so `drain_delay` should be at least fall x inter). A reload
keeps the node healthy: new workers take the new clients on the same sockets.

The answer's body also says whether the node counts in the cluster or alone ("redis=down"),
for a human; the status does not depend on it (a node counting alone still serves).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from enum import Enum

from mailgate.config import parse_address

# A health check is one short request: its line and headers, read within this long.
READ_TIMEOUT = 2.0
MAX_REQUEST = 8 * 1024


class Phase(Enum):
    STARTING = "starting"
    SERVING = "ok"
    DRAINING = "draining"


class HealthEndpoint:
    def __init__(self, listen: str, detail: Callable[[], str] = lambda: "") -> None:
        self.host, self.port = parse_address(listen, "health_listen")
        self.phase = Phase.STARTING
        self.detail = detail
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host or None, self.port, limit=MAX_REQUEST, reuse_address=True
        )

    @property
    def bound_port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    del header
        except (TimeoutError, ValueError, ConnectionError, asyncio.LimitOverrunError):
            writer.close()
            return
        method, _, rest = line.decode("latin-1").partition(" ")
        path = rest.split(" ", 1)[0]
        if path.split("?", 1)[0] not in ("/healthz", "/health", "/"):
            status, body = "404 Not Found", "not found\n"
        elif self.phase is Phase.SERVING:
            status, body = "200 OK", "ok"
        else:
            status, body = "503 Service Unavailable", self.phase.value
        if status[0] != "4":
            body = " ".join(filter(None, (body, self.detail()))) + "\n"
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(ConnectionError, OSError):
            writer.write(head.encode() + (b"" if method == "HEAD" else body.encode()))
            await writer.drain()
        writer.close()
