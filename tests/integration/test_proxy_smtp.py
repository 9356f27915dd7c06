"""mailgate between real SMTP clients (smtplib, raw sockets) and fake auth services and backends.

The backend is a real SMTP server (aiosmtpd, with XCLIENT as Postfix has it) or, for faults, a
line fake that hangs or refuses. Every accepted message is counted at the backend's DATA, so a
duplicate or a lost message fails a test. The runs against real Postfix are in tests/e2e.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import smtplib
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import (
    FakeAuth,
    FakeBackend,
    Proxy,
    SmtpBackend,
    free_port,
    listener,
    route_to,
    running_auth,
    running_backend,
    running_proxy,
    running_smtp_backend,
    smtp_line_backend,
)

PASSWORD = "s3cret p%ass"
ALICE = "alice@example.com"
SENDER = "someone@sender.example"
HELO = "mx.sender.example"
MESSAGE = b"From: someone@sender.example\r\nSubject: hello\r\n\r\nhi there\r\n"
# What the backend's rcpt_reply answers for an unknown recipient (Postfix's wording).
UNKNOWN_USER = "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown"
# The proxy's own deadlines in these tests (seconds); a failure must arrive well inside 8 s.
LOGIN_TIMEOUT = 1.5
WITHIN = 8.0

TlsFiles = tuple[str, str, ssl.SSLContext]


def base_config(auth_url: str, *listeners: dict[str, Any], **smtp: Any) -> dict[str, Any]:
    return {
        "hostname": "mx.mailgate.test",
        "listener": list(listeners) or [listener("smtp")],
        "auth_http": {"url": auth_url, "timeout": 1.0, "header": {"X-NGX-Auth-Key": "k"}},
        "backend": {"connect_timeout": 1.0, "login_timeout": LOGIN_TIMEOUT},
        "smtp": {"auth": ["plain", "login"], **smtp},
    }


def with_tls(cfg: dict[str, Any], tls: TlsFiles) -> dict[str, Any]:
    cert, key, _ = tls
    return {**cfg, "tls": {"certificate": cert, "certificate_key": key}}


@contextlib.contextmanager
def stack(
    cfg: Callable[[str], dict[str, Any]],
    backend: SmtpBackend | None = None,
    answer: Callable[[dict[str, str]], dict[str, str]] | None = None,
) -> Iterator[tuple[Proxy, FakeAuth, SmtpBackend]]:
    """An aiosmtpd backend, an auth service routing to it, and mailgate with `cfg(auth_url)`."""
    with running_smtp_backend(backend or SmtpBackend(password=PASSWORD)) as smtp:
        fake = FakeAuth(answer or route_to(smtp.port))
        with running_auth(fake) as auth, running_proxy(cfg(auth.url)) as proxy:
            yield proxy, auth, smtp


def raw(port: int) -> tuple[socket.socket, Any]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock, sock.makefile("rb")


def reply(reader: Any) -> bytes:
    """One whole SMTP reply (every line of a multi-line one)."""
    lines = b""
    while True:
        line: bytes = reader.readline()
        lines += line
        if len(line) < 4 or line[3:4] != b"-":
            return lines


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


# --- submission ---------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_submission_is_passed_on_with_xclient(
    proxy_tls: TlsFiles, mechanism: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    submission = listener("smtp", "starttls", starttls_only=True)
    cfg = lambda url: with_tls(base_config(url, submission), proxy_tls)  # noqa: E731
    with stack(cfg) as (proxy, auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp", "starttls"), timeout=10)
        client.ehlo("client.example")
        assert not client.has_extn("auth")  # starttls_only: no AUTH in the clear
        client.starttls(context=proxy_tls[2])
        client.ehlo("client.example")
        assert client.has_extn("auth")
        client.user, client.password = ALICE, PASSWORD
        code, text = client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        assert client.sendmail(SENDER, [ALICE], MESSAGE) == {}
        assert client.sock is not None
        client_port = client.sock.getsockname()[1]
        client.quit()
    sent = auth.requests[0]
    assert sent["Auth-Method"] == "plain"
    assert sent["Auth-User"] == ALICE
    assert sent["Auth-Pass"] == "s3cret%20p%25ass"
    assert sent["Auth-Protocol"] == "smtp"
    assert sent["Client-IP"] == "127.0.0.1"
    assert sent["Client-Host"] == "[UNAVAILABLE]"
    assert sent["Auth-SSL"] == "on"
    assert "Auth-SMTP-Helo" not in sent  # only for "auth none"
    xclient = backend.commands[backend.verbs().index("XCLIENT")][1].split()
    assert "ADDR=127.0.0.1" in xclient
    assert f"PORT={client_port}" in xclient
    assert f"DESTPORT={proxy.port('smtp', 'starttls')}" in xclient
    assert f"LOGIN={ALICE}" in xclient
    assert "HELO=client.example" in xclient
    assert backend.verbs() == ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "DATA"]
    assert backend.commands[0] == ("EHLO", "mx.mailgate.test")
    assert backend.commands[2] == ("EHLO", "client.example")  # the client's name after XCLIENT
    [delivery] = backend.deliveries  # exactly once
    assert (delivery.mail_from, delivery.rcpt_tos) == (SENDER, [ALICE])
    assert delivery.content.endswith(b"hi there\r\n")
    assert delivery.xclient["LOGIN"] == ALICE
    assert delivery.login is None  # XCLIENT mode never sends the password to the backend
    assert PASSWORD not in caplog.text
    assert plain(ALICE, PASSWORD) not in caplog.text


def test_smtp_mode_auth_logs_in_with_the_routed_credentials() -> None:
    answer = route_to(0, **{"Auth-User": "alice-backend", "Auth-Pass": "backend-pw"})
    backend = SmtpBackend(password="backend-pw")
    with running_smtp_backend(backend):
        routed = lambda r: {**answer(r), "Auth-Port": str(backend.port)}  # noqa: E731
        with (
            running_auth(FakeAuth(routed)) as auth,
            running_proxy({**base_config(auth.url), "backend": {"smtp_mode": "auth"}}) as proxy,
        ):
            client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
            client.login(ALICE, PASSWORD)
            client.sendmail(SENDER, [ALICE], MESSAGE)
            client.quit()
    assert backend.logins == [("alice-backend", "backend-pw")]
    assert "XCLIENT" not in backend.verbs()
    assert backend.verbs() == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA"]
    [delivery] = backend.deliveries
    assert delivery.login == "alice-backend"


def test_implicit_tls_submission(proxy_tls: TlsFiles) -> None:
    cfg = lambda url: with_tls(base_config(url, listener("smtp", "implicit")), proxy_tls)  # noqa: E731
    with stack(cfg) as (proxy, auth, backend):
        client = smtplib.SMTP_SSL(
            "127.0.0.1", proxy.port("smtp", "implicit"), context=proxy_tls[2], timeout=10
        )
        client.ehlo("client.example")
        assert not client.has_extn("starttls")
        client.login(ALICE, PASSWORD)
        assert client.sendmail(SENDER, [ALICE, "bob@example.org"], MESSAGE) == {}
        client.quit()
    assert auth.requests[0]["Auth-SSL"] == "on"
    assert auth.requests[0]["Auth-SSL-Protocol"].startswith("TLSv1.")
    [delivery] = backend.deliveries
    assert delivery.rcpt_tos == [ALICE, "bob@example.org"]


def test_pipelined_submission_is_delivered_exactly_once() -> None:
    """RFC 2920: AUTH, MAIL, RCPT and DATA in one write; what follows AUTH goes to the backend."""
    with stack(base_config) as (proxy, _auth, backend):
        sock, reader = raw(proxy.port("smtp"))
        reply(reader)
        sock.sendall(b"EHLO client.example\r\n")
        assert b"PIPELINING" in reply(reader)
        sock.sendall(
            f"AUTH PLAIN {plain(ALICE, PASSWORD)}\r\nMAIL FROM:<{SENDER}>\r\n"
            f"RCPT TO:<{ALICE}>\r\nDATA\r\n".encode()
        )
        assert [reply(reader)[:3] for _ in range(4)] == [b"235", b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert reply(reader).startswith(b"250 2.0.0 Ok: queued")
        assert reply(reader).startswith(b"221")
        sock.close()
    assert len(backend.deliveries) == 1
    assert backend.verbs().count("DATA") == 1


def test_mail_and_data_before_auth_are_refused() -> None:
    with stack(base_config) as (proxy, auth, backend):
        sock, reader = raw(proxy.port("smtp"))
        reply(reader)
        sock.sendall(b"EHLO client.example\r\n")
        reply(reader)
        for command in (b"DATA", f"MAIL FROM:<{SENDER}>".encode(), f"RCPT TO:<{ALICE}>".encode()):
            sock.sendall(command + b"\r\n")
            assert reply(reader) == b"530 5.7.0 Authentication required\r\n"
        sock.close()
    assert auth.requests == []
    assert backend.commands == []


# --- relay ("auth none") ------------------------------------------------------------------


def relay_config(url: str, **smtp: Any) -> dict[str, Any]:
    return base_config(url, listener("smtp", auth=["none"]), **smtp)


def test_relay_asks_auth_http_like_nginx_and_replays_the_envelope() -> None:
    with stack(relay_config) as (proxy, auth, backend):
        sock, reader = raw(proxy.port("smtp"))
        assert reply(reader).startswith(b"220 mx.mailgate.test ESMTP")
        sock.sendall(f"EHLO {HELO}\r\n".encode())
        assert b"AUTH" not in reply(reader)
        sock.sendall(f"MAIL FROM:<{SENDER}>\r\n".encode())
        assert reply(reader).startswith(b"250")
        sock.sendall(f"RCPT TO:<{ALICE}>\r\n".encode())
        assert reply(reader) == b"250 2.1.5 Ok\r\n"  # the backend's own answer
        sock.sendall(b"DATA\r\n")
        assert reply(reader).startswith(b"354")
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert reply(reader).startswith(b"250 2.0.0 Ok: queued")
        assert reply(reader).startswith(b"221")
        sock.close()
    [sent] = auth.requests
    nginx_order = [
        ("Auth-Method", "none"),
        ("Auth-User", ""),
        ("Auth-Pass", ""),
        ("Auth-Protocol", "smtp"),
        ("Auth-Login-Attempt", "1"),
        ("Client-IP", "127.0.0.1"),
        ("Client-Host", "[UNAVAILABLE]"),
        ("Auth-SMTP-Helo", HELO),
        ("Auth-SMTP-From", f"MAIL FROM:<{SENDER}>"),
        ("Auth-SMTP-To", f"RCPT TO:<{ALICE}>"),
        ("X-NGX-Auth-Key", "k"),
    ]
    names = {name for name, _ in nginx_order}
    assert [(k, v) for k, v in sent.items() if k in names] == nginx_order
    assert backend.verbs() == ["EHLO", "XCLIENT", "EHLO", "MAIL", "RCPT", "DATA"]
    xclient = backend.commands[1][1].split()
    assert "ADDR=127.0.0.1" in xclient
    assert f"HELO={HELO}" in xclient
    assert not any(attr.startswith("LOGIN=") for attr in xclient)  # a relay client has none
    assert backend.commands[2:5] == [("EHLO", HELO), ("MAIL", SENDER), ("RCPT", ALICE)]
    [delivery] = backend.deliveries
    assert (delivery.mail_from, delivery.rcpt_tos) == (SENDER, [ALICE])


def test_pipelined_relay_envelope_and_data() -> None:
    """RFC 2920: MAIL, two RCPTs and DATA in one write. The first RCPT starts the login; the
    rest waits and reaches the backend after it, so every reply arrives once, in order."""
    with stack(relay_config) as (proxy, auth, backend):
        sock, reader = raw(proxy.port("smtp"))
        reply(reader)
        sock.sendall(f"EHLO {HELO}\r\n".encode())
        reply(reader)
        sock.sendall(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{ALICE}>\r\nRCPT TO:<bob@example.org>\r\n"
            "DATA\r\n".encode()
        )
        assert [reply(reader)[:3] for _ in range(4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(MESSAGE + b".\r\nQUIT\r\n")
        assert reply(reader).startswith(b"250 2.0.0 Ok: queued")
        assert reply(reader).startswith(b"221")
        sock.close()
    assert len(auth.requests) == 1
    [delivery] = backend.deliveries
    assert delivery.rcpt_tos == [ALICE, "bob@example.org"]


def test_relay_with_smtplib_and_several_recipients() -> None:
    with stack(relay_config) as (proxy, auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        assert client.sendmail(SENDER, [ALICE, "bob@example.org"], MESSAGE) == {}
        client.quit()
    assert len(auth.requests) == 1  # the first RCPT decides; the rest go to the backend
    [delivery] = backend.deliveries
    assert delivery.rcpt_tos == [ALICE, "bob@example.org"]


def test_backend_refusing_the_relayed_recipient_reaches_the_client() -> None:
    backend = SmtpBackend(rcpt_reply=lambda a: UNKNOWN_USER if a.startswith("nobody") else None)
    with stack(relay_config, backend) as (proxy, auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        # The first recipient is refused by the backend during the login: the client sees the
        # backend's code; the second starts a new login with the sender kept.
        refused = client.sendmail(SENDER, ["nobody@example.com", ALICE], MESSAGE)
        assert refused == {"nobody@example.com": (550, UNKNOWN_USER[4:].encode())}
        client.quit()
    # The whole lines as the client sent them (smtplib writes the verb in lower case).
    assert [r["Auth-SMTP-To"] for r in auth.requests] == [
        "rcpt TO:<nobody@example.com>",
        f"rcpt TO:<{ALICE}>",
    ]
    assert [r["Auth-Login-Attempt"] for r in auth.requests] == ["1", "2"]
    [delivery] = backend.deliveries
    assert delivery.rcpt_tos == [ALICE]


def test_backend_tempfailing_the_relayed_recipient_passes_its_4xx_on() -> None:
    greylisted = "450 4.2.0 <alice@example.com>: Recipient address rejected: Greylisted"
    backend = SmtpBackend(rcpt_reply=lambda _a: greylisted)
    with stack(relay_config, backend) as (proxy, _auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        client.mail(SENDER)
        assert client.rcpt(ALICE) == (450, greylisted[4:].encode())
        client.quit()
    assert backend.deliveries == []


def test_backend_refusing_every_recipient() -> None:
    backend = SmtpBackend(rcpt_reply=lambda _a: UNKNOWN_USER)
    with stack(relay_config, backend) as (proxy, _auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, ["nobody@example.com"], MESSAGE)
        assert refused.value.recipients["nobody@example.com"][0] == 550
        assert refused.value.recipients["nobody@example.com"][1].startswith(b"5.1.1 ")
    assert backend.deliveries == []


# --- refusals and outages -------------------------------------------------------------------


def test_auth_reject_uses_auth_error_code_for_submission() -> None:
    answer = {
        "Auth-Status": "Invalid login or password",
        "Auth-Error-Code": "535 5.7.8",
        "Auth-Wait": "0",
    }
    with stack(base_config, answer=lambda _r: answer) as (proxy, _auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo("client.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(ALICE, "wrong")
        assert (failed.value.smtp_code, failed.value.smtp_error) == (
            535,
            b"5.7.8 Invalid login or password",
        )
        assert client.noop()[0] == 250  # the session goes on
    assert backend.commands == []


def test_third_failed_login_closes_the_session() -> None:
    answer = {"Auth-Status": "Invalid login or password"}
    with stack(base_config, answer=lambda _r: answer) as (proxy, auth, _backend):
        sock, reader = raw(proxy.port("smtp"))
        reply(reader)
        sock.sendall(b"EHLO client.example\r\n")
        reply(reader)
        for _ in range(3):
            sock.sendall(f"AUTH PLAIN {plain(ALICE, 'wrong')}\r\n".encode())
            assert reply(reader) == b"535 5.7.8 Invalid login or password\r\n"
        assert reader.read() == b""  # closed after the third
        sock.close()
    assert [r["Auth-Login-Attempt"] for r in auth.requests] == ["1", "2", "3"]


def test_auth_reject_uses_auth_error_code_for_relay() -> None:
    answer = {"Auth-Status": "Relay access denied", "Auth-Error-Code": "554 5.7.1"}
    with stack(relay_config, answer=lambda _r: answer) as (proxy, _auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
            client.sendmail(SENDER, ["victim@elsewhere.example"], MESSAGE)
        assert refused.value.recipients["victim@elsewhere.example"] == (
            554,
            b"5.7.1 Relay access denied",
        )
    assert backend.commands == []


OUTAGES = [
    "auth down",
    "auth hangs",
    "auth garbage",
    "backend down",
    "backend hangs",
    "backend refuses xclient",
]
# Postfix's answer to XCLIENT from a host not in smtpd_authorized_xclient_hosts.
XCLIENT_REFUSED = b"550 5.7.0 Error: insufficient authorization\r\n"


@contextlib.contextmanager
def outage(fault: str, cfg: Callable[[str], dict[str, Any]]) -> Iterator[Proxy]:
    faulty = FakeBackend(greeting=None)
    if fault == "backend refuses xclient":
        faulty = smtp_line_backend(xclient=XCLIENT_REFUSED)
    with running_backend(faulty) as backend:
        port = free_port() if fault == "backend down" else backend.port
        fake = FakeAuth(route_to(port), delay=30.0 if fault == "auth hangs" else 0.0)
        if fault == "auth garbage":
            fake.answer = lambda _r: {"Auth-Status": "OK", "Auth-Server": "x", "Auth-Port": "no"}
        with running_auth(fake) as auth:
            url = f"http://127.0.0.1:{free_port()}/auth" if fault == "auth down" else auth.url
            with running_proxy(cfg(url)) as proxy:
                yield proxy


@pytest.mark.parametrize("fault", OUTAGES)
def test_outage_during_auth_is_454(fault: str) -> None:
    with outage(fault, base_config) as proxy:
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo("client.example")
        started = time.monotonic()
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.login(ALICE, PASSWORD)
        assert time.monotonic() - started < WITHIN
        assert failed.value.smtp_code == 454
        assert failed.value.smtp_error[:6] == b"4.7.0 "
        assert client.noop()[0] == 250  # a temporary failure does not end the session


@pytest.mark.parametrize("fault", OUTAGES)
def test_outage_during_relay_is_451(fault: str) -> None:
    with outage(fault, relay_config) as proxy:
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        client.mail(SENDER)
        started = time.monotonic()
        code, text = client.rcpt(ALICE)
        assert time.monotonic() - started < WITHIN
        assert (code, text[:6]) == (451, b"4.3.0 ")
        assert client.noop()[0] == 250


def test_backend_hanging_after_the_relayed_rcpt_is_451() -> None:
    with (
        running_backend(smtp_line_backend(rcpt=None)) as backend,
        running_auth(FakeAuth(route_to(backend.port))) as auth,
        running_proxy(relay_config(auth.url)) as proxy,
    ):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo(HELO)
        client.mail(SENDER)
        started = time.monotonic()
        code, text = client.rcpt(ALICE)
        assert time.monotonic() - started < WITHIN
        assert (code, text[:6]) == (451, b"4.3.0 ")
    assert [line.split()[0].upper() for line in backend.lines] == [
        b"EHLO",
        b"XCLIENT",
        b"EHLO",
        b"MAIL",
        b"RCPT",
    ]


def test_backend_refusing_the_login_is_a_temporary_failure() -> None:
    """smtp_mode = "auth": a backend 535 after auth_http said OK means the routing or the
    backend is wrong, not the user's password (as a backend NO is for IMAP): 454."""
    backend = SmtpBackend(password="something-else")
    cfg = lambda url: {**base_config(url), "backend": {"smtp_mode": "auth"}}  # noqa: E731
    with stack(cfg, backend) as (proxy, _auth, backend):
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.ehlo("client.example")
        client.user, client.password = ALICE, PASSWORD
        with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
            client.auth("PLAIN", client.auth_plain)  # one attempt (login() tries them all)
        assert failed.value.smtp_code == 454
    assert backend.logins == [(ALICE, PASSWORD)]
    assert backend.deliveries == []


# --- before the greeting ---------------------------------------------------------------------


def test_early_talker_gets_554_and_is_closed() -> None:
    with stack(lambda url: base_config(url, greeting_delay=0.5)) as (proxy, auth, _backend):
        sock, reader = raw(proxy.port("smtp"))
        sock.sendall(b"EHLO spambot.example\r\n")  # before the greeting
        assert reader.read() == b"554 5.5.0 Improper use of SMTP command pipelining\r\n"
        sock.close()
        # A client that waits gets the greeting after the delay, and works.
        client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
        client.login(ALICE, PASSWORD)
        client.quit()
    assert len(auth.requests) == 1


def test_relay_with_the_builtin_directory_delivers_to_the_domains_mailstore(
    tmp_path: Path,
) -> None:
    """Port 25 on mailgate's own directory: mail for a hosted domain reaches its mailstore;
    mail for anywhere else is refused as relaying."""
    from mailgate import admin
    from mailgate.auth.schema import dispose, make_engine

    with running_smtp_backend(SmtpBackend()) as backend:
        url = f"sqlite:///{tmp_path / 'directory.db'}"

        async def populate() -> None:
            engine = make_engine(url, 1)
            try:
                await admin.init_schema(engine)
                await admin.add_mailstore(engine, "mx1", "127.0.0.1", smtp_port=backend.port)
                await admin.add_domain(engine, "example.com", "mx1")
            finally:
                await dispose(engine)

        asyncio.run(populate())
        cfg = {
            "hostname": "mx.mailgate.test",
            "listener": [listener("smtp", auth=["none"])],
            "directory": {"url": url},
            "backend": {"connect_timeout": 1.0, "login_timeout": LOGIN_TIMEOUT},
        }
        with running_proxy(cfg) as proxy:
            client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
            client.ehlo(HELO)
            # The first recipient decides (as nginx asks auth_http once, after the first
            # RCPT TO); once relayed, the mailstore itself judges further recipients.
            with pytest.raises(smtplib.SMTPRecipientsRefused) as refused:
                client.sendmail(SENDER, ["victim@elsewhere.example"], b"Subject: t\r\n\r\nx\r\n")
            assert refused.value.recipients == {
                "victim@elsewhere.example": (554, b"5.7.1 Relay access denied")
            }
            assert client.sendmail(SENDER, [ALICE], b"Subject: t\r\n\r\nhi\r\n") == {}
            client.quit()
    assert [(d.mail_from, d.rcpt_tos) for d in backend.deliveries] == [(SENDER, [ALICE])]
    assert backend.deliveries[0].xclient["ADDR"] == "127.0.0.1"


def test_a_mailstores_smtp_login_overrides_the_global_mode(tmp_path: Path) -> None:
    """[backend] smtp_mode is XCLIENT; a mailstore set to AUTH gets AUTH PLAIN instead."""
    from mailgate import admin
    from mailgate.auth.schema import dispose, make_engine
    from mailgate.values import Secret

    with running_smtp_backend(SmtpBackend(password="alice-pw")) as backend:
        url = f"sqlite:///{tmp_path / 'directory.db'}"

        async def populate() -> None:
            engine = make_engine(url, 1)
            try:
                await admin.init_schema(engine)
                await admin.add_mailstore(
                    engine, "mx1", "127.0.0.1", smtp_port=backend.port, smtp_login="auth"
                )
                await admin.add_domain(engine, "example.com", "mx1")
                await admin.add_user(engine, ALICE, Secret("alice-pw"), scheme="PLAIN")
            finally:
                await dispose(engine)

        asyncio.run(populate())
        cfg = {
            "hostname": "mx.mailgate.test",
            "listener": [listener("smtp")],
            "directory": {"url": url},
            "backend": {"connect_timeout": 1.0, "login_timeout": LOGIN_TIMEOUT},
        }
        with running_proxy(cfg) as proxy:
            client = smtplib.SMTP("127.0.0.1", proxy.port("smtp"), timeout=10)
            client.ehlo(HELO)
            client.login(ALICE, "alice-pw")
            assert client.sendmail(ALICE, ["bob@example.org"], b"Subject: t\r\n\r\nhi\r\n") == {}
            client.quit()
    assert backend.logins == [(ALICE, "alice-pw")]
    assert "XCLIENT" not in backend.verbs()
    assert len(backend.deliveries) == 1
