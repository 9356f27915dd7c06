"""mailgate between a real POP3 client (poplib) and fake auth services and backends.

Routing comes from a fake auth_http service; the fake POP3 backend checks the password it is
given and serves one message, so a relayed STAT or RETR proves the session reached it.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import poplib
import re
import socket
import ssl

import pytest

from harness import (
    FakeAuth,
    FakeBackend,
    free_port,
    listener,
    pop3_backend,
    read_until,
    route_to,
    running_auth,
    running_backend,
    running_proxy,
)

PASSWORD = "s3cret p%ass"
MESSAGE = b"Subject: hello\r\n\r\n.dot-stuffed line\r\nbye\r\n"


def base_config(auth_url: str, **pop3: object) -> dict[str, object]:
    return {
        "listener": [listener("pop3")],
        "auth_http": {"url": auth_url, "timeout": 1.0, "header": {"X-NGX-Auth-Key": "k"}},
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.5},
        "pop3": {"auth": ["user", "apop", "plain"], **pop3},
    }


def client(port: int) -> poplib.POP3:
    return poplib.POP3("127.0.0.1", port, timeout=10)


def raw_session(port: int) -> tuple[socket.socket, bytes]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, read_until(sock, b"\r\n")


def test_user_pass_is_relayed_to_the_routed_backend(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with (
        running_backend(pop3_backend(PASSWORD, (MESSAGE,))) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        pop = client(proxy.port("pop3"))
        assert pop.getwelcome().startswith(b"+OK mailgate ready.")
        assert pop.user("alice@example.com").startswith(b"+OK")
        assert pop.pass_(PASSWORD) == b"+OK Logged in (fake backend)"  # the backend's reply
        assert pop.stat() == (1, len(MESSAGE))
        resp, lines, _octets = pop.retr(1)
        assert resp.startswith(b"+OK")
        assert lines == [b"Subject: hello", b"", b".dot-stuffed line", b"bye"]
        assert pop.quit() == b"+OK Logging out (fake backend)"
    sent = auth.requests[0]
    assert sent["Auth-Method"] == "plain"
    assert sent["Auth-User"] == "alice@example.com"
    assert sent["Auth-Pass"] == "s3cret%20p%25ass"  # URL-encoded as nginx does
    assert sent["Auth-Protocol"] == "pop3"
    assert sent["Auth-Login-Attempt"] == "1"
    assert sent["Client-IP"] == "127.0.0.1"
    assert sent["X-NGX-Auth-Key"] == "k"
    assert "Auth-Salt" not in sent and "Auth-SSL" not in sent
    assert backend.lines[:2] == [
        b"USER alice@example.com\r\n",
        b"PASS " + PASSWORD.encode() + b"\r\n",
    ]
    session_lines = [r.getMessage() for r in caplog.records if r.name == "mailgate.session"]
    assert any(m.startswith("pop3 ") and "user=alice@example.com" in m for m in session_lines)
    assert PASSWORD not in caplog.text


def test_rejected_login_shows_the_auth_services_text() -> None:
    answer = {"Auth-Status": "Invalid login or password", "Auth-Wait": "0"}
    with (
        running_auth(FakeAuth(lambda _r: answer)) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        pop = client(proxy.port("pop3"))
        pop.user("alice@example.com")
        with pytest.raises(poplib.error_proto) as failure:
            pop.pass_("wrong")
        assert failure.value.args[0] == b"-ERR [AUTH] Invalid login or password"
        # The session goes on (RFC 1939: start again with USER), and the attempt is counted.
        pop.user("alice@example.com")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop.pass_("wrong again")
        assert auth.requests[1]["Auth-Login-Attempt"] == "2"


@pytest.mark.parametrize(
    "fault", ["auth down", "auth garbage", "backend hangs", "backend down", "backend refuses"]
)
def test_outages_are_temporary_failures_not_bad_passwords(fault: str) -> None:
    backend = pop3_backend(PASSWORD)
    if fault == "backend hangs":
        backend = FakeBackend(greeting=None)
    with running_backend(backend) as backend:
        port = free_port() if fault == "backend down" else backend.port
        fake = FakeAuth(route_to(port))
        if fault == "auth garbage":
            fake.answer = lambda _r: {"Auth-Status": "OK", "Auth-Server": "x", "Auth-Port": "no"}
        with running_auth(fake) as auth:
            url = f"http://127.0.0.1:{free_port()}/auth" if fault == "auth down" else auth.url
            with running_proxy(base_config(url)) as proxy:
                pop = client(proxy.port("pop3"))
                pop.user("alice@example.com")
                password = "wrong" if fault == "backend refuses" else PASSWORD
                with pytest.raises(poplib.error_proto) as failure:
                    pop.pass_(password)
                assert failure.value.args[0].startswith(b"-ERR [SYS/TEMP] ")
                assert pop.capa()  # the session is still usable


def test_backend_vanishing_mid_session_says_sys_temp_then_closes() -> None:
    backend = pop3_backend(PASSWORD)
    inner = backend.handler
    backend.handler = lambda line: b"<close>" if line.startswith(b"STAT") else inner(line)
    with (
        running_backend(backend) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock, _greeting = raw_session(proxy.port("pop3"))
        sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\n")
        assert b"+OK Logged in" in read_until(sock, b"Logged in")
        sock.sendall(b"STAT\r\n")
        reply = read_until(sock, b"\r\n")
        assert reply.startswith(b"-ERR [SYS/TEMP] "), reply
        assert reply.count(b"\r\n") == 1
        assert read_until(sock, b"never") == b""  # then the connection is closed


def test_stls_and_implicit_tls(proxy_tls: tuple[str, str, ssl.SSLContext]) -> None:
    cert, key, client_ctx = proxy_tls
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = base_config(auth.url)
        cfg["listener"] = [
            listener("pop3", "starttls", starttls_only=True),
            listener("pop3", "implicit"),
        ]
        cfg["tls"] = {"certificate": cert, "certificate_key": key}
        with running_proxy(cfg) as proxy:
            pop = client(proxy.port("pop3", "starttls"))
            caps = pop.capa()
            assert "STLS" in caps and "USER" not in caps  # no cleartext login offered
            with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
                pop.user("alice")
            pop.stls(client_ctx)
            assert "USER" in pop.capa() and "STLS" not in pop.capa()
            pop.user("alice")
            assert pop.pass_(PASSWORD).startswith(b"+OK Logged in")
            assert pop.stat()[0] == 1
            pop.quit()
            pops = poplib.POP3_SSL(
                "127.0.0.1", proxy.port("pop3", "implicit"), context=client_ctx, timeout=10
            )
            pops.user("alice")
            assert pops.pass_(PASSWORD).startswith(b"+OK Logged in")
            pops.quit()
    assert len(auth.requests) == 2
    for request in auth.requests:
        assert request["Auth-Protocol"] == "pop3"
        assert request["Auth-SSL"] == "on"
        assert request["Auth-SSL-Protocol"].startswith("TLSv1.")
        assert request["Auth-SSL-Cipher"]


def test_apop_is_checked_by_the_auth_service_and_the_backend_gets_the_cleartext() -> None:
    with running_backend(pop3_backend(PASSWORD)) as backend:
        route = route_to(backend.port, **{"Auth-Pass": PASSWORD})
        with (
            running_auth(FakeAuth(route)) as auth,
            running_proxy(base_config(auth.url)) as proxy,
        ):
            pop = client(proxy.port("pop3"))
            salt = re.search(rb"<[^>]+>", pop.getwelcome())
            assert salt is not None  # RFC 1939: the timestamp ends the greeting
            assert pop.apop("alice@example.com", PASSWORD).startswith(b"+OK Logged in")
            assert pop.stat()[0] == 1
            pop.quit()
    sent = auth.requests[0]
    assert sent["Auth-Method"] == "apop"
    assert sent["Auth-User"] == "alice@example.com"
    assert sent["Auth-Salt"] == salt.group().decode()
    assert sent["Auth-Pass"] == hashlib.md5(salt.group() + PASSWORD.encode()).hexdigest()
    assert sent["Auth-Protocol"] == "pop3"
    assert backend.lines[:2] == [
        b"USER alice@example.com\r\n",
        b"PASS " + PASSWORD.encode() + b"\r\n",
    ]


def test_apop_answered_ok_without_auth_pass_is_a_temporary_failure() -> None:
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        pop = client(proxy.port("pop3"))
        with pytest.raises(poplib.error_proto, match=r"^b'-ERR \[SYS/TEMP\]"):
            pop.apop("alice@example.com", PASSWORD)
    assert backend.lines == []  # the digest is never sent to the backend as a password


def test_auth_plain_with_initial_response_and_in_two_steps() -> None:
    blob = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode())
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock, _ = raw_session(proxy.port("pop3"))
        sock.sendall(b"AUTH PLAIN " + blob + b"\r\n")
        assert read_until(sock, b"\r\n") == b"+OK Logged in (fake backend)\r\n"
        sock.sendall(b"STAT\r\n")
        assert read_until(sock, b"\r\n").startswith(b"+OK 1 ")
        sock.close()
        sock, _ = raw_session(proxy.port("pop3"))
        sock.sendall(b"AUTH PLAIN\r\n")
        assert read_until(sock, b"\r\n") == b"+ \r\n"  # RFC 5034: an empty challenge
        sock.sendall(blob + b"\r\n")
        assert read_until(sock, b"\r\n") == b"+OK Logged in (fake backend)\r\n"
        sock.close()
    assert [r["Auth-Method"] for r in auth.requests] == ["plain", "plain"]
    assert all(r["Auth-User"] == "alice@example.com" for r in auth.requests)
    assert all(r["Auth-Pass"] == "s3cret%20p%25ass" for r in auth.requests)


def test_commands_pipelined_behind_pass_reach_the_backend() -> None:
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock, _ = raw_session(proxy.port("pop3"))
        sock.sendall(b"USER alice\r\nPASS " + PASSWORD.encode() + b"\r\nSTAT\r\nQUIT\r\n")
        data = read_until(sock, b"Logging out")
        sock.close()
    assert data.split(b"\r\n")[:4] == [
        b"+OK",
        b"+OK Logged in (fake backend)",
        b"+OK 1 %d" % len(b"Subject: hello\r\n\r\nhi\r\n"),
        b"+OK Logging out (fake backend)",
    ]
    assert backend.lines[2:] == [b"STAT\r\n", b"QUIT\r\n"]


@pytest.mark.parametrize("forward", [True, False])
def test_forward_client_sends_xclient_before_user(forward: bool) -> None:
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
    ):
        cfg = base_config(auth.url)
        cfg["backend"] = {"connect_timeout": 1.0, "login_timeout": 1.5, "forward_client": forward}
        with running_proxy(cfg) as proxy:
            pop = client(proxy.port("pop3"))
            client_port = pop.sock.getsockname()[1]
            pop.user("alice")
            assert pop.pass_(PASSWORD).startswith(b"+OK Logged in")
            pop.quit()
    if forward:
        assert backend.lines[0] == b"XCLIENT ADDR=127.0.0.1 PORT=%d\r\n" % client_port
        assert backend.lines[1] == b"USER alice\r\n"
    else:
        assert backend.lines[0] == b"USER alice\r\n"


def test_large_retr_arrives_intact() -> None:
    # Far beyond the relay's write buffer high-water mark, so reading pauses and resumes.
    lines = [b"%06d " % i + b"x" * 70 for i in range(40_000)]
    big = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
    with (
        running_backend(pop3_backend(PASSWORD, (big,))) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        pop = client(proxy.port("pop3"))
        pop.user("alice")
        pop.pass_(PASSWORD)
        _resp, got, _octets = pop.retr(1)
        assert got[2:] == lines
        assert pop.quit().startswith(b"+OK")
