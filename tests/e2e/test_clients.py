"""What real clients send, through mailgate and to Dovecot itself: each must get what Dovecot
gives it.

Dovecot is the reference: every exchange here is run against a real Dovecot directly and
through mailgate in front of it (the nginx auth_http answer with status 204 against nginx's
mail module). These exchanges are the differences issue 7 item 5 found and fixed: mutt's
empty initial response, unknown first commands, RFC 2971's largest ID, a 204 from auth_http.

The users and the two stores are conftest's: Bob's message is only on store2, Alice's only
on store1, so a subject read through mailgate proves where the login landed. The auth service
(examples/auth_service.py) keeps the passwords as {PLAIN}, which CRAM-MD5 needs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import imaplib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from .conftest import ALICE, BOB, DovecotStores, MailUser, require
from .example_auth import ExampleAuth, running_example_auth
from .mailgate_proc import MailgateProcess, running_mailgate
from .mutt_client import run_mutt

# Client-side bound on every network wait: each step here takes milliseconds.
CLIENT_TIMEOUT = 10.0
CRLF = b"\r\n"

# --- the peers ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth(
    dovecot_stores: DovecotStores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ExampleAuth]:
    """example.com (Alice) -> store1 by the port map, example.org (Bob) -> store2's IMAP."""
    store1, store2 = dovecot_stores.store1.ports, dovecot_stores.store2.ports
    with running_example_auth(
        tmp_path_factory.mktemp("clients-auth"),
        {u.login: u.password for u in (ALICE, BOB)},
        routes={"example.com": "smtp:127.0.0.1",
                "example.org": f"smtp:[127.0.0.1]:{store2['imap']}"},
        port_map={"imap": store1["imap"], "pop3": store1["pop3"]},
        scheme="PLAIN",  # CRAM-MD5 needs the clear password, on both sides
    ) as service:  # fmt: skip
        yield service


@pytest.fixture(scope="module")
def mailgate(
    auth: ExampleAuth,
    server_cert: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailgateProcess]:
    cert, key, _ = server_cert
    config = {
        "shutdown_timeout": 2,
        "client_timeout": CLIENT_TIMEOUT,
        "tls": {"certificate": str(cert), "certificate_key": str(key)},
        "auth_http": {"url": auth.url, "timeout": 5, "header": auth.header},
        "backend": {"connect_timeout": 2, "login_timeout": 5},
        "throttle": {"enabled": False},
        # Every mechanism Dovecot offers, so that clients choose as they would there.
        "imap": {"auth": ["login", "plain", "cram-md5"]},
        "pop3": {"auth": ["user", "plain", "login", "cram-md5"]},
        "smtp": {"auth": ["plain", "login", "cram-md5"]},
    }
    listeners = {
        "imap": {"protocol": "imap", "tls": "starttls"},
        "imaps": {"protocol": "imap", "tls": "implicit"},
        "pop3": {"protocol": "pop3", "tls": "starttls"},
        "pop3s": {"protocol": "pop3", "tls": "implicit"},
        "smtp": {"protocol": "smtp", "tls": "starttls"},
    }
    with running_mailgate(tmp_path_factory.mktemp("clients-mailgate"), listeners, config) as mg:
        yield mg
    assert "Traceback" not in mg.log_text(), mg.log_tail()


@pytest.fixture(scope="module")
def submission(tmp_path_factory: pytest.TempPathFactory) -> Iterator[peers.Peer]:
    """Dovecot's own SMTP submission service: the reference for SMTP AUTH (nothing is sent)."""
    require("dovecot")
    port = peers.free_port
    dovecot = peers.start_dovecot(
        tmp_path_factory.mktemp("clients-submission"), "submission", imap_port=port(),
        pop3_port=port(), submission_port=port(), users={ALICE.login: ALICE.password},
    )  # fmt: skip
    yield dovecot
    dovecot.stop()


def port_of(target: str, protocol: str, stores: DovecotStores, mg: MailgateProcess) -> int:
    """Alice's home store directly, or mailgate's listener for `protocol`."""
    return int(stores.store1.ports[protocol] if target == "dovecot" else mg.ports[protocol])


# --- mutt ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "authenticators"),
    [
        ("dovecot", "cram-md5"),
        ("dovecot", None),
        ("dovecot", "plain"),
        ("mailgate", "cram-md5"),
        # mutt's default: GNU SASL picks CRAM-MD5 over PLAIN when the server offers both.
        ("mailgate", None),
        ("mailgate", "plain"),
    ],
    ids=["dovecot-cram-md5", "dovecot-default", "dovecot-plain",
         "mailgate-cram-md5", "mailgate-default", "mailgate-plain"],
)  # fmt: skip
def test_mutt_over_imaps_reads_bobs_message_from_his_store(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
    target: str,
    authenticators: str | None,
) -> None:
    require("mutt")
    imaps = dovecot_stores.store2.ports["imaps"] if target == "dovecot" else mailgate.ports["imaps"]
    run = run_mutt(tmp_path, f"imaps://localhost:{imaps}/", BOB.login, BOB.password,
                   server_cert[2], authenticators)  # fmt: skip
    mechanism = "PLAIN" if authenticators == "plain" else "CRAM-MD5"
    assert run.sent(f"AUTHENTICATE {mechanism}"), run.transcript()
    assert run.message is not None, run.transcript()
    assert f"Subject: {dovecot_stores.subject(BOB.home)}" in run.message.splitlines()


# --- curl, fetchmail, mbsync: every mechanism they offer -----------------------------------------

# A CLI client runs one session: connect, TLS, login, fetch, log out.
TOOL_TIMEOUT = 20.0
TARGETS = ("dovecot", "mailgate")


def run_tool(argv: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=home, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
        env={**os.environ, "HOME": str(home)}, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("sasl_ir", [False, True], ids=["", "sasl-ir"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
@pytest.mark.parametrize("listener", ["imaps", "pop3s"])
@pytest.mark.parametrize("target", TARGETS)
def test_curl_with_every_mechanism_reads_alices_message(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
    target: str,
    listener: str,
    mechanism: str,
    sasl_ir: bool,
) -> None:
    require("curl")
    port = port_of(target, listener, dovecot_stores, mailgate)
    path = "/INBOX;UID=1" if listener == "imaps" else "/1"
    done = run_tool(
        ["curl", "--silent", "--show-error", "--max-time", str(int(TOOL_TIMEOUT)),
         "--cacert", str(server_cert[2]), "--login-options", f"AUTH={mechanism}",
         *(["--sasl-ir"] * sasl_ir), "-u", f"{ALICE.login}:{ALICE.password}",
         f"{listener}://localhost:{port}{path}"],
        tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Subject: {dovecot_stores.subject(ALICE.home)}" in done.stdout.splitlines()


@pytest.mark.parametrize("protocol", ["IMAP", "POP3"])
@pytest.mark.parametrize("target", TARGETS)
def test_fetchmail_cram_md5_over_starttls_downloads_alices_message(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
    target: str,
    protocol: str,
) -> None:
    require("fetchmail")
    port = port_of(target, protocol.lower(), dovecot_stores, mailgate)
    out, rc = tmp_path / "delivered.mbox", tmp_path / "fetchmailrc"
    rc.write_text(
        f"poll localhost service {port} protocol {protocol} auth cram-md5\n"
        f"  user '{ALICE.login}' password '{ALICE.password}'\n"
        f"  sslproto 'TLS1.2+' sslcertck sslcertfile {server_cert[2]} keep fetchall\n"
        f"  mda \"/bin/sh -c 'cat >> {out}'\"\n"
    )
    rc.chmod(0o600)
    done = run_tool(["fetchmail", "-f", str(rc), "--nosyslog", "-N", "-v"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "AUTH" in done.stdout and "CRAM-MD5" in done.stdout, done.stdout
    subject = f"Subject: {dovecot_stores.subject(ALICE.home)}"
    assert subject in out.read_text().splitlines()


@pytest.mark.parametrize("mechanism", ["CRAM-MD5", "PLAIN", "LOGIN"])
@pytest.mark.parametrize("target", TARGETS)
def test_mbsync_pulls_bobs_inbox_with_each_mechanism(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
    target: str,
    mechanism: str,
) -> None:
    """mbsync (Cyrus SASL) over IMAPS; AuthMechs LOGIN is the LOGIN command."""
    require("mbsync")
    port = dovecot_stores.store2.ports["imaps"] if target == "dovecot" else mailgate.ports["imaps"]
    local, rc, secret = tmp_path / "Mail", tmp_path / "mbsyncrc", tmp_path / "pass"
    local.mkdir()
    secret.write_text(BOB.password + "\n")
    rc.write_text(
        f"IMAPAccount bob\nHost localhost\nPort {port}\nUser {BOB.login}\n"
        f'PassCmd "cat {secret}"\nSSLType IMAPS\nCertificateFile {server_cert[2]}\n'
        f"AuthMechs {mechanism}\n\nIMAPStore remote\nAccount bob\n\n"
        f"MaildirStore near\nPath {local}/\nInbox {local}/INBOX\n\n"
        "Channel bob\nFar :remote:\nNear :near:\nPatterns INBOX\nSync Pull\nCreate Near\n"
    )
    done = run_tool(["mbsync", "-c", str(rc), "bob"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    messages = [p for p in (local / "INBOX").glob("*/*") if p.is_file()]
    assert len(messages) == 1
    subject = f"Subject: {dovecot_stores.subject(BOB.home)}"
    assert subject in messages[0].read_text().splitlines()


# --- the wire ----------------------------------------------------------------------------------


class Wire:
    """A plaintext client that reads line by line; b"" once the server has closed."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), CLIENT_TIMEOUT)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def until(self, done: bytes) -> list[bytes]:
        """Lines up to the first that starts with `done` (or the close)."""
        lines = [self.line()]
        while lines[-1] and not lines[-1].startswith(done):
            lines.append(self.line())
        return lines

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire() -> Iterator[list[Wire]]:
    opened: list[Wire] = []
    yield opened
    for w in opened:
        w.close()


def connect(opened: list[Wire], port: int) -> Wire:
    w = Wire(port)
    opened.append(w)
    return w


def cram_md5_answer(challenge_line: bytes, user: MailUser) -> bytes:
    """The client's answer to "+ <base64 challenge>" / "334 <base64 challenge>" (RFC 2195)."""
    challenge = base64.b64decode(challenge_line.split(b" ", 1)[1])
    digest = hmac.new(user.password.encode(), challenge, hashlib.md5).hexdigest()
    return base64.b64encode(f"{user.login} {digest}".encode()) + CRLF


def plain_response(user: MailUser) -> bytes:
    return base64.b64encode(f"\0{user.login}\0{user.password}".encode()) + CRLF


@pytest.mark.parametrize("first", [b"a1 FROBNICATE", b"a1  NOOP"], ids=["unknown", "two-spaces"])
@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_imap_bad_first_command_gets_bad_and_the_session_goes_on(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    wire: list[Wire],
    target: str,
    first: bytes,
) -> None:
    w = connect(wire, port_of(target, "imap", dovecot_stores, mailgate))
    w.send(first + CRLF)
    reply = w.line()
    assert reply.startswith(b"a1 BAD "), reply
    w.send(b"a2 NOOP\r\n")
    assert w.line().startswith(b"a2 OK")


@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_pop3_unknown_first_command_gets_err_and_the_session_goes_on(
    dovecot_stores: DovecotStores, mailgate: MailgateProcess, wire: list[Wire], target: str
) -> None:
    w = connect(wire, port_of(target, "pop3", dovecot_stores, mailgate))
    w.send(b"FROB\r\n")
    assert w.line().startswith(b"-ERR")
    w.send(b"QUIT\r\n")
    assert w.line().startswith(b"+OK")


@pytest.mark.parametrize("spelling", [b" ", b" ="], ids=["trailing-space", "equals"])
@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_imap_cram_md5_with_an_empty_initial_response_logs_in(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    wire: list[Wire],
    target: str,
    spelling: bytes,
) -> None:
    w = connect(wire, port_of(target, "imap", dovecot_stores, mailgate))
    w.send(b"a AUTHENTICATE CRAM-MD5" + spelling + CRLF)
    challenge = w.line()
    assert challenge.startswith(b"+ "), challenge
    w.send(cram_md5_answer(challenge, ALICE))
    reply = w.until(b"a ")
    assert reply[-1].startswith(b"a OK"), reply


@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_imap_plain_with_a_trailing_space_waits_for_the_response(
    dovecot_stores: DovecotStores, mailgate: MailgateProcess, wire: list[Wire], target: str
) -> None:
    w = connect(wire, port_of(target, "imap", dovecot_stores, mailgate))
    w.send(b"a AUTHENTICATE PLAIN \r\n")
    assert w.line() == b"+ "
    w.send(plain_response(ALICE))
    reply = w.until(b"a ")
    assert reply[-1].startswith(b"a OK"), reply


@pytest.mark.parametrize("spelling", [b" ", b" ="], ids=["trailing-space", "equals"])
@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_pop3_cram_md5_with_an_empty_initial_response_logs_in(
    dovecot_stores: DovecotStores,
    mailgate: MailgateProcess,
    wire: list[Wire],
    target: str,
    spelling: bytes,
) -> None:
    w = connect(wire, port_of(target, "pop3", dovecot_stores, mailgate))
    w.send(b"AUTH CRAM-MD5" + spelling + CRLF)
    challenge = w.line()
    assert challenge.startswith(b"+ "), challenge
    w.send(cram_md5_answer(challenge, ALICE))
    assert w.line().startswith(b"+OK")


@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_pop3_plain_with_a_trailing_space_waits_for_the_response(
    dovecot_stores: DovecotStores, mailgate: MailgateProcess, wire: list[Wire], target: str
) -> None:
    w = connect(wire, port_of(target, "pop3", dovecot_stores, mailgate))
    w.send(b"AUTH PLAIN \r\n")
    assert w.line() == b"+ "
    w.send(plain_response(ALICE))
    assert w.line().startswith(b"+OK")


@pytest.mark.parametrize(
    ("target", "spelling"),
    [("dovecot", b" "), ("dovecot", b" ="), ("mailgate", b" "),
     ("mailgate", b" =")],
    ids=["dovecot-trailing-space", "dovecot-equals", "mailgate-trailing-space", "mailgate-equals"],
)  # fmt: skip
def test_smtp_cram_md5_with_an_empty_initial_response_gets_the_challenge(
    submission: peers.Peer,
    mailgate: MailgateProcess,
    wire: list[Wire],
    target: str,
    spelling: bytes,
) -> None:
    port = submission.ports["submission"] if target == "dovecot" else mailgate.ports["smtp"]
    w = connect(wire, port)
    w.send(b"EHLO client.example\r\n")
    assert w.until(b"250 ")[-1].startswith(b"250 ")
    w.send(b"AUTH CRAM-MD5" + spelling + CRLF)
    challenge = w.line()
    assert challenge.startswith(b"334 ") and b"@" in base64.b64decode(challenge[4:]), challenge
    w.send(b"*\r\n")  # cancel: there is no SMTP backend behind this mailgate
    assert w.line().startswith(b"501 ")


def id_at_rfc2971_limits() -> bytes:
    """30 field-value pairs, 30-octet fields, 1024-octet values: imaptest's id group."""
    pairs = [b'"%s%s" "%s"' % (bytes([0x61 + i % 26]) * (1 + i // 26), b"1" * (29 - i // 26),
                                b"1" * 1024) for i in range(30)]  # fmt: skip
    return b"a ID (" + b" ".join(pairs) + b")\r\n"


@pytest.mark.parametrize("target", ["dovecot", "mailgate"])
def test_imap_id_at_rfc2971_limits_is_answered(
    dovecot_stores: DovecotStores, mailgate: MailgateProcess, wire: list[Wire], target: str
) -> None:
    command = id_at_rfc2971_limits()
    assert len(command) > 31_000  # one line, as imaptest sends it
    w = connect(wire, port_of(target, "imap", dovecot_stores, mailgate))
    w.send(command)
    reply = w.until(b"a ")
    assert reply[0].startswith(b"* ID ") and reply[-1].startswith(b"a OK"), reply
    w.send(b"b NOOP\r\n")
    assert w.line().startswith(b"b OK")


# --- auth_http answers ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_204(
    nginx_available: Path, dovecot_stores: DovecotStores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[peers.Peer]:
    """A real nginx auth location answering every login "204 No Content" with a route to
    store1 (no Auth-Pass: the client's own password goes to Dovecot)."""
    peer = peers.start_nginx_http_auth(
        tmp_path_factory.mktemp("auth-204"), port=peers.free_port(),
        backend_port=dovecot_stores.store1.ports["imap"], http_status=204,
    )  # fmt: skip
    yield peer
    peer.stop()


@pytest.fixture(scope="module")
def behind_auth_204(
    auth_204: peers.Peer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, int]]:
    """The IMAP port of nginx's mail module and of mailgate, both asking `auth_204`."""
    url = f"http://127.0.0.1:{auth_204.ports['http']}/auth"
    workdir = tmp_path_factory.mktemp("behind-auth-204")
    nginx = peers.start_nginx_mail(
        workdir, imap_port=peers.free_port(), pop3_port=peers.free_port(), auth_url=url
    )
    try:
        config = {"auth_http": {"url": url}, "throttle": {"enabled": False}, "shutdown_timeout": 2}
        with running_mailgate(workdir / "mailgate", {"imap": {"protocol": "imap"}}, config) as mg:
            yield {"nginx": nginx.ports["imap"], "mailgate": mg.ports["imap"]}
    finally:
        nginx.stop()


@pytest.mark.parametrize("target", ["nginx", "mailgate"])
def test_auth_http_204_with_a_route_logs_in(
    behind_auth_204: dict[str, int], dovecot_stores: DovecotStores, target: str
) -> None:
    imap = imaplib.IMAP4("127.0.0.1", behind_auth_204[target], timeout=CLIENT_TIMEOUT)
    try:
        try:
            imap.login(ALICE.login, ALICE.password)
        except imaplib.IMAP4.error as refused:  # the known failure is an assertion, not an error
            raise AssertionError(f"LOGIN refused: {refused}") from None
        assert imap.select("INBOX", readonly=True)[0] == "OK"
        _, fetched = imap.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        headers = [part[1] for part in fetched if isinstance(part, tuple)]
        subject = f"Subject: {dovecot_stores.subject(ALICE.home)}".encode()
        assert headers and subject in headers[0], fetched
    finally:
        imap.shutdown()
