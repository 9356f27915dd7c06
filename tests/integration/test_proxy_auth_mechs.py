"""IMAP login mechanisms through mailgate: what the auth service is asked (compared with what
nginx sends, see the auth_http reference captures) and what the backend is then sent."""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import re

import pytest

from harness import (
    FakeAuth,
    imap_backend,
    listener,
    raw_session,
    read_until,
    route_to,
    running_auth,
    running_backend,
    running_proxy,
)

USER = "alice@example.com"
PASSWORD = "alice secret%"
ENCODED = "alice%20secret%25"  # Auth-Pass as nginx escapes it


def base_config(auth_url: str, **backend: object) -> dict[str, object]:
    return {
        "listener": [listener("imap")],
        "auth_http": {"url": auth_url, "timeout": 1.0},
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.5, **backend},
        "imap": {"auth": ["login", "plain", "cram-md5"]},
    }


def client(port: int) -> imaplib.IMAP4:
    return imaplib.IMAP4("127.0.0.1", port, timeout=10)


def backend_login(lines: list[bytes]) -> bytes:
    return next(line for line in lines if b" LOGIN " in line)


def assert_plain_request(sent: dict[str, str]) -> None:
    """The headers nginx sends for LOGIN, AUTHENTICATE PLAIN and AUTHENTICATE LOGIN alike."""
    assert sent["Auth-Method"] == "plain"
    assert sent["Auth-User"] == USER
    assert sent["Auth-Pass"] == ENCODED
    assert sent["Auth-Protocol"] == "imap"
    assert sent["Auth-Login-Attempt"] == "1"
    assert sent["Client-IP"] == "127.0.0.1"
    assert "Auth-Salt" not in sent


def test_authenticate_plain() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        assert "AUTH=PLAIN" in imap.capabilities
        challenges: list[bytes] = []

        def plain(challenge: bytes) -> bytes:
            challenges.append(challenge)
            return b"\0" + USER.encode() + b"\0" + PASSWORD.encode()

        typ, data = imap.authenticate("PLAIN", plain)
        assert typ == "OK"
        reply: object = data  # typeshed says str; imaplib returns a list of bytes
        assert reply == [b"[CAPABILITY IMAP4rev1 IDLE] Logged in"]  # the backend's own reply
        assert challenges == [b""]  # one empty "+ " challenge
        assert imap.noop()[0] == "OK"
        imap.logout()
    assert_plain_request(auth.requests[0])
    assert backend_login(backend.lines).endswith(b' "' + PASSWORD.encode() + b'"\r\n')


def test_authenticate_plain_with_initial_response() -> None:
    blob = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        sock = raw_session(proxy.port("imap"))
        sock.sendall(b"a CAPABILITY\r\n")
        assert b" SASL-IR" in read_until(sock, b"a OK")
        sock.sendall(b"b AUTHENTICATE PLAIN " + blob + b"\r\n")
        reply = read_until(sock, b"\r\n")
        assert reply.startswith(b"b OK "), reply  # no "+" continuation with SASL-IR
        sock.sendall(b"c NOOP\r\n")
        assert b"c OK NOOP completed (fake backend)" in read_until(sock, b"c OK")
        sock.close()
    assert_plain_request(auth.requests[0])


def test_authenticate_login() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        challenges: list[bytes] = []

        def login(challenge: bytes) -> bytes:
            challenges.append(challenge)
            return USER.encode() if len(challenges) == 1 else PASSWORD.encode()

        assert imap.authenticate("LOGIN", login)[0] == "OK"
        assert challenges == [b"Username:", b"Password:"]
        imap.logout()
    assert_plain_request(auth.requests[0])  # nginx reports SASL LOGIN as "plain"
    assert backend_login(backend.lines).endswith(b' "' + PASSWORD.encode() + b'"\r\n')


def test_cram_md5_asks_with_salt_and_digest_and_logs_in_with_auth_pass() -> None:
    with running_backend(imap_backend("backend-cleartext")) as backend:
        route = route_to(backend.port, **{"Auth-Pass": "backend-cleartext"})
        with (
            running_auth(FakeAuth(route)) as auth,
            running_proxy(base_config(auth.url)) as proxy,
        ):
            imap = client(proxy.port("imap"))
            assert "AUTH=CRAM-MD5" in imap.capabilities
            typ, _ = imap.login_cram_md5(USER, PASSWORD)
            assert typ == "OK"
            assert imap.noop()[0] == "OK"
            imap.logout()
    sent = auth.requests[0]
    assert sent["Auth-Method"] == "cram-md5"
    assert sent["Auth-User"] == USER
    salt = sent["Auth-Salt"]
    assert re.fullmatch(r"<\d+\.\d+@localhost>", salt), salt  # RFC 2195 msg-id form
    # Auth-Pass is the client's HMAC-MD5 of exactly that challenge, in lower-case hex.
    expected = hmac.new(PASSWORD.encode(), salt.encode(), hashlib.md5).hexdigest()
    assert sent["Auth-Pass"] == expected
    assert sent["Auth-Protocol"] == "imap"
    assert list(sent).index("Auth-Salt") == list(sent).index("Auth-Pass") + 1  # nginx's order
    assert backend_login(backend.lines).endswith(b' "backend-cleartext"\r\n')


def test_cram_md5_answered_ok_without_auth_pass_is_unavailable() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        with pytest.raises(imaplib.IMAP4.error, match=r"\[UNAVAILABLE\]"):
            imap.login_cram_md5(USER, PASSWORD)
        assert imap.noop()[0] == "OK"  # still connected, may try another way
    assert len(auth.requests) == 1
    assert backend.lines == []  # the digest is never tried as a password


@pytest.mark.parametrize("synchronising", [True, False], ids=["{n}", "{n+}"])
def test_login_with_a_literal_password(synchronising: bool) -> None:
    password = b'lit "pass" %'
    with (
        running_backend(imap_backend("unused")) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url)) as proxy,
    ):
        backend.handler = lambda line: (
            line.split(b" ", 1)[0] + b" OK Logged in\r\n" if b" LOGIN " in line else None
        )
        sock = raw_session(proxy.port("imap"))
        if synchronising:
            sock.sendall(b"a LOGIN " + USER.encode() + b" {%d}\r\n" % len(password))
            assert read_until(sock, b"\r\n").startswith(b"+ ")  # the server asks for the bytes
            sock.sendall(password + b"\r\n")
        else:  # RFC 7888 LITERAL+: no continuation, everything at once
            sock.sendall(b"a LOGIN " + USER.encode() + b" {%d+}\r\n" % len(password) + password)
            sock.sendall(b"\r\n")
        assert read_until(sock, b"\r\n").startswith(b"a OK")
        sock.close()
    assert auth.requests[0]["Auth-Pass"] == 'lit%20"pass"%20%25'  # '"' is sent as it is
    assert backend_login(backend.lines).endswith(b' "lit \\"pass\\" %"\r\n')


@pytest.mark.parametrize("forward", [True, False])
def test_forward_client_sends_id_before_login(forward: bool) -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(base_config(auth.url, forward_client=forward)) as proxy,
    ):
        imap = client(proxy.port("imap"))
        client_port = imap.sock.getsockname()[1]
        assert imap.login(USER, PASSWORD)[0] == "OK"
        imap.logout()
    ids = [line for line in backend.lines if b" ID " in line]
    if not forward:
        assert ids == []
        return
    login_at = backend.lines.index(backend_login(backend.lines))
    assert backend.lines.index(ids[0]) < login_at
    expected = (
        b' ID ("x-originating-ip" "127.0.0.1" "x-originating-port" "%d" '
        b'"x-connected-ip" "127.0.0.1" "x-connected-port" "%d"'
    ) % (client_port, proxy.port("imap"))
    assert expected in ids[0], ids[0]


@pytest.mark.parametrize(("max_token", "reaches_auth"), [(None, False), (32768, True)])
def test_oauth_max_token_sets_how_long_a_token_a_pop3_line_may_carry(
    max_token: int | None, reaches_auth: bool
) -> None:
    """POP3's own line limit is 16 KiB; `[oauth] max_token` raises it for token logins."""
    token = "t" * 20000  # past the default max_token (16 KiB), within 32 KiB
    sasl = base64.b64encode(f"user={USER}\x01auth=Bearer {token}\x01\x01".encode())
    fake = FakeAuth(lambda _req: {"Auth-Status": "Invalid login or password"})
    with running_auth(fake) as auth:
        config = {
            "listener": [listener("pop3")],
            "auth_http": {"url": auth.url, "timeout": 1.0},
            "pop3": {"auth": ["plain", "xoauth2"]},
        }
        if max_token is not None:
            config["oauth"] = {"max_token": max_token}
        with running_proxy(config) as proxy, raw_session(proxy.port("pop3")) as sock:
            sock.sendall(b"AUTH XOAUTH2 " + sasl + b"\r\n")
            reply = read_until(sock, b"\r\n")
            if reaches_auth:
                sock.sendall(b"\r\n")  # the dummy response to the error challenge
                reply += read_until(sock, b"-ERR")
    asked = [r for r in fake.requests if r.get("Auth-Method") == "xoauth2"]
    if reaches_auth:
        assert len(asked) == 1 and len(asked[0]["Auth-Pass"]) >= len(token), reply
        assert reply.startswith(b"+ ") and b"-ERR" in reply, reply
    else:
        assert not asked and reply.startswith(b"-ERR"), reply
