"""A minimal IMAP and POP3 login proxy on asyncio Protocols and uvloop: the floor for mailgate.

    python bench/minproxy.py --backend-imap 10143 --backend-pop3 10110 --imap 20143 \\
        --pop3 20110 [--imaps 20993 --cert C.pem --key K.pem] [--imaps 20994 --cert ... --key ...]

Greeting, the login command parsed (IMAP `tag LOGIN user pass` with atoms or quoted strings,
POP3 USER and PASS), one fixed backend logged in to with the same credentials, then a byte
relay: data_received writes straight into the other transport, and a full write buffer pauses
reading on the other side. No auth service, no timeouts, no limits beyond one line cap: this is
what the least a Python login proxy can do costs, not a product. One process, one thread.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import ssl

MAX_LINE = 8192  # far above any login line the bench sends
HIGH_WATER = 256 * 1024  # write buffer at which the other side stops reading
# IMAP: tag, LOGIN, then two atoms or quoted strings (no literals: the bench sends none).
IMAP_LOGIN = re.compile(rb'(\S+) LOGIN ("(?:[^"\\]|\\.)*"|\S+) ("(?:[^"\\]|\\.)*"|\S+)$', re.I)


def unquote(word: bytes) -> bytes:
    if word.startswith(b'"'):
        return re.sub(rb"\\(.)", rb"\1", word[1:-1])
    return word


def quote(word: bytes) -> bytes:
    return b'"' + word.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


class Relay(asyncio.Protocol):
    """One side of a relayed session: what it reads goes to `peer`'s transport."""

    __slots__ = ("peer", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: Relay | None = None

    def relay_to(self, peer: Relay) -> None:
        self.peer = peer
        assert self.transport is not None
        self.transport.set_write_buffer_limits(HIGH_WATER)

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.close()  # flushes what is buffered first


class Backend(Relay):
    """Logs in to the backend, then relays. `done` gets True (logged in) or False."""

    __slots__ = ("buf", "done", "steps")

    def __init__(self, steps: list[tuple[bytes, bytes]], done: asyncio.Future[bool]) -> None:
        super().__init__()
        self.steps = steps  # (what to send after a line starting so, expected prefix)
        self.done = done
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        self.buf += data
        while b"\n" in self.buf and not self.done.done():
            line, self.buf = self.buf.split(b"\n", 1)
            expect, send = self.steps[0]
            if line.startswith(b"* ") and expect != b"* OK":
                continue  # untagged data before the tagged LOGIN reply
            if not line.startswith(expect):
                self.done.set_result(False)
                return
            self.steps.pop(0)
            if not send:
                self.done.set_result(True)
                return
            assert self.transport is not None
            self.transport.write(send)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(False)
        super().connection_lost(exc)


class Client(Relay):
    """The client side: greeting and login before the relay."""

    __slots__ = ("backend", "buf", "pop3", "user")

    def __init__(self, pop3: bool, backend: tuple[str, int]) -> None:
        super().__init__()
        self.pop3, self.backend, self.buf, self.user = pop3, backend, b"", b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.send(b"+OK ready.\r\n" if self.pop3 else b"* OK [CAPABILITY IMAP4rev1] ready.\r\n")

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            assert self.peer.transport is not None
            self.peer.transport.write(data)
            return
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            (self.pop3_line if self.pop3 else self.imap_line)(line.rstrip(b"\r"))
        if len(self.buf) > MAX_LINE:
            assert self.transport is not None
            self.transport.close()

    def imap_line(self, line: bytes) -> None:
        login = IMAP_LOGIN.match(line)
        tag = line.split(b" ", 1)[0]
        if login:
            user, password = unquote(login[2]), unquote(login[3])
            steps = [
                (b"* OK", b"a LOGIN " + quote(user) + b" " + quote(password) + b"\r\n"),
                (b"a OK", b""),
            ]
            self.log_in(steps, tag + b" OK Logged in\r\n", tag + b" NO [UNAVAILABLE] sorry\r\n")
        elif line[len(tag) :].upper() == b" LOGOUT":
            self.send(b"* BYE bye\r\n" + tag + b" OK bye\r\n")
            assert self.transport is not None
            self.transport.close()
        else:
            self.send(tag + b" BAD not here\r\n")

    def pop3_line(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        if verb.upper() == b"USER":
            self.user = arg
            self.send(b"+OK\r\n")
        elif verb.upper() == b"PASS" and self.user:
            steps = [
                (b"+OK", b"USER " + self.user + b"\r\n"),
                (b"+OK", b"PASS " + arg + b"\r\n"),
                (b"+OK", b""),
            ]
            self.log_in(steps, b"+OK Logged in.\r\n", b"-ERR [SYS/TEMP] sorry\r\n")
        else:
            self.send(b"-ERR not here\r\n")

    def log_in(self, steps: list[tuple[bytes, bytes]], ok: bytes, fail: bytes) -> None:
        assert self.transport is not None
        self.transport.pause_reading()  # nothing more until the backend answered
        asyncio.get_running_loop().create_task(self.connect(steps, ok, fail))

    async def connect(self, steps: list[tuple[bytes, bytes]], ok: bytes, fail: bytes) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bool] = loop.create_future()
        try:
            _, backend = await loop.create_connection(lambda: Backend(steps, done), *self.backend)
        except OSError:
            self.send(fail)
            return
        assert self.transport is not None
        if not await done or self.transport.is_closing():
            self.send(fail)
            assert backend.transport is not None
            backend.transport.close()
            self.transport.resume_reading()
            return
        self.send(ok)
        self.relay_to(backend)
        backend.relay_to(self)
        if self.buf:
            assert backend.transport is not None
            backend.transport.write(self.buf)  # pipelined behind the login
        self.buf = b""
        self.transport.resume_reading()


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    imap, pop3 = ("127.0.0.1", args.backend_imap), ("127.0.0.1", args.backend_pop3)
    servers = [await loop.create_server(lambda: Client(False, imap), "127.0.0.1", args.imap)]
    if args.pop3:
        servers.append(await loop.create_server(lambda: Client(True, pop3), "127.0.0.1", args.pop3))
    for port, cert, key in zip(args.imaps, args.cert, args.key, strict=True):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        make = lambda: Client(False, imap)  # noqa: E731
        servers.append(await loop.create_server(make, "127.0.0.1", port, ssl=ctx))
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-imap", type=int, required=True)
    parser.add_argument("--backend-pop3", type=int)
    parser.add_argument("--imap", type=int, required=True)
    parser.add_argument("--pop3", type=int)
    parser.add_argument("--imaps", type=int, action="append", default=[])
    parser.add_argument("--cert", action="append", default=[])
    parser.add_argument("--key", action="append", default=[])
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args))
    else:
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
