"""mailgate between a real IMAP client (imaplib) and fake auth services and backends.

The fakes inject faults: a backend that hangs or refuses, an auth service that hangs, is down
or answers garbage. The happy paths against real Dovecot are in tests/e2e.
"""

from __future__ import annotations

import contextlib
import imaplib
import logging
import re
import socket
import ssl
import threading
import time

import pytest

from harness import (
    FakeAuth,
    FakeBackend,
    free_port,
    imap_backend,
    listener,
    raw_session,
    read_until,
    route_to,
    running_auth,
    running_backend,
    running_proxy,
)

PASSWORD = "s3cret p%ass"


def base_config(auth_url: str, **imap: object) -> dict[str, object]:
    return {
        "listener": [listener("imap")],
        "auth_http": {"url": auth_url, "timeout": 1.0, "header": {"X-NGX-Auth-Key": "k"}},
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.5},
        "imap": {"auth": ["login", "plain", "cram-md5"], **imap},
    }


def client(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=10)


def test_login_is_relayed_to_the_routed_backend(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        assert "IMAP4REV1" in imap.capabilities
        typ, data = imap.login("alice@example.com", PASSWORD)
        assert typ == "OK"
        assert b"Logged in" in data[0]  # the backend's own reply, with our tag
        typ, data = imap.noop()
        assert (typ, data) == ("OK", [b"NOOP completed (fake backend)"])
        imap.logout()
    sent = auth.requests[0]
    assert sent["Auth-Method"] == "plain"
    assert sent["Auth-User"] == "alice@example.com"
    assert sent["Auth-Pass"] == "s3cret%20p%25ass"  # URL-encoded as nginx does
    assert sent["Auth-Protocol"] == "imap"
    assert sent["Client-IP"] == "127.0.0.1"
    assert sent["X-NGX-Auth-Key"] == "k"
    assert any(b"LOGIN" in line for line in backend.lines)
    session_lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.session"]
    assert any("user=alice@example.com" in m and "in=" in m for m in session_lines)
    assert PASSWORD not in caplog.text
    assert "p%25ass" not in caplog.text


def test_auth_http_may_replace_backend_credentials() -> None:
    with (
        running_backend(imap_backend("backend-pw")) as backend,
        running_auth(
            FakeAuth(route_to(backend.port, **{"Auth-User": "real", "Auth-Pass": "backend-pw"}))
        ) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        assert imap.login("alias@example.com", "client-pw")[0] == "OK"
        imap.logout()
    login = next(line for line in backend.lines if b"LOGIN" in line)
    assert b'"real" "backend-pw"' in login


def test_rejected_login_shows_status_and_waits() -> None:
    answer = {"Auth-Status": "Invalid login or password", "Auth-Wait": "1"}
    with (
        running_auth(FakeAuth(lambda _r: answer)) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        started = time.monotonic()
        with pytest.raises(imaplib.IMAP4.error, match=r"AUTHENTICATIONFAILED.*Invalid login"):
            imap.login("alice@example.com", "wrong")
        assert time.monotonic() - started >= 0.9  # Auth-Wait: 1 delays the answer
        # The session goes on: the client may try again, and the attempt is counted.
        with pytest.raises(imaplib.IMAP4.error):
            imap.login("alice@example.com", "wrong again")
        assert auth.requests[1]["Auth-Login-Attempt"] == "2"


@pytest.mark.parametrize(
    "fault",
    ["auth hangs", "auth down", "auth garbage", "backend hangs", "backend down", "backend refuses"],
)
def test_outages_are_temporary_failures_not_bad_passwords(fault: str) -> None:
    backend = imap_backend(PASSWORD)
    if fault == "backend hangs":
        backend = FakeBackend(greeting=None)
    with running_backend(backend) as backend:
        port = free_port() if fault == "backend down" else backend.port
        fake = FakeAuth(route_to(port), delay=30.0 if fault == "auth hangs" else 0.0)
        if fault == "auth garbage":
            fake.answer = lambda _r: {"Auth-Status": "OK", "Auth-Server": "x", "Auth-Port": "no"}
        with running_auth(fake) as auth:
            url = f"http://127.0.0.1:{free_port()}/auth" if fault == "auth down" else auth.url
            with running_proxy(base_config(url)) as proxy:
                imap = client(proxy.port("imap"))
                password = "wrong" if fault == "backend refuses" else PASSWORD
                started = time.monotonic()
                with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
                    imap.login("alice@example.com", password)
                assert time.monotonic() - started < 8  # seconds, not a minute
                assert imap.noop()[0] == "OK"  # the session is still usable


def test_backend_going_away_mid_session_says_bye() -> None:
    backend = imap_backend(PASSWORD)
    inner = backend.handler
    backend.handler = lambda line: b"<close>" if b"NOOP" in line else inner(line)
    with (
        running_backend(backend) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock = raw_session(proxy.port("imap"))
        sock.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
        assert b"a OK" in read_until(sock, b"a OK")
        sock.sendall(b"b NOOP\r\n")
        assert b"* BYE [UNAVAILABLE]" in read_until(sock, b"BYE")
        assert read_until(sock, b"never") == b""  # then the connection is closed


def test_an_idle_relayed_session_ends_after_proxy_timeout_and_a_busy_one_does_not() -> None:
    """proxy_timeout = 1 s: the sweep looks every 0.25 s, so an idle session gets its BYE
    between 1 and about 1.25 s (with slack here for a loaded box); one that talks, none."""
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url, proxy_timeout=1.0)) as proxy,
    ):
        idle, busy = raw_session(proxy.port("imap")), raw_session(proxy.port("imap"))
        for sock in (idle, busy):
            sock.sendall(b'a LOGIN alice@example.com "' + PASSWORD.encode() + b'"\r\n')
            assert b"a OK" in read_until(sock, b"a OK")
        started = time.monotonic()
        answered: list[bool] = []

        def talk() -> None:  # 2.4 s of NOOPs, each well within the timeout
            for i in range(8):
                busy.sendall(b"n%d NOOP\r\n" % i)
                answered.append(b"n%d OK" % i in read_until(busy, b"n%d OK" % i))
                time.sleep(0.3)

        talker = threading.Thread(target=talk)
        talker.start()
        said = read_until(idle, b"\r\n", limit=5)
        took = time.monotonic() - started
        assert said == b"* BYE Disconnected for inactivity.\r\n", said
        assert 1.0 <= took < 2.5, took
        assert read_until(idle, b"never", limit=2) == b""  # and closed
        talker.join(10)
        assert answered == [True] * 8
        busy.sendall(b"z NOOP\r\n")
        assert b"z OK" in read_until(busy, b"z OK")


def test_pipelined_command_after_login_reaches_backend() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock = raw_session(proxy.port("imap"))
        sock.sendall(b'a LOGIN alice "' + PASSWORD.encode() + b'"\r\nb NOOP\r\nc LOGOUT\r\n')
        data = read_until(sock, b"c OK")
        assert b"a OK" in data and b"b OK NOOP completed" in data and b"c OK" in data
        assert data.index(b"a OK") < data.index(b"b OK") < data.index(b"c OK")


def test_slow_client_is_cut_by_the_login_timeout() -> None:
    with (
        running_auth(FakeAuth(route_to(1))) as auth,
        running_proxy(base_config(auth.url, login_timeout=1.0, client_timeout=0.6)) as proxy,
    ):
        sock = raw_session(proxy.port("imap"))
        started = time.monotonic()
        with contextlib.suppress(OSError):  # the proxy may cut us while we trickle
            for byte in b"a NOOP":  # a byte every 0.3 s: each read is in time, the whole not
                sock.sendall(bytes([byte]))
                time.sleep(0.3)
        data = read_until(sock, b"BYE", limit=5)
        assert b"* BYE" in data
        assert time.monotonic() - started < 4


def test_too_many_errors_close_the_session() -> None:
    with (
        running_auth(FakeAuth(route_to(1))) as auth,
        running_proxy(base_config(auth.url, max_errors=2)) as proxy,
    ):
        sock = raw_session(proxy.port("imap"))
        sock.sendall(b"a FOO\r\nb BAR\r\nc BAZ\r\nd QUX\r\n")
        data = read_until(sock, b"BYE")
        assert b"* BYE" in data
        assert read_until(sock, b"never") == b""


def test_starttls_and_implicit_tls(proxy_tls: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key, client_ctx = proxy_tls
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = base_config(auth.url)
        cfg["listener"] = [
            listener("imap", "starttls", starttls_only=True),
            listener("imap", "implicit"),
        ]
        cfg["tls"] = {"certificate": cert, "certificate_key": key}
        with running_proxy(cfg) as proxy:
            imap = client(proxy.port("imap", "starttls"))
            assert "LOGINDISABLED" in imap.capabilities
            typ, data = imap._simple_command("LOGIN", "alice", '"x"')  # type: ignore[attr-defined]
            assert typ == "NO" and b"PRIVACYREQUIRED" in data[0]
            imap.starttls(ssl_context=client_ctx)
            assert imap.login("alice", PASSWORD)[0] == "OK"
            imap.logout()
            imaps = imaplib.IMAP4_SSL(
                "127.0.0.1", proxy.port("imap", "implicit"), ssl_context=client_ctx, timeout=10
            )
            assert imaps.login("alice", PASSWORD)[0] == "OK"
            imaps.logout()
    for request in auth.requests:
        assert request["Auth-SSL"] == "on"
        assert request["Auth-SSL-Protocol"].startswith("TLSv1.")


def test_starttls_discards_pipelined_plaintext(proxy_tls: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key, client_ctx = proxy_tls
    with running_auth(FakeAuth(route_to(1))) as auth:
        cfg = base_config(auth.url)
        cfg["listener"] = [listener("imap", "starttls")]
        cfg["tls"] = {"certificate": cert, "certificate_key": key}
        with running_proxy(cfg) as proxy:
            sock = raw_session(proxy.port("imap", "starttls"))
            # An attacker in the middle appends a command after STARTTLS (CVE-2011-0411).
            sock.sendall(b"a STARTTLS\r\nb LOGIN mallory evil\r\n")
            assert read_until(sock, b"\r\n").startswith(b"a OK")
            tls = client_ctx.wrap_socket(sock, server_hostname="localhost")
            tls.sendall(b"c NOOP\r\n")
            reply = read_until(tls, b"c OK")
            assert reply.startswith(b"c OK"), reply  # no answer to the injected "b" command
            tls.close()
    assert auth.requests == []


def test_shutdown_says_bye_to_relayed_sessions() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = base_config(auth.url)
        cfg["shutdown_timeout"] = 0.5
        with running_proxy(cfg) as proxy:
            sock = raw_session(proxy.port("imap"))
            sock.sendall(b'a LOGIN alice "' + PASSWORD.encode() + b'"\r\n')
            assert b"a OK" in read_until(sock, b"a OK")
            proxy.loop.call_soon_threadsafe(proxy.worker.stop.set)
            assert b"* BYE Server shutting down" in read_until(sock, b"BYE")


def test_failed_tls_handshake_is_logged_without_a_traceback(
    proxy_tls: tuple[str, str, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, _client_ctx = proxy_tls
    caplog.set_level(logging.INFO)
    with running_auth(FakeAuth(route_to(1))) as auth:
        cfg = base_config(auth.url)
        cfg["listener"] = [listener("imap", "starttls")]
        cfg["tls"] = {"certificate": cert, "certificate_key": key}
        with running_proxy(cfg) as proxy:
            sock = raw_session(proxy.port("imap", "starttls"))
            sock.sendall(b"a STARTTLS\r\n")
            assert read_until(sock, b"\r\n").startswith(b"a OK")
            sock.sendall(b"this is not a TLS ClientHello\r\n" * 4)
            assert read_until(sock, b"never") == b""  # the session is closed
            time.sleep(0.2)
    lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.session"]
    assert any("outcome=tls handshake failed" in line for line in lines), lines
    assert "Traceback" not in caplog.text


def test_metrics_count_sessions_and_logins() -> None:
    from urllib.request import urlopen

    metrics_port = free_port()
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        from mailgate import metrics

        metrics.serve(f"127.0.0.1:{metrics_port}")
        imap = client(proxy.port("imap"))
        imap.login("alice@example.com", PASSWORD)
        imap.logout()
        time.sleep(0.2)
        text = urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert 'mailgate_logins_total{protocol="imap",result="ok"}' in text
    # Who closes first after LOGOUT (client or backend) is a race; either is a clean end.
    assert re.search(
        r'mailgate_sessions_total\{outcome="(backend|client) closed",protocol="imap"\}', text
    )
    assert 'mailgate_relay_bytes_total{direction="out",protocol="imap"}' in text


def test_sessions_over_max_sessions_are_refused_politely() -> None:
    with (
        running_auth(FakeAuth(route_to(1))) as auth,
        running_proxy({**base_config(auth.url), "max_sessions": 2}) as proxy,
    ):
        port = proxy.port("imap")
        first, second = raw_session(port), raw_session(port)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as third:
            assert read_until(third, b"\r\n") == (
                b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n"
            )
            assert read_until(third, b"never") == b""
        first.sendall(b"a LOGOUT\r\n")
        assert b"a OK" in read_until(first, b"a OK")
        first.close()
        time.sleep(0.2)  # the slot is free once mailgate has seen the close
        with socket.create_connection(("127.0.0.1", port), timeout=10) as fourth:
            assert read_until(fourth, b"\r\n").startswith(b"* OK")
        second.close()
