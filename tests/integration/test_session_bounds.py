"""The session core's bounds, tried as an attacker and a broken backend would (issue 7, items
1-4): clients that pipeline and never read, stalled TLS handshakes, goodbyes that must not land
inside relayed messages, and input pipelined while a login is decided.

The memory tests run a real `mailgate serve` process (one worker) and read its RSS and its open
descriptors from /proc, as an operator would see them.
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import os
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from e2e.mailgate_proc import running_mailgate
from harness import (
    CLOSE,
    FakeAuth,
    FakeBackend,
    imap_backend,
    listener,
    pop3_backend,
    raw_session,
    read_until,
    route_to,
    running_auth,
    running_backend,
    running_proxy,
)

PASSWORD = "secret"


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(condition, limit: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def greeting_of(port: int, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        return read_until(sock, b"\r\n", timeout)


@contextlib.contextmanager
def never_reading_flooders(port: int, count: int, command: bytes) -> Iterator[list[socket.socket]]:
    """`count` clients that pipeline `command` as fast as the kernel takes it and never read a
    byte; their receive buffers are small, so the replies pile up on mailgate's side."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
    stop = threading.Event()

    def flood() -> None:
        burst = command * 4096
        while not stop.is_set():
            for sock in socks:
                with contextlib.suppress(BlockingIOError, OSError):
                    sock.send(burst)
            time.sleep(0.001)

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    try:
        yield socks
    finally:
        stop.set()
        thread.join(5)
        for sock in socks:
            sock.close()


# --- item 1: replies have back-pressure -------------------------------------------------------


@pytest.mark.parametrize(
    ("protocol", "command"),
    [("imap", b"a CAPABILITY\r\n"), ("pop3", b"CAPA\r\n"), ("smtp", b"EHLO x\r\n")],
)
def test_a_client_that_pipelines_and_never_reads_costs_bounded_memory(
    tmp_path: Path, protocol: str, command: bytes
) -> None:
    with running_auth(FakeAuth(route_to(1))) as auth:
        config = {
            "auth_http": {"url": auth.url},
            "throttle": {"enabled": False},
            "log_level": "warning",
            # Each flooder ends when its replies cannot be sent for this long.
            protocol: {"send_timeout": 2.0, "login_timeout": 30.0, "max_errors": 1_000_000},
            "max_sessions": 64,
        }
        with running_mailgate(tmp_path, {"l": {"protocol": protocol}}, config) as mg:
            pid, port = mg.proc.pid, mg.ports["l"]
            for _ in range(20):  # warm up: imports, first allocations
                greeting_of(port)
            before_rss, before_fds = rss_kib(pid), open_fds(pid)
            peak = before_rss
            with never_reading_flooders(port, 20, command):
                deadline = time.monotonic() + 4.0
                while time.monotonic() < deadline:
                    peak = max(peak, rss_kib(pid))
                    time.sleep(0.1)
                # Before the fix one client grew a worker by ~700 MB in 30 s; now each session
                # holds at most a few replies' worth.
                assert peak - before_rss < 25_000, f"RSS grew by {peak - before_rss} KiB"
                # Sessions that cannot send end (send timeout), linger, and are aborted: their
                # descriptors are closed although the clients keep their end open. (The
                # kernel's send buffers fill first: seconds, at the rate the flood runs here.)
                assert wait_until(lambda: open_fds(pid) <= before_fds + 2, 30.0)
                assert greeting_of(port)  # a new client is served
            assert rss_kib(pid) - before_rss < 25_000


def test_a_socket_counts_against_max_sessions_until_it_is_closed(tmp_path: Path) -> None:
    with running_auth(FakeAuth(route_to(1))) as auth:
        config = {
            "auth_http": {"url": auth.url},
            "throttle": {"enabled": False},
            "imap": {"send_timeout": 2.0, "login_timeout": 30.0, "max_errors": 1_000_000},
            "max_sessions": 3,
        }
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            port = mg.ports["l"]
            with never_reading_flooders(port, 3, b"a CAPABILITY\r\n"):
                time.sleep(0.5)
                # Three sessions are open (and stuck): a fourth is refused politely, at once.
                assert (
                    greeting_of(port)
                    == b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
                )
                # Once they time out and their descriptors are closed, clients are served.
                assert wait_until(lambda: greeting_of(port).startswith(b"* OK"), 10.0)
            assert "max_sessions (3) reached" in mg.log_text()


# --- item 2: TLS handshakes are counted from accept -------------------------------------------


def test_stalled_tls_handshakes_from_one_address_leave_room_for_others(
    tmp_path: Path, server_cert
) -> None:  # type: ignore[no-untyped-def]
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {
            "auth_http": {"url": auth.url},
            "throttle": {"enabled": False},
            "tls": {"certificate": str(server_cert.cert), "certificate_key": str(server_cert.key)},
            "limits": {"handshakes": 500, "handshakes_per_ip": 16},
            "max_sessions": 100,
        }
        listeners = {"tls": {"protocol": "imap", "tls": "implicit"}}
        with running_mailgate(tmp_path, listeners, config) as mg:
            pid, port = mg.proc.pid, mg.ports["tls"]
            before_fds = open_fds(pid)
            stalled = []
            try:
                for _ in range(300):  # connect, send nothing: each wants a handshake
                    sock = socket.socket()
                    sock.bind(("127.0.0.2", 0))
                    sock.connect(("127.0.0.1", port))
                    stalled.append(sock)
                # One address holds at most 16 handshakes; the rest were closed at once.
                assert wait_until(lambda: open_fds(pid) <= before_fds + 16 + 2, 5.0)
                context = ssl.create_default_context(cafile=str(server_cert.ca))
                with imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=10) as c:
                    c.login("alice", PASSWORD)
                    c.noop()
                    c.logout()
            finally:
                for sock in stalled:
                    sock.close()
            assert "refusing a TLS handshake from 127.0.0.2: too many in progress" in mg.log_text()


def test_stalled_handshakes_are_cut_at_the_handshake_timeout(tmp_path: Path, server_cert) -> None:  # type: ignore[no-untyped-def]
    with running_auth(FakeAuth(route_to(1))) as auth:
        config = {
            "auth_http": {"url": auth.url},
            "tls": {
                "certificate": str(server_cert.cert),
                "certificate_key": str(server_cert.key),
                "handshake_timeout": 1.0,
            },
        }
        listeners = {"tls": {"protocol": "pop3", "tls": "implicit"}}
        with running_mailgate(tmp_path, listeners, config) as mg:
            pid, port = mg.proc.pid, mg.ports["tls"]
            with socket.create_connection(("127.0.0.1", port)) as warm_up:  # lazy first opens
                assert warm_up.recv(10) == b""  # closed at the handshake timeout
            before_fds = open_fds(pid)
            socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
            try:
                assert wait_until(lambda: open_fds(pid) >= before_fds + 5, 2.0)
                assert wait_until(lambda: open_fds(pid) <= before_fds, 5.0)
            finally:
                for sock in socks:
                    sock.close()


# --- item 3: a goodbye only at a response boundary ---------------------------------------------


def imap_fetch_backend(body: bytes, cut_after: int | None) -> FakeBackend:
    """Serves `* 1 FETCH (BODY[] {n}` with `body`; with `cut_after`, it dies that many
    bytes into the literal."""
    inner = imap_backend(PASSWORD).handler

    def handle(line: bytes) -> bytes | None:
        tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
        if rest.upper().startswith(b"FETCH"):
            head = b"* 1 FETCH (BODY[] {%d}\r\n" % len(body)
            if cut_after is not None:
                return head + body[:cut_after] + CLOSE
            return head + body + b")\r\n" + tag + b" OK FETCH done\r\n" + CLOSE
        return inner(line)

    return FakeBackend(handler=handle)


def logged_in_imap(proxy_port: int) -> socket.socket:
    sock = raw_session(proxy_port)
    sock.sendall(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
    assert b"a OK" in read_until(sock, b"a OK")
    return sock


def read_all(sock: socket.socket, limit: float = 10.0) -> bytes:
    data = b""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


BODY = b"From: a@example.com\r\nSubject: big\r\n\r\n" + b"line of the message\r\n" * 5000


def test_a_backend_that_dies_inside_a_literal_gets_no_goodbye_written_into_it() -> None:
    with (
        running_backend(imap_fetch_backend(BODY, cut_after=50_000)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy({"auth_http": {"url": auth.url}, "listener": [listener("imap")]}) as proxy,
    ):
        sock = logged_in_imap(proxy.port("imap"))
        sock.sendall(b"f FETCH 1 BODY[]\r\n")
        data = read_all(sock)
        assert data.startswith(b"* 1 FETCH (BODY[] {%d}\r\n" % len(BODY))
        assert data.endswith(BODY[:50_000])  # the message as far as it came, and nothing else
        assert b"BYE" not in data


def test_a_backend_that_dies_between_responses_gets_the_goodbye() -> None:
    with (
        running_backend(imap_fetch_backend(BODY, cut_after=None)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy({"auth_http": {"url": auth.url}, "listener": [listener("imap")]}) as proxy,
    ):
        sock = logged_in_imap(proxy.port("imap"))
        sock.sendall(b"f FETCH 1 BODY[]\r\n")
        data = read_all(sock)
        assert data.endswith(
            b")\r\nf OK FETCH done\r\n* BYE [UNAVAILABLE] Backend server closed the connection.\r\n"
        )


def test_pop3_retr_cut_by_the_backend_gets_no_goodbye_in_the_body() -> None:
    message = b"Subject: big\r\n\r\n" + b"body line\r\n" * 20000
    backend = pop3_backend(PASSWORD, messages=(message,))
    inner = backend.handler
    backend.handler = lambda line: (
        b"+OK %d octets\r\n" % len(message) + message[:100_000] + CLOSE
        if line.startswith(b"RETR")
        else inner(line)
    )
    with (
        running_backend(backend),
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy({"auth_http": {"url": auth.url}, "listener": [listener("pop3")]}) as proxy,
    ):
        sock = raw_session(proxy.port("pop3"))
        sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert b"+OK" in read_until(sock, b"Logged in")
        sock.sendall(b"RETR 1\r\n")
        data = read_all(sock)
        assert data.endswith(message[:100_000])
        assert b"-ERR" not in data


def test_shutdown_inside_a_literal_closes_without_a_goodbye() -> None:
    body_head = BODY[:30_000]

    def handle(line: bytes) -> bytes | None:
        if b"FETCH" in line.upper():
            return b"* 1 FETCH (BODY[] {%d}\r\n" % len(BODY) + body_head  # then it stalls
        return imap_backend(PASSWORD).handler(line)

    with (
        running_backend(FakeBackend(handler=handle)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        config = {"auth_http": {"url": auth.url}, "listener": [listener("imap")]}
        config["shutdown_timeout"] = 0.3
        with running_proxy(config) as proxy:
            sock = logged_in_imap(proxy.port("imap"))
            sock.sendall(b"f FETCH 1 BODY[]\r\n")
            assert read_until(sock, body_head[-40:]).endswith(body_head[-40:])
            proxy.loop.call_soon_threadsafe(proxy.worker.stop.set)
            rest = read_all(sock)
            assert b"BYE" not in rest


# --- item 4: pipelining while a login is decided ------------------------------------------------


def test_bytes_sent_while_a_login_is_decided_wait_in_the_kernel_and_are_relayed_after() -> None:
    """mailgate reads nothing more while the auth service decides (as nginx); the client's
    pipelined commands are not held in mailgate's memory and reach the backend after login."""
    seen: list[bytes] = []
    inner = imap_backend(PASSWORD).handler

    def handle(line: bytes) -> bytes | None:
        seen.append(line)
        return inner(line)

    with (
        running_backend(FakeBackend(handler=handle)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        auth.delay = 0.5  # a slow auth service: the client keeps sending meanwhile
        with running_proxy(
            {"auth_http": {"url": auth.url}, "listener": [listener("imap")]}
        ) as proxy:
            sock = raw_session(proxy.port("imap"))
            noops = b"".join(b"n%d NOOP\r\n" % i for i in range(30_000))  # ~270 KiB
            sock.sendall(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
            sender = threading.Thread(target=sock.sendall, args=(noops,), daemon=True)
            sender.start()
            reply = read_until(sock, b"n29999 OK", limit=20.0)
            sender.join(10)
            assert b"a OK" in reply
            assert reply.count(b" OK NOOP completed (fake backend)") == 30_000
            assert b"BYE" not in reply
    assert sum(1 for line in seen if b"NOOP" in line) == 30_000


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "PLAIN"])
def test_an_empty_initial_response_gets_the_mechanisms_challenge(mechanism: str) -> None:
    """mutt (GNU SASL) sends `AUTHENTICATE CRAM-MD5 ` with a trailing space after seeing SASL-IR."""
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = {"auth_http": {"url": auth.url}, "listener": [listener("imap")]}
        cfg["imap"] = {"auth": ["login", "plain", "cram-md5"]}
        with running_proxy(cfg) as proxy:
            sock = raw_session(proxy.port("imap"))
            sock.sendall(b"a AUTHENTICATE " + mechanism.encode() + b" \r\n")
            challenge = read_until(sock, b"\r\n")
            assert challenge.startswith(b"+ ")
            if mechanism == "CRAM-MD5":
                assert base64.b64decode(challenge[2:].strip()).startswith(b"<")
            sock.sendall(b"*\r\n")
            assert read_until(sock, b"\r\n") == b"a BAD Authentication cancelled\r\n"


def test_input_pipelined_behind_a_slow_login_is_not_held_in_memory(tmp_path: Path) -> None:
    """50 clients each send a login and then 1 MiB without waiting, while the auth service
    takes its time: mailgate reads one small buffer behind each login, the kernel holds the
    rest (before, each session buffered up to 320 KiB of it)."""
    with running_auth(FakeAuth(route_to(1), delay=4.0)) as auth:
        config = {
            "auth_http": {"url": auth.url, "timeout": 10.0},
            "throttle": {"enabled": False},
            "log_level": "warning",
        }
        with running_mailgate(tmp_path, {"l": {"protocol": "imap"}}, config) as mg:
            pid, port = mg.proc.pid, mg.ports["l"]
            for _ in range(20):
                greeting_of(port)
            before = rss_kib(pid)
            socks = []
            try:
                for _ in range(50):
                    sock = raw_session(port)
                    sock.sendall(b"a LOGIN alice " + PASSWORD.encode() + b"\r\n")
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        sock.send(b"n NOOP\r\n" * (1 << 17))  # 1 MiB, as much as the kernel takes
                    socks.append(sock)
                time.sleep(2.0)  # the logins are still being decided
                assert rss_kib(pid) - before < 8_000
            finally:
                for sock in socks:
                    sock.close()
