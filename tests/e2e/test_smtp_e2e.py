"""Real SMTP clients send through mailgate to a real Postfix, which delivers over LMTP into a
real Dovecot; each message is then read back through mailgate over IMAP.

Clients connect from 127.0.0.2 while mailgate connects to Postfix from 127.0.0.1, so the
client address in Postfix's Received header and log can only have come through XCLIENT.
"""

from __future__ import annotations

import contextlib
import imaplib
import smtplib
import ssl
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import peers  # on sys.path through tests/e2e/conftest.py
import postfix  # scripts/postfix.py, same path
import pytest

from harness import FakeAuth, Proxy, listener, running_auth, running_proxy

from .conftest import ALICE, BOB, MailUser, require

CLIENT_IP = "127.0.0.2"  # where every client connects from
PROXY_NAME = "mx.mailgate.test"
# Postfix hands a message to LMTP within a second; allow for a slow CI machine.
DELIVERY_WAIT = 20.0
SUBPROCESS_TIMEOUT = 60.0
USERS = {u.login: u for u in (ALICE, BOB)}


@dataclass(frozen=True)
class SmtpWorld:
    store: peers.Peer  # Dovecot with IMAP, LMTP and the SASL auth service
    postfix: peers.Peer
    auth: FakeAuth
    proxy: Proxy
    ca: Path

    def port(self, kind: str) -> int:
        names = {"submission": ("smtp", "starttls"), "smtps": ("smtp", "implicit"),
                 "relay": ("smtp", "none"), "imap": ("imap", "none")}  # fmt: skip
        return self.proxy.port(*names[kind])


def auth_answer(smtp_port: int, imap_port: int) -> Callable[[dict[str, str]], dict[str, str]]:
    """An auth_http service: the users' passwords, SMTP to Postfix, IMAP to Dovecot, and
    relay ("auth none") only to the domains Postfix holds."""

    def answer(req: dict[str, str]) -> dict[str, str]:
        smtp = req["Auth-Protocol"] == "smtp"
        route = {"Auth-Status": "OK", "Auth-Server": "127.0.0.1"}
        route["Auth-Port"] = str(smtp_port if smtp else imap_port)
        if req["Auth-Method"] == "none":
            domain = req["Auth-SMTP-To"].rpartition("@")[2].rstrip(">").lower()
            if domain in {u.partition("@")[2] for u in USERS}:
                return route
            return {"Auth-Status": "Relay access denied", "Auth-Error-Code": "550 5.7.1"}
        user = USERS.get(urllib.parse.unquote(req["Auth-User"]))
        if user and urllib.parse.unquote(req["Auth-Pass"]) == user.password:
            # Postfix (smtp_mode = "auth") checks the password again, with Dovecot.
            return route | {"Auth-Pass": user.password}
        return {"Auth-Status": "Invalid login or password", "Auth-Error-Code": "535 5.7.8"}

    return answer


def proxy_config(auth_url: str, cert: Any, **backend: str) -> dict[str, Any]:
    return {
        "hostname": PROXY_NAME,
        "listener": [
            listener("smtp", "starttls", starttls_only=True),
            listener("smtp", "implicit"),
            listener("smtp", "none", auth=["none"]),
            listener("imap"),
        ],
        "tls": {"certificate": str(cert.cert), "certificate_key": str(cert.key)},
        "auth_http": {"url": auth_url, "timeout": 5.0},
        "backend": {"connect_timeout": 5.0, "login_timeout": 10.0, **backend},
        "smtp": {"auth": ["plain", "login"]},
        "imap": {"auth": ["login", "plain"]},
    }


@contextlib.contextmanager
def started(peer: peers.Peer) -> Iterator[peers.Peer]:
    try:
        yield peer
    finally:
        peer.stop()


@pytest.fixture(scope="module")
def mail_peers() -> Iterator[tuple[peers.Peer, peers.Peer]]:
    require("dovecot", "postfix", postfix.POSTFIX_DAEMONS / "master")
    lmtp, sasl = peers.free_port(), peers.free_port()
    users = {u.login: u.password for u in USERS.values()}
    store = postfix.start_mailstore(
        imap_port=peers.free_port(), lmtp_port=lmtp, auth_port=sasl, users=users
    )
    with started(store):
        mta = postfix.start_postfix(
            smtp_port=peers.free_port(), lmtp_port=lmtp, users=users, sasl_port=sasl
        )
        with started(mta):
            yield store, mta


@contextlib.contextmanager
def world(mail: tuple[peers.Peer, peers.Peer], cert: Any, **backend: str) -> Iterator[SmtpWorld]:
    store, mta = mail
    fake = FakeAuth(auth_answer(mta.ports["smtp"], store.ports["imap"]))
    with running_auth(fake) as auth, running_proxy(proxy_config(auth.url, cert, **backend)) as p:
        yield SmtpWorld(store, mta, auth, p, cert.ca)


@pytest.fixture(scope="module")
def xclient_world(
    mail_peers: tuple[peers.Peer, peers.Peer], server_cert: Any
) -> Iterator[SmtpWorld]:
    with world(mail_peers, server_cert) as w:
        yield w


# --- helpers ----------------------------------------------------------------------------------


def unique_subject(client: str) -> str:
    return f"via {client} {uuid.uuid4().hex}"


def message(sender: str, rcpt: str, subject: str) -> bytes:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, subject
    msg.set_content("sent through mailgate\n")
    return msg.as_bytes().replace(b"\n", b"\r\n")


def read_back(w: SmtpWorld, user: MailUser, subject: str) -> list[bytes]:
    """The headers of every message with `subject` in the user's INBOX, read through mailgate
    over IMAP; waits for the delivery."""
    imap = imaplib.IMAP4("127.0.0.1", w.port("imap"), timeout=10)
    try:
        imap.login(user.login, user.password)
        deadline = time.monotonic() + DELIVERY_WAIT
        while True:
            imap.select("INBOX", readonly=True)
            _, found = imap.search(None, "SUBJECT", f'"{subject}"')
            numbers = found[0].split()
            if numbers or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        headers = []
        for number in numbers:
            _, data = imap.fetch(number, "(BODY.PEEK[HEADER])")
            headers += [part[1] for part in data if isinstance(part, tuple)]
        return headers
    finally:
        imap.logout()


def received_from_client(headers: bytes) -> str:
    """The Received header Postfix added (Dovecot's LMTP adds another one above it)."""
    parsed = BytesHeaderParser().parsebytes(headers)
    fields = [" ".join(str(value).split()) for value in parsed.get_all("Received", [])]
    ours = [f for f in fields if "(Postfix)" in f]
    assert len(ours) == 1, fields
    return ours[0]


def delivered_once(w: SmtpWorld, user: MailUser, subject: str) -> bytes:
    """The headers of the one copy of the message in the user's INBOX."""
    found = read_back(w, user, subject)
    assert len(found) == 1, f"{len(found)} copies; Postfix said:\n{log_tail(w.postfix)}"
    return found[0]


def log_tail(peer: peers.Peer, lines: int = 25) -> str:
    return "\n".join(peer.log_path.read_text(errors="replace").splitlines()[-lines:])


def assert_delivered_once_via_xclient(w: SmtpWorld, user: MailUser, subject: str) -> str:
    headers = delivered_once(w, user, subject)
    received = received_from_client(headers)
    assert f"[{CLIENT_IP}]" in received, received  # the client's address, from XCLIENT
    assert f"by {postfix_name(w)} (Postfix)" in received
    return received


def postfix_name(w: SmtpWorld) -> str:
    return w.postfix.info["hostname"]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)


# --- submission -------------------------------------------------------------------------------


def test_swaks_starttls_auth_plain(xclient_world: SmtpWorld) -> None:
    require("swaks")
    w, subject = xclient_world, unique_subject("swaks")
    done = run([
        "swaks", "--server", f"127.0.0.1:{w.port('submission')}", "--local-interface", CLIENT_IP,
        "--tls", "--tls-verify", "--tls-ca-path", str(w.ca), "--tls-sni", "localhost",
        "--auth", "PLAIN", "--auth-user", ALICE.login, "--auth-password", ALICE.password,
        "--ehlo", "swaks.client.example", "--from", ALICE.login, "--to", BOB.login,
        "--header", f"Subject: {subject}",
    ])  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "235 2.7.0 Authentication successful" in done.stdout
    received = assert_delivered_once_via_xclient(w, BOB, subject)
    assert received.startswith("from swaks.client.example (unknown [127.0.0.2])")
    assert f"(Authenticated sender: {ALICE.login})" in received  # XCLIENT LOGIN
    lines = postfix.wait_for_log(w.postfix, f"client=unknown[{CLIENT_IP}]")
    assert any(f"sasl_username={ALICE.login}" in line for line in lines), lines


@pytest.mark.parametrize("scheme", ["smtp", "smtps"])
def test_curl_submission(xclient_world: SmtpWorld, tmp_path: Path, scheme: str) -> None:
    require("curl")
    w, subject = xclient_world, unique_subject(f"curl {scheme}")
    mail = tmp_path / "message.eml"
    mail.write_bytes(message(ALICE.login, ALICE.login, subject))
    port = w.port("submission" if scheme == "smtp" else "smtps")
    done = run([
        "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(w.ca),
        "--interface", CLIENT_IP, f"{scheme}://localhost:{port}/curl.client.example",
        "--user", f"{ALICE.login}:{ALICE.password}", "--login-options", "AUTH=PLAIN",
        "--mail-from", ALICE.login, "--mail-rcpt", ALICE.login, "--upload-file", str(mail),
    ])  # fmt: skip
    assert done.returncode == 0, done.stderr
    received = assert_delivered_once_via_xclient(w, ALICE, subject)
    assert received.startswith("from curl.client.example (unknown [127.0.0.2])")


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_smtplib_submission(xclient_world: SmtpWorld, server_cert: Any, mechanism: str) -> None:
    w, subject = xclient_world, unique_subject(f"smtplib {mechanism}")
    client = smtplib.SMTP(
        "localhost", w.port("submission"), timeout=10, source_address=(CLIENT_IP, 0)
    )
    client.ehlo("smtplib.client.example")
    client.starttls(context=ssl.create_default_context(cafile=str(server_cert.ca)))
    client.ehlo("smtplib.client.example")
    client.user, client.password = BOB.login, BOB.password  # spaces and quotes
    assert client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))[0] == 235
    assert client.sock is not None
    client_port = client.sock.getsockname()[1]
    assert client.sendmail(BOB.login, [ALICE.login], message(BOB.login, ALICE.login, subject)) == {}
    client.quit()
    received = assert_delivered_once_via_xclient(w, ALICE, subject)
    assert f"(Authenticated sender: {BOB.login})" in received
    # Postfix logs the client's own port too: only XCLIENT PORT can have told it.
    assert postfix.wait_for_log(w.postfix, f"client=unknown[{CLIENT_IP}]:{client_port},")


def test_wrong_password_never_reaches_postfix(xclient_world: SmtpWorld) -> None:
    w = xclient_world
    client = smtplib.SMTP_SSL(
        "localhost", w.port("smtps"), timeout=10, source_address=(CLIENT_IP, 0),
        context=ssl.create_default_context(cafile=str(w.ca)),
    )  # fmt: skip
    client.ehlo("smtplib.client.example")
    client.user, client.password = ALICE.login, "wrong"
    with pytest.raises(smtplib.SMTPAuthenticationError) as failed:
        client.auth("PLAIN", client.auth_plain)
    assert (failed.value.smtp_code, failed.value.smtp_error) == (
        535,
        b"5.7.8 Invalid login or password",
    )
    client.quit()


def test_smtp_mode_auth_logs_in_to_postfix_with_sasl(
    mail_peers: tuple[peers.Peer, peers.Peer], server_cert: Any
) -> None:
    subject = unique_subject("smtp_mode auth")
    with world(mail_peers, server_cert, smtp_mode="auth") as w:
        client = smtplib.SMTP_SSL(
            "localhost", w.port("smtps"), timeout=10, source_address=(CLIENT_IP, 0),
            context=ssl.create_default_context(cafile=str(w.ca)),
        )  # fmt: skip
        client.login(ALICE.login, ALICE.password)
        client.sendmail(ALICE.login, [BOB.login], message(ALICE.login, BOB.login, subject))
        client.quit()
        headers = delivered_once(w, BOB, subject)
    received = received_from_client(headers)
    # No XCLIENT in this mode: Postfix sees mailgate's own address, and a SASL login.
    assert "[127.0.0.1]" in received and f"[{CLIENT_IP}]" not in received
    assert f"(Authenticated sender: {ALICE.login})" in received
    lines = postfix.wait_for_log(w.postfix, f"sasl_method=PLAIN, sasl_username={ALICE.login}")
    assert lines


# --- relay ("auth none", port 25 style) --------------------------------------------------------


def test_relay_to_a_local_domain(xclient_world: SmtpWorld) -> None:
    w, subject = xclient_world, unique_subject("relay")
    client = smtplib.SMTP("127.0.0.1", w.port("relay"), timeout=10, source_address=(CLIENT_IP, 0))
    client.ehlo("mx.sender.example")
    sender = f"{uuid.uuid4().hex}@sender.example"  # finds this test's auth_http request
    assert client.sendmail(sender, [ALICE.login], message(sender, ALICE.login, subject)) == {}
    client.quit()
    received = assert_delivered_once_via_xclient(w, ALICE, subject)
    assert received.startswith("from mx.sender.example (unknown [127.0.0.2])")
    assert "Authenticated sender" not in received
    # smtplib writes "mail FROM:<...> size=N"; nginx and mailgate pass the line as it came.
    [request] = [r for r in w.auth.requests if f"<{sender}>" in r.get("Auth-SMTP-From", "")]
    assert request["Auth-SMTP-From"].startswith(f"mail FROM:<{sender}>")
    assert request["Auth-SMTP-Helo"] == "mx.sender.example"
    assert request["Client-IP"] == CLIENT_IP


def test_relay_unknown_user_gets_postfix_550(xclient_world: SmtpWorld) -> None:
    w = xclient_world
    client = smtplib.SMTP("127.0.0.1", w.port("relay"), timeout=10, source_address=(CLIENT_IP, 0))
    client.ehlo("mx.sender.example")
    client.mail("someone@sender.example")
    code, text = client.rcpt("nobody@example.com")
    assert code == 550
    assert text.startswith(b"5.1.1 <nobody@example.com>: Recipient address rejected")
    code, text = client.rcpt("victim@elsewhere.example")
    assert (code, text) == (550, b"5.7.1 Relay access denied")  # auth_http said no
    client.quit()


def test_relay_several_recipients_one_delivery_each(xclient_world: SmtpWorld) -> None:
    w, subject = xclient_world, unique_subject("relay two")
    client = smtplib.SMTP("127.0.0.1", w.port("relay"), timeout=10, source_address=(CLIENT_IP, 0))
    client.ehlo("mx.sender.example")
    sender = f"{uuid.uuid4().hex}@sender.example"
    rcpts = [ALICE.login, BOB.login]
    assert client.sendmail(sender, rcpts, message(sender, ", ".join(rcpts), subject)) == {}
    client.quit()
    for user in (ALICE, BOB):
        assert_delivered_once_via_xclient(w, user, subject)
    # One transaction at Postfix: the second RCPT went through the relay, not a new login.
    [queued] = postfix.wait_for_log(w.postfix, f"from=<{sender}>, size=")
    assert "nrcpt=2" in queued
