"""Run mailgate, fake auth services and fake backends on 127.0.0.1 for integration tests.

`running_proxy` starts a real mailgate worker (the same `server.Worker` that `mailgate serve`
runs) on its own event loop in a thread, so blocking clients (imaplib, poplib, smtplib) can be
used from the test. Fakes are for fault injection only: a backend that hangs, closes or
refuses; an auth service that answers fixed headers or garbage.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import ssl
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
    sockets = [server.bind(lst) for lst in settings.listeners]
    ports = [s.getsockname()[1] for s in sockets]
    loop = server.new_loop()
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
        # Token logins put up to [oauth] max_token (and more) in Auth-Pass: fields as
        # long as mailgate's own auth-server takes.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1, max_field_size=1 << 17)
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


# A FakeBackend handler's reply that ends with this is sent, then the connection is dropped.
CLOSE = b"<close>"


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
                if reply.endswith(CLOSE):  # send what comes before, then drop the connection
                    writer.write(reply.removesuffix(CLOSE))
                    await writer.drain()
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


def read_until(sock: socket.socket, marker: bytes, limit: float = 10.0) -> bytes:
    """Read until `marker` arrives, the peer closes, or `limit` seconds pass."""
    data = b""
    deadline = time.monotonic() + limit
    while marker not in data and time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def raw_session(port: int) -> socket.socket:
    """A plain socket to `port`, past the server's greeting."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    read_until(sock, b"\r\n")  # greeting
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # free on every address: some tests bind the wildcard
        return int(s.getsockname()[1])


# --- more fakes: a POP3 backend, and backends that speak TLS ---------------------------------


def pop3_backend(
    password: str = "secret", messages: tuple[bytes, ...] = (b"Subject: hello\r\n\r\nhi\r\n",)
) -> FakeBackend:
    """A POP3 backend that accepts USER/PASS (or AUTH PLAIN) with `password` and serves
    `messages` to STAT, LIST and RETR. It never checks the order of commands."""

    def retr(arg: bytes) -> bytes:
        if not arg.isdigit() or not 1 <= int(arg) <= len(messages):
            return b"-ERR No such message\r\n"
        body = messages[int(arg) - 1]
        stuffed = b"\r\n".join(
            b"." + line if line.startswith(b".") else line for line in body.split(b"\r\n")
        )
        return b"+OK %d octets\r\n" % len(body) + stuffed.removesuffix(b"\r\n") + b"\r\n.\r\n"

    def auth_plain(arg: bytes) -> bytes:
        mech, _, blob = arg.partition(b" ")
        try:
            fields = base64.b64decode(blob, validate=True).split(b"\0")
        except ValueError:
            return b"-ERR Invalid base64\r\n"
        if mech.upper() == b"PLAIN" and len(fields) == 3 and fields[2] == password.encode():
            return b"+OK Logged in (fake backend)\r\n"
        return b"-ERR [AUTH] Authentication failed.\r\n"

    def handle(line: bytes) -> bytes | None:
        cmd, _, arg = line.rstrip(b"\r\n").partition(b" ")
        cmd = cmd.upper()
        if cmd in (b"USER", b"XCLIENT", b"NOOP"):
            return b"+OK\r\n"
        if cmd == b"PASS":
            if arg == password.encode():
                return b"+OK Logged in (fake backend)\r\n"
            return b"-ERR [AUTH] Authentication failed.\r\n"
        if cmd == b"AUTH":
            return auth_plain(arg)
        if cmd == b"STAT":
            return b"+OK %d %d\r\n" % (len(messages), sum(len(m) for m in messages))
        if cmd == b"RETR":
            return retr(arg)
        if cmd == b"QUIT":
            return b"+OK Logging out (fake backend)\r\n"
        return b"-ERR Unknown command\r\n"

    return FakeBackend(greeting=b"+OK fake pop3 ready\r\n", handler=handle)


@dataclass
class TlsBackend(FakeBackend):
    """A FakeBackend that speaks TLS with `context` (a server context): from the first byte,
    or after an IMAP STARTTLS / POP3 STLS command when `starttls` is set. Lines that arrived
    over TLS are also recorded in `secure_lines`; failed handshakes in `tls_errors`."""

    context: ssl.SSLContext | None = None
    starttls: bool = False
    secure_lines: list[bytes] = field(default_factory=list)
    tls_errors: list[str] = field(default_factory=list)


def _starttls_reply(line: bytes) -> bytes | None:
    words = line.rstrip(b"\r\n").split(b" ")
    if words[0].upper() == b"STLS":
        return b"+OK Begin TLS negotiation\r\n"
    if len(words) == 2 and words[1].upper() == b"STARTTLS":
        return words[0] + b" OK Begin TLS negotiation now\r\n"
    return None


@contextlib.contextmanager
def running_tls_backend(fake: TlsBackend) -> Iterator[TlsBackend]:
    context = fake.context
    if context is None:
        raise ValueError("TlsBackend needs a server context")
    handlers: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        secure = not fake.starttls
        try:
            writer.write(fake.greeting or b"")
            while line := await reader.readline():
                fake.lines.append(line)
                if secure:
                    fake.secure_lines.append(line)
                upgrade = None if secure else _starttls_reply(line)
                if upgrade is not None:
                    writer.write(upgrade)
                    await writer.drain()
                    await writer.start_tls(context)
                    secure = True
                    continue
                reply = fake.handler(line)
                if reply == b"<close>":
                    break
                if reply is not None:
                    writer.write(reply)
                    await writer.drain()
        except (ssl.SSLError, ConnectionError) as e:
            fake.tls_errors.append(type(e).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            handlers.discard(task)

    with _thread_loop() as loop:

        async def start() -> asyncio.Server:
            tls = None if fake.starttls else context
            return await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)

        srv = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
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


# --- SMTP backends: a real SMTP server (aiosmtpd) with XCLIENT, and a scriptable line fake ------


@dataclass
class Delivery:
    """One message a backend accepted at DATA, with what the session told it beforehand."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    xclient: dict[str, str]  # the XCLIENT attributes of the session (empty without XCLIENT)
    login: str | None  # the AUTH PLAIN/LOGIN user of the session


@dataclass
class SmtpBackend:
    """An aiosmtpd server that offers XCLIENT (as Postfix does) and AUTH PLAIN LOGIN.

    Every command is recorded in `commands` as (verb, argument), in order across sessions.
    `rcpt_reply(address)` may return a refusal ("550 5.1.1 ...") instead of accepting a
    recipient; `logins` holds (user, password) of every AUTH; `deliveries` every DATA.
    """

    password: str = "secret"
    rcpt_reply: Callable[[str], str | None] = lambda _address: None
    commands: list[tuple[str, str]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    port: int = 0

    def verbs(self) -> list[str]:
        return [verb for verb, _ in self.commands]


# Postfix's XCLIENT_README attributes, as Postfix lists them after its XCLIENT keyword.
SMTP_XCLIENT_OFFER = "250-XCLIENT NAME ADDR PORT PROTO HELO LOGIN DESTADDR DESTPORT"


class _SmtpHandler:
    """aiosmtpd hooks recording into a SmtpBackend."""

    def __init__(self, fake: SmtpBackend) -> None:
        self.fake = fake

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        self.fake.commands.append(("EHLO", hostname))
        session.host_name = hostname
        return [*responses[:-1], SMTP_XCLIENT_OFFER, responses[-1]]

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.fake.commands.append(("MAIL", address))
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.fake.commands.append(("RCPT", address))
        refusal = self.fake.rcpt_reply(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.fake.commands.append(("DATA", ""))
        self.fake.deliveries.append(
            Delivery(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(envelope.original_content or b""),
                dict(getattr(session, "xclient", {})),
                session.auth_data.login.decode() if session.auth_data else None,
            )
        )
        return "250 2.0.0 Ok: queued as FAKE"


def _aiosmtpd_server(fake: SmtpBackend, loop: asyncio.AbstractEventLoop) -> Any:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

    class XclientSMTP(SMTP):
        async def smtp_XCLIENT(self, arg: str) -> None:
            fake.commands.append(("XCLIENT", arg))
            pairs = dict(item.partition("=")[::2] for item in arg.split())
            session: Any = self.session
            # Postfix: XCLIENT resets the session to its start; the client must EHLO again.
            session.xclient = {**getattr(session, "xclient", {}), **pairs}
            session.host_name = None
            session.extended_smtp = False
            await self.push("220 backend.test ESMTP (after XCLIENT)")

    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        fake.commands.append(("AUTH", mechanism))
        fake.logins.append((data.login.decode(), data.password.decode()))
        ok = data.password == fake.password.encode()
        return AuthResult(success=ok, handled=False, auth_data=data)

    return XclientSMTP(
        _SmtpHandler(fake),
        hostname="backend.test",
        authenticator=authenticate,
        auth_require_tls=False,
        loop=loop,
    )


@contextlib.contextmanager
def running_smtp_backend(fake: SmtpBackend) -> Iterator[SmtpBackend]:
    protocols: list[Any] = []

    def protocol() -> Any:
        protocols.append(_aiosmtpd_server(fake, loop))
        return protocols[-1]

    with _thread_loop() as loop:

        async def start() -> asyncio.Server:
            return await loop.create_server(protocol, "127.0.0.1", 0)

        srv = asyncio.run_coroutine_threadsafe(start(), loop).result(5)
        fake.port = srv.sockets[0].getsockname()[1]
        try:
            yield fake
        finally:

            async def stop() -> None:
                srv.close()
                tasks = [p._handler_coroutine for p in protocols if p._handler_coroutine]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            asyncio.run_coroutine_threadsafe(stop(), loop).result(5)


def smtp_line_backend(
    rcpt: bytes | None = b"250 2.1.5 Ok\r\n", xclient: bytes = b"220 line.test ESMTP\r\n"
) -> FakeBackend:
    """A bare SMTP FakeBackend offering XCLIENT: every command gets a fixed reply, XCLIENT gets
    `xclient`, and RCPT gets `rcpt` (None: no answer at all, a backend that hangs)."""
    replies = {
        b"EHLO": b"250-line.test\r\n250 " + SMTP_XCLIENT_OFFER[4:].encode() + b"\r\n",
        b"XCLIENT": xclient,
        b"MAIL": b"250 2.1.0 Ok\r\n",
        b"QUIT": b"221 2.0.0 Bye\r\n",
    }

    def handle(line: bytes) -> bytes | None:
        verb = line.split(b" ", 1)[0].strip().upper()
        if verb == b"RCPT":
            return rcpt
        return replies.get(verb, b"502 5.5.2 Error: command not recognized\r\n")

    return FakeBackend(greeting=b"220 line.test ESMTP\r\n", handler=handle)
