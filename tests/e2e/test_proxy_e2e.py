"""The IMAP and POP3 login proxy end to end: real clients -> mailgate (its own process) ->
two real Dovecots, with the route chosen by examples/auth_service.py (its own process).

Every test proves where the user landed by reading the one message that only the user's home
store holds: its subject is "on store1" or "on store2".

Routing. auth_service.py routes a domain to `smtp:[host]:port` (one port for every protocol)
or to `smtp:host` plus its global `--port-map` (one port per protocol for every domain). Both
Dovecots listen on 127.0.0.1 (scripts/peers.py has no listen address to change), so no single
set of routes reaches both stores over both IMAP and POP3: example.com -> store1 goes through
the port map, and example.org -> store2 gets an explicit port, rewritten with the example's own
`--add-route` when a test needs the other protocol. The service reads the database per request
and mailgate does not cache auth_http answers, so a rewrite takes effect at the next login.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from .conftest import ALICE, BOB, PONY, DovecotStores, MailUser, require
from .mailgate_proc import MailgateProcess, SessionLine, running_mailgate

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "auth_service.py"
AUTH_HEADER = "X-NGX-Auth-Key"
AUTH_SECRET = "e2e shared secret"  # test data, never a real credential
USERS = {"alice": ALICE, "bob": BOB, "pony": PONY}
WRONG_PASSWORD = "not alice's %password"
# Client-side bound on every network wait: each step here takes milliseconds, except a failed
# login, which auth_service.py holds for its Auth-Wait of 3 s.
CLIENT_TIMEOUT = 10.0
# A CLI client runs one session: connect, TLS, login through mailgate, fetch, log out.
TOOL_TIMEOUT = 20.0
# The auth service imports aiohttp and binds in well under a second; 20 s means it hangs.
AUTH_READY_TIMEOUT = 20.0
# Listener name -> (protocol, tls) in mailgate.
LISTENERS = {
    "imap": ("imap", "starttls"),
    "imaps": ("imap", "implicit"),
    "pop3": ("pop3", "starttls"),
    "pop3s": ("pop3", "implicit"),
}


# --- the auth service, in its own process ----------------------------------------------------


@dataclass
class AuthService:
    """examples/auth_service.py over a SQLite file; `use(protocol)` makes store2 reachable."""

    db: Path
    stores: DovecotStores
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    current: str = field(default="")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/auth"

    def cli(self, *args: str, stdin: str = "") -> None:
        subprocess.run(
            [sys.executable, str(EXAMPLE), "--db", str(self.db), *args],
            input=stdin.encode(),
            check=True,
            capture_output=True,
            timeout=TOOL_TIMEOUT,
        )

    def use(self, protocol: str) -> None:
        """Route example.org to store2's port for `protocol` (example.com needs no change)."""
        if protocol != self.current:
            port = self.stores.store2.ports[protocol]
            self.cli("--add-route", "example.org", f"smtp:[127.0.0.1]:{port}")
            self.current = protocol


@pytest.fixture(scope="module")
def auth_service(
    dovecot_stores: DovecotStores, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AuthService]:
    workdir = tmp_path_factory.mktemp("auth-service")
    service = AuthService(workdir / "auth.sqlite", dovecot_stores, port=peers.free_port())
    service.cli("--init")
    for user in USERS.values():
        service.cli("--add-user", user.login, stdin=user.password + "\n")
    store1 = dovecot_stores.store1.ports
    service.cli("--add-route", "example.com", "smtp:127.0.0.1")  # by --port-map below
    service.use("imap")
    service.log_path = workdir / "auth_service.log"
    with service.log_path.open("ab") as log:
        service.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--db", str(service.db),
             "--listen", f"127.0.0.1:{service.port}", "--secret-header", AUTH_HEADER,
             "--port-map", f"imap={store1['imap']},pop3={store1['pop3']}"],
            env={**os.environ, "AUTH_SERVICE_SECRET": AUTH_SECRET},
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + AUTH_READY_TIMEOUT
        while not peers.port_open(service.port):
            if service.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"auth_service.py did not start:\n{service.log_path.read_text()}"
                )
            time.sleep(0.05)
        yield service
    finally:
        service.proc.terminate()
        service.proc.wait(CLIENT_TIMEOUT)


@pytest.fixture(scope="module")
def mailgate(
    auth_service: AuthService,
    server_cert: tuple[Path, Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MailgateProcess]:
    cert, key, _ = server_cert
    config = {
        "shutdown_timeout": 2,
        "client_timeout": CLIENT_TIMEOUT,
        "tls": {"certificate": str(cert), "certificate_key": str(key)},
        "auth_http": {"url": auth_service.url, "timeout": 5, "header": {AUTH_HEADER: AUTH_SECRET}},
        "backend": {"connect_timeout": 2, "login_timeout": 5},
        "throttle": {"enabled": False},
    }
    listeners = {name: {"protocol": p, "tls": tls} for name, (p, tls) in LISTENERS.items()}
    with running_mailgate(tmp_path_factory.mktemp("mailgate"), listeners, config) as mg:
        yield mg
    # After the SIGTERM and exit 0 (checked by running_mailgate): nothing in the whole log
    # of the module's sessions may hold a password, raw or as auth_http escapes it.
    assert_no_password(mg, WRONG_PASSWORD)
    assert "Traceback" not in mg.log_text(), mg.log_tail()


@pytest.fixture
def tls_context(server_cert: tuple[Path, Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(server_cert[2]))


@pytest.fixture
def imap_routes(auth_service: AuthService) -> None:
    auth_service.use("imap")


@pytest.fixture
def pop3_routes(auth_service: AuthService) -> None:
    auth_service.use("pop3")


def escape(text: str) -> str:
    """What an Auth-Pass header carries: nginx escapes space and "%"."""
    return text.replace("%", "%25").replace(" ", "%20")


def quoted(text: str) -> str:
    """An IMAP quoted string ("%" is a list wildcard, so p%ony@... cannot be an atom)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def subject_line(stores: DovecotStores, user: MailUser) -> bytes:
    return f"Subject: {stores.subject(user.home)}".encode()


# --- imaplib ---------------------------------------------------------------------------------


def imap_subjects(imap: imaplib.IMAP4) -> list[bytes]:
    typ, count = imap.select("INBOX", readonly=True)
    assert typ == "OK", count
    typ, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert typ == "OK", data
    return [part[1].strip() for part in data if isinstance(part, tuple)]


def imap_starttls(mg: MailgateProcess, ctx: ssl.SSLContext) -> imaplib.IMAP4:
    imap = imaplib.IMAP4("127.0.0.1", mg.ports["imap"], timeout=CLIENT_TIMEOUT)
    typ, _ = imap.starttls(ssl_context=ctx)
    assert typ == "OK"
    return imap


@pytest.mark.usefixtures("imap_routes")
@pytest.mark.parametrize("name", ["alice", "bob", "pony"])
def test_imap_starttls_login_lands_on_the_home_store(
    mailgate: MailgateProcess,
    dovecot_stores: DovecotStores,
    tls_context: ssl.SSLContext,
    name: str,
) -> None:
    user = USERS[name]
    imap = imap_starttls(mailgate, tls_context)
    assert "LOGINDISABLED" not in imap.capabilities
    typ, _ = imap.login(quoted(user.login), user.password)
    assert typ == "OK"
    assert imap_subjects(imap) == [subject_line(dovecot_stores, user)]
    assert imap.logout()[0] == "BYE"


@pytest.mark.usefixtures("imap_routes")
def test_imap_wrong_password_fails_then_the_right_one_works_in_the_same_session(
    mailgate: MailgateProcess, dovecot_stores: DovecotStores, tls_context: ssl.SSLContext
) -> None:
    imap = imap_starttls(mailgate, tls_context)
    since, port = mailgate.log_size(), client_port(imap)
    # xatom returns the tagged status instead of raising, so the NO itself is visible.
    typ, data = imap.xatom("LOGIN", quoted(ALICE.login), quoted(WRONG_PASSWORD))
    assert typ == "NO"
    assert data[-1].startswith(b"[AUTHENTICATIONFAILED]")
    assert imap.login(quoted(ALICE.login), ALICE.password)[0] == "OK"
    assert imap_subjects(imap) == [subject_line(dovecot_stores, ALICE)]
    imap.logout()
    # Two attempts, one session, one line: the one that landed.
    line = one_session_line(mailgate, port, since)
    assert line["user"] == ALICE.login
    assert line["backend"] == f"127.0.0.1:{dovecot_stores.store1.ports['imap']}"
    assert_no_password(mailgate, WRONG_PASSWORD)


@pytest.mark.usefixtures("imap_routes")
@pytest.mark.parametrize("name", ["alice", "bob"])
def test_imaps_implicit_tls_login_lands_on_the_home_store(
    mailgate: MailgateProcess,
    dovecot_stores: DovecotStores,
    tls_context: ssl.SSLContext,
    name: str,
) -> None:
    user = USERS[name]
    imap = imaplib.IMAP4_SSL(
        "127.0.0.1", mailgate.ports["imaps"], ssl_context=tls_context, timeout=CLIENT_TIMEOUT
    )
    assert imap.login(quoted(user.login), user.password)[0] == "OK"
    assert imap_subjects(imap) == [subject_line(dovecot_stores, user)]
    imap.logout()


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.usefixtures("imap_routes")
@pytest.mark.parametrize("listener", ["imap", "imaps"])
def test_imap_commands_pipelined_with_login_reach_dovecot(
    mailgate: MailgateProcess,
    dovecot_stores: DovecotStores,
    tls_context: ssl.SSLContext,
    listener: str,
) -> None:
    raw = socket.create_connection(("127.0.0.1", mailgate.ports[listener]), CLIENT_TIMEOUT)
    if listener == "imaps":
        sock = tls_context.wrap_socket(raw, server_hostname="127.0.0.1")
        assert read_until(sock, b"\r\n").startswith(b"* OK")
    else:
        assert read_until(raw, b"\r\n").startswith(b"* OK")
        raw.sendall(b"s STARTTLS\r\n")
        assert b"s OK" in read_until(raw, b"s ")
        sock = tls_context.wrap_socket(raw, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(  # one write: mailgate must hand what follows LOGIN to Dovecot
            f"a LOGIN {quoted(BOB.login)} {quoted(BOB.password)}\r\n"
            "b SELECT INBOX\r\nc FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n"
            "d LOGOUT\r\n".encode()
        )
        reply = read_until(sock, b"d OK")
    for tag in (b"a", b"b", b"c", b"d"):
        assert b"\r\n" + tag + b" OK" in b"\r\n" + reply, reply.decode()
    assert b"* 1 EXISTS" in reply
    assert subject_line(dovecot_stores, BOB) in reply
    assert reply.index(b"a OK") < reply.index(b"b OK") < reply.index(b"c OK")


# --- poplib ----------------------------------------------------------------------------------


def pop3_subject(pop: poplib.POP3, stores: DovecotStores, user: MailUser) -> None:
    pop.user(user.login)
    assert pop.pass_(user.password).startswith(b"+OK")
    count, _ = pop.stat()
    assert count == 1
    _, lines, _ = pop.retr(1)
    assert subject_line(stores, user) in lines
    assert pop.quit().startswith(b"+OK")


@pytest.mark.usefixtures("pop3_routes")
@pytest.mark.parametrize("name", ["alice", "bob", "pony"])
def test_pop3_stls_user_pass_lands_on_the_home_store(
    mailgate: MailgateProcess,
    dovecot_stores: DovecotStores,
    tls_context: ssl.SSLContext,
    name: str,
) -> None:
    pop = poplib.POP3("127.0.0.1", mailgate.ports["pop3"], timeout=CLIENT_TIMEOUT)
    assert pop.stls(tls_context).startswith(b"+OK")
    pop3_subject(pop, dovecot_stores, USERS[name])


@pytest.mark.usefixtures("pop3_routes")
@pytest.mark.parametrize("name", ["alice", "bob"])
def test_pop3s_implicit_tls_lands_on_the_home_store(
    mailgate: MailgateProcess,
    dovecot_stores: DovecotStores,
    tls_context: ssl.SSLContext,
    name: str,
) -> None:
    pop = poplib.POP3_SSL(
        "127.0.0.1", mailgate.ports["pop3s"], context=tls_context, timeout=CLIENT_TIMEOUT
    )
    pop3_subject(pop, dovecot_stores, USERS[name])


@pytest.mark.usefixtures("pop3_routes")
def test_pop3_wrong_password_fails_then_the_right_one_works_in_the_same_session(
    mailgate: MailgateProcess, dovecot_stores: DovecotStores, tls_context: ssl.SSLContext
) -> None:
    pop = poplib.POP3_SSL(
        "127.0.0.1", mailgate.ports["pop3s"], context=tls_context, timeout=CLIENT_TIMEOUT
    )
    pop.user(BOB.login)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\]"):
        pop.pass_(WRONG_PASSWORD)
    pop3_subject(pop, dovecot_stores, BOB)


@pytest.mark.usefixtures("pop3_routes")
def test_pop3_commands_pipelined_with_login_reach_dovecot(
    mailgate: MailgateProcess, dovecot_stores: DovecotStores, tls_context: ssl.SSLContext
) -> None:
    raw = socket.create_connection(("127.0.0.1", mailgate.ports["pop3s"]), CLIENT_TIMEOUT)
    with tls_context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
        assert read_until(sock, b"\r\n").startswith(b"+OK")
        # RFC 2449 PIPELINING, which mailgate advertises: all of it in one write.
        sock.sendall(f"USER {PONY.login}\r\nPASS {PONY.password}\r\nRETR 1\r\nQUIT\r\n".encode())
        reply = read_until(sock, b"\r\n.\r\n+OK")
    assert reply.count(b"+OK") >= 4, reply
    assert b"-ERR" not in reply, reply
    assert subject_line(dovecot_stores, PONY) in reply


# --- curl ------------------------------------------------------------------------------------


CURL_URLS = {  # listener -> (URL path, extra options)
    "imap": ("/INBOX;UID=1", ["--ssl-reqd"]),
    "imaps": ("/INBOX;UID=1", []),
    "pop3": ("/1", ["--ssl-reqd"]),
    "pop3s": ("/1", []),
}


@pytest.mark.parametrize("name", ["alice", "bob"])
@pytest.mark.parametrize("listener", list(CURL_URLS))
def test_curl_fetches_the_message_from_the_home_store(
    mailgate: MailgateProcess,
    auth_service: AuthService,
    dovecot_stores: DovecotStores,
    server_cert: tuple[Path, Path, Path],
    listener: str,
    name: str,
) -> None:
    require("curl")
    auth_service.use(LISTENERS[listener][0])
    user = USERS[name]
    path, options = CURL_URLS[listener]
    url = f"{listener}://127.0.0.1:{mailgate.ports[listener]}{path}"
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(TOOL_TIMEOUT)),
         "--cacert", str(server_cert[2]), *options, "-u", f"{user.login}:{user.password}", url],
        capture_output=True, timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert subject_line(dovecot_stores, user) in done.stdout.splitlines()


# --- openssl s_client ------------------------------------------------------------------------


S_CLIENT_SCRIPTS = {  # listener -> (lines sent at once, replies expected in order)
    "imap": (
        [f"a LOGIN {quoted(PONY.login)} {quoted(PONY.password)}", "b SELECT INBOX",
         "c FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])", "d LOGOUT"],
        [b"a OK", b"b OK", b"Subject: on store1", b"c OK", b"d OK"],
    ),
    "pop3": (
        [f"USER {PONY.login}", f"PASS {PONY.password}", "RETR 1", "QUIT"],
        [b"+OK", b"+OK", b"Subject: on store1", b"+OK"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("listener", list(S_CLIENT_SCRIPTS))
def test_openssl_s_client_starttls_session(
    mailgate: MailgateProcess,
    auth_service: AuthService,
    server_cert: tuple[Path, Path, Path],
    listener: str,
) -> None:
    require("openssl")
    auth_service.use(listener)
    lines, expected = S_CLIENT_SCRIPTS[listener]
    done = subprocess.run(
        # -quiet: no certificate dump, and stay until the server closes (after LOGOUT/QUIT);
        # -crlf: each stdin line goes out with CRLF.
        ["openssl", "s_client", "-starttls", listener, "-connect",
         f"127.0.0.1:{mailgate.ports[listener]}", "-CAfile", str(server_cert[2]),
         "-verify_return_error", "-verify_ip", "127.0.0.1", "-quiet", "-crlf"],
        input="\n".join(lines).encode() + b"\n", capture_output=True, timeout=TOOL_TIMEOUT,
    )  # fmt: skip
    out = done.stdout
    position = 0
    for reply in expected:
        found = out.find(reply, position)
        assert found >= 0, f"{reply!r} missing after offset {position}:\n{out.decode()}"
        position = found + len(reply)
    assert b"NO " not in out and b"-ERR" not in out, out


# --- the log -----------------------------------------------------------------------------------


def client_port(obj: imaplib.IMAP4 | poplib.POP3 | socket.socket) -> int:
    sock = obj if isinstance(obj, socket.socket) else obj.sock
    return int(sock.getsockname()[1])


def one_session_line(mg: MailgateProcess, port: int, since: int) -> SessionLine:
    found = mg.wait_for_sessions(lambda s: s["client"] == f"127.0.0.1:{port}", since=since)
    assert len(found) == 1, [s.text for s in found] or mg.log_tail()
    return found[0]


@pytest.mark.usefixtures("pop3_routes")
def test_log_has_one_line_per_session_and_no_password(
    mailgate: MailgateProcess, dovecot_stores: DovecotStores, tls_context: ssl.SSLContext
) -> None:
    since = mailgate.log_size()
    # A relayed POP3 session on store2, over STLS.
    pop = poplib.POP3("127.0.0.1", mailgate.ports["pop3"], timeout=CLIENT_TIMEOUT)
    pop.stls(tls_context)
    relayed_port = client_port(pop)
    pop3_subject(pop, dovecot_stores, BOB)
    # A session that never logs in, over implicit TLS.
    imap = imaplib.IMAP4_SSL(
        "127.0.0.1", mailgate.ports["imaps"], ssl_context=tls_context, timeout=CLIENT_TIMEOUT
    )
    idle_port = client_port(imap)
    imap.noop()
    imap.logout()

    relayed = one_session_line(mailgate, relayed_port, since)
    assert relayed.protocol == "pop3"
    assert relayed["user"] == BOB.login
    assert relayed["backend"] == f"127.0.0.1:{dovecot_stores.store2.ports['pop3']}"
    assert relayed["tls"].startswith("TLSv1.")
    assert int(relayed["in"]) > 0 and int(relayed["out"]) > 0
    assert relayed["outcome"] == "backend closed"  # Dovecot closes after QUIT

    idle = one_session_line(mailgate, idle_port, since)
    assert idle.protocol == "imap"
    assert (idle["user"], idle["backend"]) == ("-", "-")
    assert idle["tls"].startswith("TLSv1.")
    assert "in" not in idle.fields  # nothing was relayed
    assert idle["outcome"] == "logout"
    assert_no_password(mailgate)


@pytest.mark.usefixtures("imap_routes")
def test_tls_client_closing_with_close_notify_leaves_no_warning_in_the_log(
    mailgate: MailgateProcess, tls_context: ssl.SSLContext
) -> None:
    # curl, NSS (Thunderbird) and most TLS stacks send close_notify when they hang up.
    since = mailgate.log_size()
    raw = socket.create_connection(("127.0.0.1", mailgate.ports["imaps"]), CLIENT_TIMEOUT)
    sock = tls_context.wrap_socket(raw, server_hostname="127.0.0.1")
    read_until(sock, b"\r\n")
    sock.sendall(f"a LOGIN {quoted(ALICE.login)} {quoted(ALICE.password)}\r\n".encode())
    assert b"a OK" in read_until(sock, b"a OK")
    port = client_port(sock)
    sock.unwrap().close()  # close_notify while the relay is open, then FIN
    one_session_line(mailgate, port, since)
    with mailgate.log_path.open() as f:
        f.seek(since)
        logged = f.read()
    assert " WARNING " not in logged, logged


@pytest.mark.usefixtures("imap_routes")
def test_client_half_close_after_login_is_a_client_close(
    mailgate: MailgateProcess, dovecot_stores: DovecotStores
) -> None:
    # Plain text: the listener offers STARTTLS but does not insist on it.
    since = mailgate.log_size()
    with socket.create_connection(("127.0.0.1", mailgate.ports["imap"]), CLIENT_TIMEOUT) as sock:
        read_until(sock, b"\r\n")
        sock.sendall(f"a LOGIN {quoted(ALICE.login)} {quoted(ALICE.password)}\r\n".encode())
        assert b"a OK" in read_until(sock, b"a OK")
        port = client_port(sock)
        sock.shutdown(socket.SHUT_WR)  # the client hangs up without LOGOUT
        after = read_until(sock, b"<never>")  # until mailgate closes
    line = one_session_line(mailgate, port, since)
    assert (after, line["outcome"]) == (b"", "client closed")


def assert_no_password(mg: MailgateProcess, *extra: str) -> None:
    """No password in the log: neither as typed nor as auth_http escapes it."""
    text = mg.log_text()
    for password in (*(u.password for u in USERS.values()), *extra):
        assert password not in text and escape(password) not in text


# --- fetchmail and mbsync ----------------------------------------------------------------------


def run_tool(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
        env={**os.environ, "HOME": str(cwd)},
    )  # fmt: skip


@pytest.mark.parametrize(("protocol", "name"), [("imap", "alice"), ("pop3", "bob")])
def test_fetchmail_downloads_from_the_home_store(
    mailgate: MailgateProcess,
    auth_service: AuthService,
    dovecot_stores: DovecotStores,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
    protocol: str,
    name: str,
) -> None:
    require("fetchmail")
    auth_service.use(protocol)
    user, out = USERS[name], tmp_path / "delivered.mbox"
    rc = tmp_path / "fetchmailrc"
    assert "'" not in user.password  # fetchmailrc takes it single-quoted, without escapes
    rc.write_text(
        f"poll 127.0.0.1 service {mailgate.ports[protocol]} protocol {protocol.upper()}\n"
        f"  user '{user.login}' password '{user.password}'\n"
        f"  sslproto 'TLS1.2+' sslcertck sslcertfile {server_cert[2]}\n"
        "  sslcommonname localhost keep fetchall\n"
        f"  mda \"/bin/sh -c 'cat >> {out}'\"\n"
    )
    rc.chmod(0o600)
    done = run_tool(["fetchmail", "-f", str(rc), "--nosyslog", "-N"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert subject_line(dovecot_stores, user).decode() in out.read_text().splitlines()


def test_mbsync_pulls_the_inbox_from_the_home_store(
    mailgate: MailgateProcess,
    auth_service: AuthService,
    dovecot_stores: DovecotStores,
    server_cert: tuple[Path, Path, Path],
    tmp_path: Path,
) -> None:
    require("mbsync")
    auth_service.use("imap")
    local = tmp_path / "Mail"
    local.mkdir()
    rc = tmp_path / "mbsyncrc"
    rc.write_text(
        f"IMAPAccount bob\nHost localhost\nPort {mailgate.ports['imap']}\n"
        f'User {BOB.login}\nPassCmd "cat {tmp_path / "pass"}"\n'
        f"SSLType STARTTLS\nCertificateFile {server_cert[2]}\n\n"
        "IMAPStore bob-remote\nAccount bob\n\n"
        f"MaildirStore bob-local\nPath {local}/\nInbox {local}/INBOX\n\n"
        "Channel bob\nFar :bob-remote:\nNear :bob-local:\nPatterns INBOX\n"
        "Sync Pull\nCreate Near\n"
    )
    (tmp_path / "pass").write_text(BOB.password + "\n")
    done = run_tool(["mbsync", "-c", str(rc), "bob"], tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    messages = [p for p in (local / "INBOX").glob("*/*") if p.is_file()]
    assert len(messages) == 1
    assert subject_line(dovecot_stores, BOB).decode() in messages[0].read_text().splitlines()


# --- a trusted webmail names its user's address ----------------------------------------------


@pytest.mark.usefixtures("imap_routes")
def test_a_trusted_webmail_claim_reaches_dovecot_as_the_users_address(
    auth_service: AuthService, dovecot_stores: DovecotStores, tmp_path: Path
) -> None:
    """Roundcube-style: the webmail (on trusted_networks) says x-originating-ip in its ID;
    Dovecot, which trusts mailgate, logs that address as the session's remote IP."""
    config = {
        "shutdown_timeout": 2,
        "auth_http": {"url": auth_service.url, "timeout": 5, "header": {AUTH_HEADER: AUTH_SECRET}},
        "backend": {"connect_timeout": 2, "login_timeout": 5, "forward_client": True},
        "throttle": {"enabled": False},
        "trusted_networks": ["127.0.0.0/8"],
    }
    listeners = {"imap": {"protocol": "imap", "tls": "none"}}
    with running_mailgate(tmp_path, listeners, config) as mg:
        imap = imaplib.IMAP4("127.0.0.1", mg.ports["imap"], timeout=CLIENT_TIMEOUT)
        imap.xatom("ID", '("name" "webmail" "x-originating-ip" "192.0.2.88")')
        imap.login(ALICE.login, ALICE.password)
        assert imap_subjects(imap) == [subject_line(dovecot_stores, ALICE)]
        imap.logout()
        found = mg.wait_for_sessions(lambda s: s.fields.get("user") == ALICE.login)
    assert found and found[0]["client"] == "192.0.2.88:0", found
    assert found[0]["via"] == "127.0.0.1", found
    deadline = time.monotonic() + CLIENT_TIMEOUT
    store_log = dovecot_stores.store1.log_path
    while "rip=192.0.2.88" not in store_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "Dovecot never logged the claimed address"
        time.sleep(0.05)
