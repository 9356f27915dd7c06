"""Real nginx (mail module) asking `mailgate auth-server` over auth_http, two real Dovecots.

The directory is SQLite, made with the admin CLI: store1 is logged in to as Dovecot's master
user, store2 with the user's own password (passthrough). Alice's directory password is not
her Dovecot password, so her reaching store1 proves the master login; Bob's is the same on
both sides, so his reaching store2 proves the passthrough. Where a user landed is proven by
the one message only the home store holds ("on store1" or "on store2").
"""

from __future__ import annotations

import imaplib
import os
import poplib
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from .conftest import ALICE, BOB, DovecotStores, MailUser, require
from .mailgate_proc import SRC, listening
from .test_directory_proxy import (
    CLIENT_TIMEOUT,
    imap_plain,
    imap_refusal,
    imap_subjects,
    on,
    pop3_refusal,
    pop3_subjects,
    populate,
    write_config,
)

HEADER = "X-NGX-Auth-Key"
SECRET = "nginx and mailgate share this"  # test data, never a real credential
# Alice's password in mailgate's directory. Dovecot knows her as ALICE.password: only the
# master login can take her to store1.
ALICE_PW = "alice's directory password"
# The auth server imports aiohttp and SQLAlchemy and binds: well under a second; 20 s is a hang.
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
# One curl request to a local HTTP server.
CURL_TIMEOUT = 10.0
# What mailgate's Reject says, and nginx passes on after "NO " or "-ERR ".
REFUSAL = "Authentication failed."


@dataclass
class Stack:
    nginx: peers.Peer
    auth_port: int
    auth_log: Path

    @property
    def imap(self) -> int:
        return int(self.nginx.ports["imap"])

    @property
    def pop3(self) -> int:
        return int(self.nginx.ports["pop3"])


def start_auth_server(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailgate", "auth-server", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONPATH": pythonpath},
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise AssertionError(f"auth-server did not start:\n{log.read_text()}")
        time.sleep(peers.POLL_INTERVAL)
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(STOP_TIMEOUT)


@pytest.fixture(scope="module")
def stack(
    nginx_available: Path,
    dovecot_stores: DovecotStores,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("nginx-authserver")
    auth_port = peers.free_port()
    config = write_config(
        workdir,
        {
            "directory": {"url": "sqlite:///directory.db"},
            # Wrong passwords are tried on purpose; no throttle delay on top of Auth-Wait.
            "throttle": {"free": 1000},
            "auth_server": {
                "listen": f"127.0.0.1:{auth_port}",
                "required_header": {HEADER: SECRET},
            },
        },
    )
    populate(config, dovecot_stores, {ALICE: ALICE_PW, BOB: BOB.password}, master_on_store1=True)
    log = workdir / "auth-server.log"
    auth = start_auth_server(config, auth_port, log)
    try:
        nginx = peers.start_nginx_mail(
            workdir,
            imap_port=peers.free_port(),
            pop3_port=peers.free_port(),
            auth_url=f"127.0.0.1:{auth_port}/auth",
            extra=f'  auth_http_header {HEADER} "{SECRET}";\n',
        )
        try:
            yield Stack(nginx, auth_port, log)
        finally:
            nginx.stop()
    finally:
        stop(auth)


USERS = [(ALICE, ALICE_PW), (BOB, BOB.password)]
IDS = ["alice-master-user", "bob-passthrough"]


@pytest.mark.parametrize(("user", "password"), USERS, ids=IDS)
def test_imap_login_through_nginx_lands_on_the_home_store(
    stack: Stack, user: MailUser, password: str
) -> None:
    assert imap_subjects(stack.imap, user.login, password) == on(user.home)
    assert imap_plain(stack.imap, user.login, password) == on(user.home)


@pytest.mark.parametrize(("user", "password"), USERS, ids=IDS)
def test_pop3_login_through_nginx_lands_on_the_home_store(
    stack: Stack, user: MailUser, password: str
) -> None:
    assert pop3_subjects(stack.pop3, user.login, password) == on(user.home)


def test_the_directory_decides_not_the_store(stack: Stack) -> None:
    """Alice's Dovecot password is not hers in the directory: nginx never gets that far."""
    assert imap_refusal(stack.imap, ALICE.login, ALICE.password) == f"b'{REFUSAL}'"


def test_wrong_password_and_unknown_user_get_nginxs_refusal(stack: Stack) -> None:
    for user in (BOB.login, "nobody@example.org"):
        assert imap_refusal(stack.imap, user, "wrong") == f"b'{REFUSAL}'"
        assert pop3_refusal(stack.pop3, user, "wrong") == f"b'-ERR {REFUSAL}'"


def test_a_session_may_try_again_after_a_wrong_password(stack: Stack) -> None:
    with imaplib.IMAP4("127.0.0.1", stack.imap, timeout=CLIENT_TIMEOUT) as imap:
        with pytest.raises(imaplib.IMAP4.error):
            imap.login(BOB.login, "wrong")
        imap.login(BOB.login, BOB.password)
        typ, _ = imap.select("INBOX", readonly=True)
        assert typ == "OK"
    pop = poplib.POP3("127.0.0.1", stack.pop3, timeout=CLIENT_TIMEOUT)
    try:
        pop.user(ALICE.login)
        with pytest.raises(poplib.error_proto):
            pop.pass_("wrong")
        pop.user(ALICE.login)
        pop.pass_(ALICE_PW)
        assert pop.stat()[0] == 1
        pop.quit()
    finally:
        pop.close()


# --- the HTTP side, as nginx and as anyone else -------------------------------------------------


def curl(stack: Stack, *headers: str) -> tuple[int, dict[str, str]]:
    """GET /auth with these headers; returns the status and the answer's headers."""
    require("curl")
    argv = ["curl", "-sS", "-o", "/dev/null", "-D", "-", "--max-time", str(CURL_TIMEOUT)]
    for header in headers:
        argv += ["-H", header]
    done = subprocess.run(
        [*argv, f"http://127.0.0.1:{stack.auth_port}/auth"],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT * 2,
        check=True,
    )
    status_line, *lines = done.stdout.strip().splitlines()
    fields = dict(line.split(": ", 1) for line in lines if ": " in line)
    return int(status_line.split()[1]), fields


# What nginx sends for Bob's IMAP LOGIN (reference: nginx-auth-http.md): space and "%" escaped.
BOB_REQUEST = (
    "Auth-Method: plain",
    f"Auth-User: {BOB.login}",
    'Auth-Pass: bob%20secret%20"quoted"',
    "Auth-Protocol: imap",
    "Auth-Login-Attempt: 1",
    "Client-IP: 127.0.0.1",
)


def test_requests_without_the_shared_secret_get_403(
    stack: Stack, dovecot_stores: DovecotStores
) -> None:
    assert curl(stack, *BOB_REQUEST)[0] == 403
    assert curl(stack, *BOB_REQUEST, f"{HEADER}: a guess")[0] == 403
    status, answer = curl(stack, *BOB_REQUEST, f"{HEADER}: {SECRET}")
    assert status == 200
    assert answer["Auth-Status"] == "OK"
    # An IP address: nginx does not resolve Auth-Server.
    assert answer["Auth-Server"] == "127.0.0.1"
    assert answer["Auth-Port"] == str(dovecot_stores.store2.ports["imap"])
    assert (answer["Auth-User"], answer["Auth-Pass"]) == (BOB.login, BOB.password)


def test_an_nginx_without_the_secret_logs_nobody_in(
    stack: Stack, tmp_path: Path, nginx_available: Path
) -> None:
    """A second nginx whose config lacks auth_http_header: mailgate answers it 403, and nginx
    ends its client's session with an internal error instead of logging anyone in."""
    nginx = peers.start_nginx_mail(
        tmp_path,
        imap_port=peers.free_port(),
        pop3_port=peers.free_port(),
        auth_url=f"127.0.0.1:{stack.auth_port}/auth",
        name="nginx-no-secret",
    )
    try:
        with socket.create_connection(("127.0.0.1", nginx.ports["imap"]), CLIENT_TIMEOUT) as s:
            s.settimeout(CLIENT_TIMEOUT)
            assert s.recv(1024).startswith(b"* OK")
            s.sendall(b'a1 LOGIN "bob@example.org" "bob secret \\"quoted\\""\r\n')
            reply = b""
            while chunk := s.recv(1024):
                reply += chunk
        assert reply == b"* BAD internal server error\r\n"  # then nginx closes
    finally:
        nginx.stop()
