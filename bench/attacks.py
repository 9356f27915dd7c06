"""Three attacks of issue 7, measured against this checkout's mailgate and an older one.

    python bench/attacks.py --compare ../old-checkout/src   # before/after, side by side
    python bench/attacks.py                                 # this checkout only
    python bench/attacks.py --seconds 10 --clients 20 --stalled 1000 --keep

1. A never-reading pipeliner: `--clients` connections send `a CAPABILITY` as fast as they can
   for `--seconds` and never read. The worker's RSS before, at the peak, while the clients
   hold their connections (still not reading) after mailgate's own timeouts would have ended
   the sessions, and 5 s after they left; and how many of those sockets mailgate still holds
   then (ESTABLISHED on its port, and its socket descriptors above the start).
2. Stalled implicit-TLS handshakes: `--stalled` connections from 127.0.0.2 to the IMAPS port
   that never send a ClientHello, `max_sessions = 100`; then a normal TLS login (imaplib) from
   127.0.0.3: did it succeed, how long it took, how many descriptors mailgate held.
3. A goodbye inside a relayed response: a backend (here, in-process) that starts a 100,000-byte
   FETCH literal (POP3: a RETR body), sends part of it and closes; the client logged in through
   mailgate reads until the close. More bytes than the backend sent, or `BYE` / `-ERR` among
   them, means mailgate wrote its goodbye into the message.

Each mailgate runs from a checkout's src/ (PYTHONPATH), one fresh process per attack, on
127.0.0.1 high ports in one temp dir, and is stopped by PID. Each version gets a config it
accepts: keys a checkout's config.py does not know (`send_timeout`, `[limits]`) are left out
of its config. The C backend and the auth_http nginx are bench/run.py's. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import imaplib
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lab import (
    PYTHON,
    ROOT,
    Lab,
    Proc,
    compile_tools,
    free_port,
    make_certificates,
    python_env,
    tree,
)
from measure import mailgate_worker
from paths import (
    PASSWORD,
    USER,
    BenchPath,
    Shared,
    auth_http_section,
    mailgate_config,
    start_auth,
    start_imapd,
    wait_mailgate,
)

# Short pre-login timeouts, the same for both versions, so that "after mailgate's own timeouts
# would have ended the sessions" comes within seconds (the defaults are 30, 60 and 30 s).
CLIENT_TIMEOUT = 5
LOGIN_TIMEOUT = 10
SEND_TIMEOUT = 5  # only for a checkout that knows the key
# Held sockets are counted this long after the login timeout (or the end of the flood, if
# later): the new core's linger is 2 s.
HOLD_AFTER = 5.0
LEAVE_SETTLE = 5.0  # RSS "after" is read this long after the clients closed
MAX_SESSIONS = 100
# The older core buffers replies without limit: stop sending at this RSS, and leave at once
# (cut the hold short) at the hard cap.
RSS_CAP_MIB = 1536
RSS_HARD_CAP_MIB = 3072
SAMPLE_EVERY = 0.2
COMMAND = b"a CAPABILITY\r\n"
CLIENT_RCVBUF, CLIENT_SNDBUF = 4096, 64 * 1024
# Attack 2: the stalled connections must outlive the measurement (the default is 10 s; an
# attacker simply reconnects), and the new core's handshake bound is set to max_sessions so
# that the per-address share (handshakes_per_ip, default 32) is what has to hold.
HANDSHAKE_TIMEOUT = 30
HANDSHAKES = 100
ATTACKER, VICTIM = "127.0.0.2", "127.0.0.3"
# Attack 3: the response the backend starts and the part of it it sends before it dies.
LITERAL_SIZE = 100_000
PARTIAL_LINES = 500  # of 80 bytes: 40,000 bytes of the 100,000
BODY_LINE = b"x" * 78 + b"\r\n"
PARTIAL = len(BODY_LINE) * PARTIAL_LINES

Value = float | int | bool | str | None
Figures = dict[str, Value]


@dataclass(frozen=True)
class Target:
    """One mailgate checkout: its src/ and which of the newer settings its config accepts."""

    name: str  # "old" or "new": the suffix of its processes' names (pipeliner@old)
    src: Path
    commit: str
    send_timeout: bool
    limits: bool

    @classmethod
    def of(cls, name: str, src: Path) -> Target:
        src = src.resolve()
        if not (src / "mailgate" / "__main__.py").exists():
            raise SystemExit(f"{src}: no mailgate package there (give a checkout's src/)")
        config = (src / "mailgate" / "config.py").read_text()
        done = subprocess.run(
            ["git", "-C", str(src), "log", "-1", "--format=%h"], capture_output=True, text=True
        )
        known = ('"send_timeout"' in config, '"handshakes_per_ip"' in config)
        return cls(name, src, done.stdout.strip() or "?", *known)

    @property
    def title(self) -> str:
        return f"{self.name} {self.commit}"

    def left_out(self) -> list[str]:
        return [
            k
            for k, on in (("send_timeout", self.send_timeout), ("[limits]", self.limits))
            if not on
        ]


# ---------------------------------------------------------------- mailgate and /proc


def config_text(
    shared: Shared,
    target: Target,
    ports: dict[str, int],
    auth: str,
    handshakes: bool = False,
) -> str:
    top = [f"client_timeout = {CLIENT_TIMEOUT}", f"login_timeout = {LOGIN_TIMEOUT}"]
    if target.send_timeout:
        top.append(f"send_timeout = {SEND_TIMEOUT}")
    text = "\n".join(top) + "\n" + mailgate_config(shared, ports, auth, max_sessions=MAX_SESSIONS)
    if handshakes:
        assert "[tls]\n" in text
        text = text.replace("[tls]\n", f"[tls]\nhandshake_timeout = {HANDSHAKE_TIMEOUT}\n", 1)
        if target.limits:
            text += f"\n[limits]\nhandshakes = {HANDSHAKES}\n"
    return text


def start(shared: Shared, target: Target, name: str, ports: dict[str, int], text: str) -> Proc:
    conf = shared.lab.tmp / f"{name}.toml"
    conf.write_text(text)
    argv = [PYTHON, "-m", "mailgate", "serve", "-c", str(conf)]
    proc = shared.lab.start(name, argv, env=python_env(target.src))
    wait_mailgate(proc, ports, 1)
    return proc


def worker_of(proc: Proc) -> int:
    """The process that serves sessions (mailgate itself, or its one worker)."""
    return mailgate_worker(BenchPath(proc.name, {}, frozenset(), [proc.pid]))


def rss_mib(pid: int) -> float:
    """VmRSS of one process, MiB; 0 if it is gone."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def descriptors(proc: Proc) -> Iterator[str]:
    """What each descriptor of mailgate's process tree is ("socket:[123]", a path ...)."""
    for pid in tree([proc.pid]):
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    yield str(fd.readlink())


def socket_fds(proc: Proc) -> int:
    """Socket descriptors open in mailgate's process tree."""
    return sum(name.startswith("socket:") for name in descriptors(proc))


def session_fds(proc: Proc, port: int) -> int:
    """mailgate's descriptors of TCP connections to `port` (its listener left out): the
    sessions it really holds, unlike ESTABLISHED, which counts those not yet accepted too."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != "0A":  # not LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    return sum(name in inodes for name in descriptors(proc))


def established_on(port: int) -> tuple[int, int]:
    """ESTABLISHED TCP sockets whose local port is `port` (mailgate's side of its sessions, and
    any still waiting to be accepted), and the bytes queued in their kernel send buffers."""
    count = queued = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
            queued += int(fields[4].split(":")[0], 16)
    return count, queued


def log_offset(proc: Proc) -> int:
    return proc.log.stat().st_size if proc.log.exists() else 0


def log_lines_since(proc: Proc, offset: int) -> int:
    with proc.log.open("rb") as f:
        f.seek(offset)
        return len(f.read().splitlines())


# ---------------------------------------------------------------- 1. the never-reading pipeliner


class Pipeliners:
    """Clients that send COMMAND over and over, never reading; one selector, one thread."""

    def __init__(self, port: int, count: int) -> None:
        self.payload = memoryview(COMMAND * 4096)
        self.socks: list[socket.socket] = []
        self.offset: dict[socket.socket, int] = {}
        self.sent = 0
        self.selector = selectors.DefaultSelector()
        for _ in range(count):
            sock = socket.socket()
            # A small receive window, as an attacker chooses it (before connect: it sets the
            # window scale), so that what grows is mailgate's buffering, not the kernel's: on
            # loopback the kernel otherwise takes ~4 MB of replies per connection first.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, CLIENT_SNDBUF)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port))
            sock.setblocking(False)
            self.socks.append(sock)
            self.offset[sock] = 0
            self.selector.register(sock, selectors.EVENT_WRITE)

    def pump(self, timeout: float) -> None:
        """Send whatever the sockets take now. Commands stay whole across partial sends."""
        for key, _ in self.selector.select(timeout):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            start = self.offset[sock]
            try:
                n = sock.send(self.payload[start:])
            except BlockingIOError:
                continue
            except OSError:
                self.selector.unregister(sock)  # closed by mailgate; keep the socket open
                continue
            self.sent += n
            self.offset[sock] = (start + n) % len(self.payload)

    def stop_sending(self) -> None:
        self.selector.close()

    def leave(self) -> None:
        self.stop_sending()
        for sock in self.socks:
            sock.close()


def greeting_time(port: int, timeout: float) -> float | None:
    """Seconds until a new client gets its greeting; None if it gets none within `timeout`."""
    began = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            if not sock.recv(64):
                return None
    except OSError:
        return None
    return time.monotonic() - began


def in_thread(work: Callable[[], float | None]) -> Callable[[], float | None]:
    """Run `work` now in a thread; the returned function waits for its result."""
    found: list[float | None] = [None]
    thread = threading.Thread(target=lambda: found.__setitem__(0, work()), daemon=True)
    thread.start()

    def result() -> float | None:
        thread.join()
        return found[0]

    return result


def pipeliner(shared: Shared, target: Target, seconds: float, clients: int) -> Figures:
    ports = {"imap": free_port()}
    text = config_text(shared, target, ports, auth_http_section(shared))
    proc = start(shared, target, f"pipeliner@{target.name}", ports, text)
    try:
        worker = worker_of(proc)
        time.sleep(0.5)
        before = rss_mib(worker)
        flood = Pipeliners(ports["imap"], clients)
        try:
            # Every client accepted before the flood: each session's timeouts start together.
            deadline = time.monotonic() + 5
            while session_fds(proc, ports["imap"]) < clients and time.monotonic() < deadline:
                time.sleep(0.05)
            figures = flooded(worker, ports["imap"], flood, seconds)
            figures["held_fds"] = session_fds(proc, ports["imap"])
        finally:
            flood.leave()
        time.sleep(LEAVE_SETTLE)
        after = rss_mib(worker)
        peak = float(figures["rss_peak"] or 0)
        return figures | {
            "rss_before": before,
            "rss_after": after,
            "growth_peak": peak - before,
            "growth_after": after - before,
        }
    finally:
        shared.lab.stop(proc)


def flooded(worker: int, port: int, flood: Pipeliners, seconds: float) -> Figures:
    """Flood for `seconds` (less if the worker passes RSS_CAP_MIB), then hold the connections,
    still not reading, until every session is past its timeouts; the figures then."""
    began = time.monotonic()
    peak, stopped_at, probe = 0.0, None, None
    next_sample = began
    while (now := time.monotonic()) < began + seconds:
        flood.pump(0.05)
        if probe is None and now >= began + seconds / 2:
            probe = in_thread(lambda: greeting_time(port, timeout=LOGIN_TIMEOUT))
        if now >= next_sample:
            next_sample = now + SAMPLE_EVERY
            peak = max(peak, rss_mib(worker))
            if peak > RSS_CAP_MIB:
                stopped_at = now - began
                break
    flood.stop_sending()
    _, queued = established_on(port)
    hold_until = began + max(time.monotonic() - began, LOGIN_TIMEOUT) + HOLD_AFTER
    while time.monotonic() < hold_until and peak <= RSS_HARD_CAP_MIB:
        time.sleep(SAMPLE_EVERY)
        peak = max(peak, rss_mib(worker))
    held, _ = established_on(port)
    return {
        "rss_peak": peak,
        "rss_held": rss_mib(worker),
        "sent_mb": flood.sent / 1e6,
        "queued_mb": queued / 1e6,
        "greeting_s": probe() if probe else None,
        "stopped_at": stopped_at,
        "cut_short": peak > RSS_HARD_CAP_MIB or None,
        "held": held,
    }


# ---------------------------------------------------------------- 2. stalled TLS handshakes


def open_stalled(port: int, count: int, source: str, within: float) -> list[socket.socket]:
    """`count` TCP connections from `source` that never send anything; those that connected."""
    pending: dict[int, socket.socket] = {}
    poller = select.poll()
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.bind((source, 0))
        sock.connect_ex(("127.0.0.1", port))
        pending[sock.fileno()] = sock
        poller.register(sock, select.POLLOUT)
    connected: list[socket.socket] = []
    deadline = time.monotonic() + within
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected.append(sock)
            else:
                sock.close()
    for sock in pending.values():
        sock.close()
    return connected


def still_open(socks: list[socket.socket]) -> int:
    """Of these never-writing clients, how many mailgate has not closed (nor written to)."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return len(socks) - len(poller.poll(0))


class FromAddress(imaplib.IMAP4_SSL):
    """IMAP4_SSL from a chosen source address (imaplib has no source_address)."""

    def __init__(self, source: str, port: int, context: ssl.SSLContext, timeout: float) -> None:
        self.source, self.context = source, context
        super().__init__("127.0.0.1", port, ssl_context=context, timeout=timeout)

    def _create_socket(self, timeout: float | None) -> socket.socket:
        sock = socket.create_connection(
            (self.host, self.port), timeout, source_address=(self.source, 0)
        )
        return self.context.wrap_socket(sock, server_hostname=self.host)


def tls_login(port: int, source: str, timeout: float) -> tuple[bool, float, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    began = time.monotonic()
    try:
        client = FromAddress(source, port, context, timeout)
        try:
            client.login(USER, PASSWORD)
        finally:
            with contextlib.suppress(Exception):
                client.logout()
    except (OSError, imaplib.IMAP4.error) as e:
        return False, time.monotonic() - began, f"{type(e).__name__}: {e}"[:60]
    return True, time.monotonic() - began, ""


def stalled_tls(shared: Shared, target: Target, stalled: int) -> Figures:
    ports = {"imap": free_port(), "imaps-ec": free_port()}
    text = config_text(shared, target, ports, auth_http_section(shared), handshakes=True)
    proc = start(shared, target, f"stalled@{target.name}", ports, text)
    socks: list[socket.socket] = []
    try:
        fds_before, offset = socket_fds(proc), log_offset(proc)
        socks = open_stalled(ports["imaps-ec"], stalled, ATTACKER, within=10)
        time.sleep(1.0)
        open_now, fds_stalled = still_open(socks), socket_fds(proc)
        ok, seconds, error = tls_login(ports["imaps-ec"], VICTIM, timeout=10)
        return {
            "connected": len(socks),
            "stalled_open": open_now,
            "fds_before": fds_before,
            "fds_stalled": fds_stalled,
            "login_ok": ok,
            "login_s": seconds,
            "login_error": error or None,
            "still_open_after": still_open(socks),
            "log_lines": log_lines_since(proc, offset),
        }
    finally:
        for sock in socks:
            sock.close()
        shared.lab.stop(proc)


# ---------------------------------------------------------------- 3. a goodbye inside a response


LITERAL = re.compile(rb"\{(\d+)(\+?)\}\r\n$")


class FaultBackend:
    """An IMAP and a POP3 backend in a thread: every login succeeds; FETCH and RETR start a
    LITERAL_SIZE-byte response, send PARTIAL bytes of it, then close the connection."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.servers: list[asyncio.Server] = []

    def start(self) -> tuple[int, int]:
        self.thread.start()
        ports = []
        for handler in (self._imap, self._pop3):
            server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(handler, "127.0.0.1", 0), self.loop
            ).result(5)
            self.servers.append(server)
            ports.append(int(server.sockets[0].getsockname()[1]))
        return ports[0], ports[1]

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        for server in self.servers:
            self.loop.call_soon_threadsafe(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    @staticmethod
    async def _imap(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"* OK [CAPABILITY IMAP4rev1] fault backend ready\r\n")
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                while m := LITERAL.search(line):  # LOGIN {5} ... as nginx and mailgate may send
                    if not m[2]:
                        writer.write(b"+ go on\r\n")
                    line += await reader.readexactly(int(m[1])) + await reader.readline()
                tag, _, rest = line.partition(b" ")
                command = rest.split(b" ", 1)[0].strip().upper()
                if command == b"FETCH":
                    head = b"* 1 FETCH (BODY[] {%d}\r\n" % LITERAL_SIZE
                    writer.write(head + BODY_LINE * PARTIAL_LINES)
                    await writer.drain()
                    break  # dies mid-literal
                if command == b"CAPABILITY":
                    writer.write(b"* CAPABILITY IMAP4rev1\r\n")
                elif command == b"ID":
                    writer.write(b"* ID NIL\r\n")
                elif command == b"LOGOUT":
                    writer.write(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                    break
                writer.write(tag + b" OK done\r\n")
                await writer.drain()
        writer.close()

    @staticmethod
    async def _pop3(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK fault backend ready\r\n")
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                command = line.split(b" ", 1)[0].strip().upper()
                if command == b"RETR":
                    writer.write(b"+OK %d octets\r\n" % LITERAL_SIZE + BODY_LINE * PARTIAL_LINES)
                    await writer.drain()
                    break  # dies mid-body
                if command == b"CAPA":
                    writer.write(b"+OK\r\nUSER\r\n.\r\n")
                elif command == b"QUIT":
                    writer.write(b"+OK bye\r\n")
                    break
                else:
                    writer.write(b"+OK\r\n")
                await writer.drain()
        writer.close()


def read_through(
    port: int, login: list[bytes], done: Callable[[bytes], bool], command: bytes
) -> bytes:
    """Log in through mailgate (each line of `login` waits for a reply line that `done`
    accepts), send `command`, and return everything that arrives until mailgate closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        stream = sock.makefile("rb")
        stream.readline()  # greeting
        for line in login:
            sock.sendall(line)
            while not done(reply := stream.readline()):
                if not reply:
                    raise RuntimeError(f"closed during the login: {line!r}")
        sock.sendall(command)
        return stream.read()


def goodbye(received: bytes, header: bytes, word: bytes) -> Figures:
    """What arrived after the response's first line: its size, whether it holds more than the
    backend sent or the goodbye `word`, and what followed the backend's bytes."""
    start = received.find(header)
    if start < 0:
        return {"received": 0, "goodbye": None, "added": repr(received[-40:])[2:-1]}
    body = received[start + len(header) :]
    added = body[PARTIAL:]
    return {
        "received": len(body),
        "goodbye": len(body) > PARTIAL or word in body,
        "added": repr(added)[2:-1][:48] if added else None,
    }


def relayed_goodbye(shared: Shared, target: Target, fault_auth: Shared) -> Figures:
    ports = {"imap": free_port(), "pop3": free_port()}
    text = config_text(shared, target, ports, auth_http_section(fault_auth))
    proc = start(shared, target, f"goodbye@{target.name}", ports, text)
    try:
        imap = read_through(
            ports["imap"],
            [b"a LOGIN %s %s\r\n" % (USER.encode(), PASSWORD.encode())],
            lambda reply: not reply or reply.startswith(b"a "),
            b"b FETCH 1 BODY[]\r\n",
        )
        pop3 = read_through(
            ports["pop3"],
            [b"USER %s\r\n" % USER.encode(), b"PASS %s\r\n" % PASSWORD.encode()],
            lambda reply: not reply or reply.startswith((b"+OK", b"-ERR")),
            b"RETR 1\r\n",
        )
        figures: Figures = {"sent": PARTIAL}
        imap_head = b"{%d}\r\n" % LITERAL_SIZE
        pop3_head = b"+OK %d octets\r\n" % LITERAL_SIZE
        for proto, found in (
            ("imap", goodbye(imap, imap_head, b"BYE")),
            ("pop3", goodbye(pop3, pop3_head, b"-ERR")),
        ):
            figures |= {f"{proto}_{key}": value for key, value in found.items()}
        return figures
    finally:
        shared.lab.stop(proc)


# ---------------------------------------------------------------- the table


def rows(clients: int, stalled: int) -> list[tuple[str, str, str]]:
    """(attack, figure key, what it is) in table order."""
    return [
        ("1 pipeliner", "rss_before", "worker RSS before, MiB"),
        ("", "rss_peak", "worker RSS peak, MiB"),
        ("", "rss_held", "worker RSS while they hold, MiB"),
        ("", "rss_after", f"worker RSS {LEAVE_SETTLE:.0f} s after they left, MiB"),
        ("", "growth_peak", "growth at the peak, MiB"),
        ("", "growth_after", f"growth left {LEAVE_SETTLE:.0f} s after they left, MiB"),
        ("", "sent_mb", "commands the clients could send, MB"),
        ("", "queued_mb", "replies in the kernel's send buffers then, MB"),
        (
            "",
            "greeting_s",
            f"a new client's greeting mid-flood took, s (-: none in {LOGIN_TIMEOUT} s)",
        ),
        ("", "stopped_at", f"flood stopped at RSS > {RSS_CAP_MIB} MiB after, s"),
        ("", "cut_short", f"hold cut short at RSS > {RSS_HARD_CAP_MIB} MiB"),
        ("", "held", f"ESTABLISHED on its port after its timeouts (of {clients})"),
        ("", "held_fds", f"of them mailgate's open descriptors (of {clients})"),
        ("2 stalled TLS", "connected", f"stalled connections made (of {stalled})"),
        ("", "stalled_open", "of them still open after 1 s"),
        ("", "fds_before", "mailgate socket fds before"),
        ("", "fds_stalled", "mailgate socket fds during the stall"),
        ("", "login_ok", f"TLS login from {VICTIM} succeeded"),
        ("", "login_s", "that login took, s"),
        ("", "login_error", "its error"),
        ("", "still_open_after", "stalled still open after the login"),
        ("", "log_lines", "lines mailgate logged"),
        ("3 goodbye in data", "sent", "bytes the backend sent before dying"),
        ("", "imap_received", "IMAP: literal bytes the client got"),
        ("", "imap_goodbye", "IMAP: goodbye written into the literal"),
        ("", "imap_added", "IMAP: what followed the backend's bytes"),
        ("", "pop3_received", "POP3: body bytes the client got"),
        ("", "pop3_goodbye", "POP3: goodbye written into the body"),
        ("", "pop3_added", "POP3: what followed the backend's bytes"),
    ]


def shown(value: Value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        digits = 3 if abs(value) < 1 else 2 if abs(value) < 100 else 0
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return value


# Figures whose new/old ratio says nothing (the same by construction, or counts of lines).
NO_RATIO = frozenset({"rss_before", "connected", "fds_before", "sent", "log_lines"})


def ratio(key: str, old: Value, new: Value) -> str:
    numbers = (int, float)
    if key in NO_RATIO or isinstance(old, bool) or isinstance(new, bool):
        return ""
    if isinstance(old, numbers) and isinstance(new, numbers) and old:
        return f"{new / old:.2f}"
    return ""


def table(results: dict[str, Figures], labels: list[str], clients: int, stalled: int) -> None:
    header = ["attack", "figure", *labels] + (["new/old"] if len(labels) == 2 else [])
    lines = [header]
    for attack, key, what in rows(clients, stalled):
        values = [results[label].get(key) for label in labels]
        line = [attack, what, *map(shown, values)]
        if len(labels) == 2:
            line.append(ratio(key, values[0], values[1]))
        lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for n, line in enumerate(lines):
        print(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("-+-".join("-" * w for w in widths))


# ---------------------------------------------------------------- the run


def run(args: argparse.Namespace, lab: Lab) -> None:
    targets = [Target.of("old", Path(args.compare))] if args.compare else []
    targets.append(Target.of("new", ROOT / "src"))
    for t in targets:
        without = f" (its config without {', '.join(t.left_out())})" if t.left_out() else ""
        print(f"{t.title}: {t.src}{without}")
    began = time.monotonic()
    tools = compile_tools(lab.tmp)
    certs = make_certificates(lab.tmp)
    imapd, imap, pop3 = start_imapd(lab, tools["imapd"])
    shared = Shared(lab, tools, certs, imapd, imap, pop3)
    shared.auth, shared.auth_port = start_auth(lab, imap, pop3)
    fault = FaultBackend()
    try:
        fault_imap, fault_pop3 = fault.start()
        auth, auth_port = start_auth(lab, fault_imap, fault_pop3, name="nginx-auth-fault")
        fault_auth = dataclasses.replace(shared, auth=auth, auth_port=auth_port)
        attacks: list[tuple[str, Callable[[Target], Figures]]] = [
            ("1 pipeliner", lambda t: pipeliner(shared, t, args.seconds, args.clients)),
            ("2 stalled TLS", lambda t: stalled_tls(shared, t, args.stalled)),
            ("3 goodbye", lambda t: relayed_goodbye(shared, t, fault_auth)),
        ]
        results: dict[str, Figures] = {t.title: {} for t in targets}
        for name, attack in attacks:  # each attack on both versions, back to back
            for t in targets:
                print(f"{name:14} {t.title} ...", flush=True)
                results[t.title] |= attack(t)
    finally:
        fault.stop()
    print(f"measured in {time.monotonic() - began:.0f} s\n")
    table(results, [t.title for t in targets], args.clients, args.stalled)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", metavar="SRC", help="an older checkout's src/ to compare")
    parser.add_argument("--seconds", type=float, default=10.0, help="the flood's length (10)")
    parser.add_argument("--clients", type=int, default=20, help="pipelining clients (20)")
    parser.add_argument("--stalled", type=int, default=1000, help="stalled handshakes (1000)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    args = parser.parse_args()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    lab = Lab(Path(tempfile.mkdtemp(prefix="mailgate-attacks-")))
    try:
        run(args, lab)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as e:
        print(f"attacks failed: {e}", file=sys.stderr)
        return 1
    finally:
        lab.stop_all()
        if args.keep:
            print(f"kept {lab.tmp}")
        else:
            shutil.rmtree(lab.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
