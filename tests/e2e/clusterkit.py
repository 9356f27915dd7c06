"""Helpers for the cluster tests: raw IMAP sessions, the control socket, a SQLite directory
made with the admin CLI, and a gate in front of Redis that holds its replies (fault
injection: it shows how many round trips a login waits for)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mailgate import cli
from mailgate.control import request as control_request

WAIT = 20.0  # a bound on waits for something that must happen, never a timing assertion
POLL = 0.05


def admin_here(config: Path, *argv: str, stdin: str = "") -> str:
    """One admin command in this process (cli.main), as an operator runs it."""
    code, out, err = admin_status(config, *argv, stdin=stdin)
    assert code == 0, (argv, out, err)
    return out


def admin_status(config: Path, *argv: str, stdin: str = "") -> tuple[int, str, str]:
    """An admin command that may fail: its exit status, stdout and stderr."""
    out, err, saved = io.StringIO(), io.StringIO(), sys.stdin
    sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main([*argv, "-c", str(config)])
    finally:
        sys.stdin = saved
    return code, out.getvalue(), err.getvalue()


def control(path: Path, **message: Any) -> dict[str, Any]:
    return control_request(path, message, timeout=30.0)


def wait_until(check: Callable[[], Any], what: str, limit: float = WAIT) -> Any:
    deadline = time.monotonic() + limit
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {limit} s: {what}")
        time.sleep(POLL)


class Imap:
    """A raw IMAP client session: LOGIN, a command, the server's goodbye."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=WAIT)
        self.buffer = b""
        self.greeting = self.line()

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed; had {self.buffer!r}")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def command(self, tag: bytes, text: bytes) -> list[bytes]:
        self.sock.sendall(tag + b" " + text + b"\r\n")
        lines: list[bytes] = []
        while True:
            try:
                line = self.line()
            except ConnectionError as e:  # what came before the close says why (a BYE)
                raise ConnectionError(f"{e} after {lines!r}") from None
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def login(self, user: str, password: str) -> bytes:
        return self.command(b"a", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))[-1]

    def rest(self) -> bytes:
        """What the server sends until it closes (a kick's BYE)."""
        data = self.buffer
        with contextlib.suppress(OSError):
            while chunk := self.sock.recv(65536):
                data += chunk
        self.buffer = b""
        return data

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def login_once(host: str, port: int, user: str, password: str) -> bytes:
    session = Imap(host, port)
    try:
        reply = session.login(user, password)
        if b" OK " in reply:
            session.command(b"z", b"LOGOUT")
        return reply
    finally:
        session.close()


class RedisGate:
    """A TCP proxy to Redis whose replies can be held: `hold()`, then `release()` lets
    everything received so far through, one round at a time; `open()` passes all again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = 0
        self.holding = False
        self.requests = 0
        self.held: list[tuple[asyncio.StreamWriter, bytes]] = []
        self.held_requests: list[bytes] = []  # beside `held`: the request each reply answers
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RedisGate:
        self._thread.start()
        server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(5)
        self._server = server
        self.port = server.sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self._server.close()

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def hold(self) -> None:
        self._call(lambda: setattr(self, "holding", True))

    def release(self) -> int:
        """Send on what is held; how many replies that was."""

        def go() -> int:
            held, self.held, self.held_requests = self.held, [], []
            for writer, data in held:
                writer.write(data)
            return len(held)

        return int(self._call(go))

    def open(self) -> None:
        def go() -> None:
            self.holding = False
            for writer, data in self.held:
                writer.write(data)
            self.held, self.held_requests = [], []

        self._call(go)

    def waiting(self) -> int:
        return int(self._call(lambda: len(self.held)))

    def waiting_for(self, marker: bytes, among: tuple[bytes, ...] = ()) -> bool:
        """A held reply answers a request that carries `marker` (a user's name), and one of
        `among` if given (the SHA1 of the scripts that count)."""

        def found() -> bool:
            return any(
                marker in r and (not among or any(sha in r for sha in among))
                for r in self.held_requests
            )

        return bool(self._call(found))

    def seen(self) -> int:
        return int(self._call(lambda: self.requests))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        except OSError:
            writer.close()
            return

        asked = [b""]  # what this connection sent last: the request a held reply answers

        async def forward() -> None:
            while data := await reader.read(65536):
                self.requests += 1
                asked[0] = data
                up_writer.write(data)
            up_writer.close()

        async def back() -> None:
            while data := await up_reader.read(65536):
                if self.holding:
                    self.held.append((writer, data))
                    self.held_requests.append(asked[0])
                else:
                    writer.write(data)
            writer.close()

        with contextlib.suppress(OSError, ConnectionError):
            await asyncio.gather(forward(), back())


@contextlib.contextmanager
def sessions() -> Iterator[list[Imap]]:
    opened: list[Imap] = []
    try:
        yield opened
    finally:
        for s in opened:
            s.close()
