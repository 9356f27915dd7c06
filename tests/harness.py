"""Run mailgate, fake auth services and fake backends on 127.0.0.1 for integration tests.

`running_proxy` starts a real mailgate worker (the same `server.Worker` that `mailgate serve`
runs) on its own event loop in a thread, so blocking clients (imaplib, poplib, smtplib) can be
used from the test. Fakes are for fault injection only: a backend that hangs, closes or
refuses; an auth service that answers fixed headers or garbage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from mailgate import config, server


@dataclass
class Proxy:
    ports: list[int]
    settings: config.Settings
    loop: asyncio.AbstractEventLoop
    worker: server.Worker

    def port(self, protocol: str, tls: str = "none") -> int:
        for listener, port in zip(self.settings.listeners, self.ports, strict=True):
            if listener.protocol == protocol and listener.tls == tls:
                return port
        raise KeyError((protocol, tls))


@contextlib.contextmanager
def running_proxy(raw: dict[str, Any], base_dir: Path | None = None) -> Iterator[Proxy]:
    """Start mailgate with this config (listeners on port 0 get free ports)."""
    raw = dict(raw)
    raw.setdefault("throttle", {"enabled": False})
    raw.setdefault("shutdown_timeout", 1.0)
    settings = config.parse(raw, base_dir=base_dir or Path("."))
    sockets = [server.bind(lst, reuse_port=False) for lst in settings.listeners]
    ports = [s.getsockname()[1] for s in sockets]
    loop = server._new_loop()
    worker = server.Worker(settings, sockets, handle_signals=False)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(worker.run(), loop)
    deadline = time.monotonic() + 10
    while not worker.ready and not running.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    if running.done():
        running.result()  # raises what stopped the worker
    try:
        yield Proxy(ports, settings, loop, worker)
    finally:
        loop.call_soon_threadsafe(worker.stop.set)
        running.result(20)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def listener(protocol: str, tls: str = "none", **extra: Any) -> dict[str, Any]:
    return {"protocol": protocol, "listen": "127.0.0.1:0", "tls": tls, **extra}


# --- a fake auth_http service on its own thread ---------------------------------------------


@dataclass
class FakeAuth:
    """Answers every request with `answer(request_headers) -> response headers`."""

    answer: Callable[[dict[str, str]], dict[str, str]]
    requests: list[dict[str, str]] = field(default_factory=list)
    delay: float = 0.0
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"


@contextlib.contextmanager
def running_auth(fake: FakeAuth) -> Iterator[FakeAuth]:
    async def handle(request: web.Request) -> web.Response:
        headers = dict(request.headers)
        fake.requests.append(headers)
        if fake.delay:
            await asyncio.sleep(fake.delay)
        return web.Response(status=200, headers=fake.answer(headers))

    with _thread_loop() as loop:
        app = web.Application()
        app.router.add_get("/auth", handle)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        asyncio.run_coroutine_threadsafe(runner.setup(), loop).result(5)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), loop).result(5)
        fake.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield fake
        finally:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(5)


def route_to(
    port: int, host: str = "127.0.0.1", **more: str
) -> Callable[[dict[str, str]], dict[str, str]]:
    """An auth answer that sends every valid user to host:port."""

    def answer(_req: dict[str, str]) -> dict[str, str]:
        return {"Auth-Status": "OK", "Auth-Server": host, "Auth-Port": str(port), **more}

    return answer


# --- a scriptable fake backend (fault injection) ---------------------------------------------


@dataclass
class FakeBackend:
    """A line server: `handler(line) -> bytes to send` after sending `greeting`.

    Set `greeting=None` to never greet (a backend that hangs), `close_after_greeting` to drop
    the connection. Every received line is recorded in `lines`.
    """

    greeting: bytes | None = b"* OK fake ready\r\n"
    handler: Callable[[bytes], bytes | None] = lambda line: None
    lines: list[bytes] = field(default_factory=list)
    close_after_greeting: bool = False
    port: int = 0


@contextlib.contextmanager
def running_backend(fake: FakeBackend) -> Iterator[FakeBackend]:
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            if fake.greeting is None:
                await asyncio.sleep(3600)
            writer.write(fake.greeting)
            if fake.close_after_greeting:
                writer.close()
                return
            while line := await reader.readline():
                fake.lines.append(line)
                reply = fake.handler(line)
                if reply is None:
                    continue
                if reply == b"<close>":
                    break
                writer.write(reply)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            handlers.discard(task)

    with _thread_loop() as loop:
        srv = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(serve, "127.0.0.1", 0), loop
        ).result(5)
        fake.port = srv.sockets[0].getsockname()[1]
        try:
            yield fake
        finally:

            async def stop() -> None:
                srv.close()
                for task in list(handlers):
                    task.cancel()
                await asyncio.gather(*handlers, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)


def imap_backend(password: str = "secret", extra_ok: bytes = b"") -> FakeBackend:
    """A backend that accepts LOGIN with `password` (quoted) and echoes a marker on NOOP."""

    def handle(line: bytes) -> bytes | None:
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        cmd = rest.split(b" ", 1)[0].upper()
        if cmd == b"LOGIN":
            if rest.endswith(b'"' + password.encode() + b'"') or rest.endswith(password.encode()):
                return tag + b" OK [CAPABILITY IMAP4rev1 IDLE] Logged in" + extra_ok + b"\r\n"
            return tag + b" NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
        if cmd == b"NOOP":
            return b"* 1 EXISTS\r\n" + tag + b" OK NOOP completed (fake backend)\r\n"
        if cmd == b"LOGOUT":
            return b"* BYE Logging out\r\n" + tag + b" OK Logout completed.\r\n"
        if cmd == b"ID":
            return b"* ID NIL\r\n" + tag + b" OK ID completed\r\n"
        return tag + b" BAD unknown\r\n"

    return FakeBackend(handler=handle)


@contextlib.contextmanager
def _thread_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
