"""A webmail host on trusted_networks logs in for its users and names each user's own address
(IMAP ID x-originating-ip, POP3 and SMTP XCLIENT): mailgate then uses that address for the
auth request, the throttle, the limits, the log and the backend. From anywhere else the claim
changes nothing and is logged. Real clients (imaplib, poplib, smtplib) and a real mailgate."""

from __future__ import annotations

import imaplib
import logging
import poplib
import smtplib
from collections.abc import Callable
from typing import Any

import pytest

from harness import (
    FakeAuth,
    imap_backend,
    listener,
    pop3_backend,
    running_auth,
    running_backend,
    running_proxy,
)

PASSWORD = "pw"
WEBMAIL = "127.0.0.1"  # where the tests' clients connect from


def checking(port: int) -> Callable[[dict[str, str]], dict[str, str]]:
    """An auth service that knows one password and routes to `port`."""

    def answer(request: dict[str, str]) -> dict[str, str]:
        if request.get("Auth-Pass") != PASSWORD:
            return {"Auth-Status": "Invalid login or password", "Auth-Wait": "0"}
        return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(port)}

    return answer


def config(auth_url: str, trusted: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "listener": [listener("imap"), listener("pop3"), listener("smtp")],
        "auth_http": {"url": auth_url, "timeout": 2.0},
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.5, "forward_client": True},
        "pop3": {"auth": ["user", "plain"]},
        "smtp": {"auth": ["plain", "login"]},
        "trusted_networks": trusted,
        **extra,
    }


def imap_as(port: int, claimed: str | None, password: str = PASSWORD, user: str = "alice") -> str:
    """Log in with an ID that claims `claimed`; 'ok' or the server's text."""
    with imaplib.IMAP4(WEBMAIL, port, timeout=10) as imap:
        if claimed is not None:
            fields = f'"name" "webmail" "x-originating-ip" "{claimed}" "x-originating-port" "4711"'
            typ, _ = imap.xatom("ID", f"({fields})")
            assert typ == "OK"
        try:
            imap.login(user, password)
        except imaplib.IMAP4.error as e:
            return str(e)
        imap.logout()
        return "ok"


def session_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mailgate.session"]


def test_a_trusted_webmail_names_its_users_address_for_auth_log_and_backend(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, ["127.0.0.0/8"])) as proxy,
    ):
        assert imap_as(proxy.port("imap"), "192.0.2.7") == "ok"
    assert auth.requests[0]["Client-IP"] == "192.0.2.7"
    assert any("client=192.0.2.7:4711 via=127.0.0.1 " in m for m in session_lines(caplog))
    # The backend hears the user's address, not the webmail's (forward_client).
    sent = b"".join(backend.lines)
    assert b'"x-originating-ip" "192.0.2.7"' in sent, sent


def test_a_claim_from_an_untrusted_address_changes_nothing_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, ["10.0.0.0/8"])) as proxy,
    ):
        assert imap_as(proxy.port("imap"), "192.0.2.7") == "ok"
    assert auth.requests[0]["Client-IP"] == WEBMAIL
    assert not any("192.0.2.7" in m for m in session_lines(caplog))
    assert "ignoring the client address 127.0.0.1 claimed: not in trusted_networks" in caplog.text


def test_the_throttle_counts_the_claimed_address_not_the_webmail() -> None:
    throttle = {"free": 0, "base_delay": 0.01, "max_delay": 0.01, "lockout_after": 2}
    throttle |= {"lockout": 60, "per_ip_users": 0}
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, ["127.0.0.0/8"], throttle=throttle)) as proxy,
    ):
        port = proxy.port("imap")
        for user in ("u1", "u2", "u3"):  # a different user each: only the address is locked
            assert imap_as(port, "192.0.2.66", "guess", user) != "ok"
        asked = len(auth.requests)
        # The guesser's address is locked out: the right password does not reach the service.
        assert imap_as(port, "192.0.2.66", PASSWORD, "u4") != "ok"
        assert len(auth.requests) == asked
        # Another user of the same webmail logs in: the webmail itself was never locked.
        assert imap_as(port, "192.0.2.7", PASSWORD, "u4") == "ok"


def test_session_limits_count_the_claimed_address() -> None:
    with (
        running_backend(imap_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, ["127.0.0.0/8"], limits={"per_ip": 1})) as proxy,
    ):
        port = proxy.port("imap")
        held = imaplib.IMAP4(WEBMAIL, port, timeout=10)
        held.xatom("ID", '("x-originating-ip" "192.0.2.7")')
        held.login("alice", PASSWORD)
        try:
            assert "[LIMIT]" in imap_as(port, "192.0.2.7", PASSWORD, "bob")
            assert imap_as(port, "192.0.2.8", PASSWORD, "bob") == "ok"
        finally:
            held.logout()


def test_pop3_xclient_from_a_trusted_peer() -> None:
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, ["127.0.0.0/8"])) as proxy,
    ):
        pop = poplib.POP3(WEBMAIL, proxy.port("pop3"), timeout=10)
        assert "XCLIENT" in pop.capa()
        assert pop._shortcmd("XCLIENT ADDR=192.0.2.9 PORT=4712").startswith(b"+OK")
        pop.user("alice")
        pop.pass_(PASSWORD)
        pop.quit()
    assert auth.requests[0]["Client-IP"] == "192.0.2.9"
    assert b"XCLIENT ADDR=192.0.2.9 PORT=4712" in b"".join(backend.lines)


def test_pop3_xclient_from_elsewhere_is_refused() -> None:
    with (
        running_backend(pop3_backend(PASSWORD)) as backend,
        running_auth(FakeAuth(checking(backend.port))) as auth,
        running_proxy(config(auth.url, [])) as proxy,
    ):
        pop = poplib.POP3(WEBMAIL, proxy.port("pop3"), timeout=10)
        assert "XCLIENT" not in pop.capa()
        with pytest.raises(poplib.error_proto, match="not from trusted IP"):
            pop._shortcmd("XCLIENT ADDR=192.0.2.9")
        pop.user("alice")
        pop.pass_(PASSWORD)
        pop.quit()
    assert auth.requests[0]["Client-IP"] == WEBMAIL


def test_smtp_xclient_from_a_trusted_peer_then_ehlo_again() -> None:
    with (
        running_auth(FakeAuth(checking(1))) as auth,
        running_proxy(config(auth.url, ["127.0.0.0/8"])) as proxy,
        smtplib.SMTP(WEBMAIL, proxy.port("smtp"), timeout=10) as smtp,
    ):
        smtp.ehlo("webmail.example")
        assert smtp.has_extn("xclient")
        code, _ = smtp.docmd("XCLIENT", "ADDR=192.0.2.10 PORT=4713")
        assert code == 220  # a new greeting, as Postfix gives
        smtp.ehlo_resp = smtp.esmtp_features = None  # type: ignore[assignment]
        smtp.ehlo("webmail.example")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice", "wrong")  # the auth request is all this test needs
    assert auth.requests[0]["Client-IP"] == "192.0.2.10"


def test_smtp_xclient_from_elsewhere_is_refused() -> None:
    with (
        running_auth(FakeAuth(checking(1))) as auth,
        running_proxy(config(auth.url, [])) as proxy,
        smtplib.SMTP(WEBMAIL, proxy.port("smtp"), timeout=10) as smtp,
    ):
        smtp.ehlo("client.example")
        assert not smtp.has_extn("xclient")
        code, text = smtp.docmd("XCLIENT", "ADDR=192.0.2.10")
        assert (code, text) == (550, b"5.7.0 Error: insufficient authorization")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("alice", "wrong")
    assert auth.requests[0]["Client-IP"] == WEBMAIL
