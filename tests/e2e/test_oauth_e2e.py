"""OAuth logins and app passwords end to end: real clients, a real token issuer, real stores.

The mail world (module-scoped):
- the test issuer (tests/oauth_issuer.py): real keys, JWTs, JWKS, discovery, introspection;
- "mailstore": a Dovecot with Alice's mailbox, a master user, LMTP, and Postfix in front of
  it taking mail by XCLIENT (scripts/postfix.py): where OAuth logins arrive as user*master;
- "oauth2store": a Dovecot whose oauth2 passdb validates the tokens itself (Bob's mailbox),
  its submission service relaying to that Postfix: where the client's token is passed on.
Each store holds a message the other has not ("on the mailstore", "on the oauth2 store"), so
reading it through mailgate proves where the login landed and that it worked.

Alice and Bob have no usable password (`user set-oauth-only`): only a token logs them in.
mailgate runs as a real process in both auth modes: the built-in directory with [oauth], and
auth_http with a small auth service that decides on the token itself (JWKS and joserfc, as an
operator's service would). Clients: curl's --oauth2-bearer over imap, imaps, pop3s and smtps,
which picks OAUTHBEARER or XOAUTH2 from what is advertised (one listener each), and Python's
imaplib and smtplib with authenticate("XOAUTH2", ...).
"""

from __future__ import annotations

import base64
import contextlib
import imaplib
import json
import poplib
import re
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import peers  # on sys.path through tests/e2e/conftest.py
import postfix  # scripts/postfix.py, same path
import pytest
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from harness import FakeAuth, running_auth
from oauth_issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, Issuer

from .conftest import require
from .mailgate_proc import MailgateProcess, running_mailgate
from .test_directory_proxy import admin_here, write_config
from .test_dovecot_oauth2 import oauth2_conf

ALICE = "alice@example.com"  # on the mailstore: logs in there as alice*master
BOB = "bob@example.org"  # on the oauth2store: his token is passed on
SUBJECTS = {ALICE: "on the mailstore", BOB: "on the oauth2 store"}
CLIENT_TIMEOUT = 10.0
TOOL_TIMEOUT = 20.0
DELIVERY_WAIT = 20.0
SCOPE = "openid email"
MECHS = ["XOAUTH2", "OAUTHBEARER"]
# curl's exit codes: 67 login denied (the RFC 7628 flow ran to its end), 28 a timeout.
CURL_LOGIN_DENIED = 67


# --- the mail world -------------------------------------------------------------------------------


@dataclass
class World:
    idp: Issuer
    mailstore: peers.Peer  # imap, pop3, lmtp, auth
    postfix: peers.Peer  # smtp
    oauth2store: peers.Peer  # imap, pop3, submission
    cert: Any  # server_cert: cert, key, ca


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, server_cert: Any) -> Iterator[World]:
    require("dovecot", "postfix", postfix.POSTFIX_DAEMONS / "master", "curl")
    workdir = tmp_path_factory.mktemp("oauth-world")
    port = peers.free_port
    with contextlib.ExitStack() as stack, Issuer() as idp:
        lmtp, sasl = port(), port()
        unused = {ALICE: "unused-" + uuid.uuid4().hex}  # Alice never learns a password
        store = postfix.start_mailstore(imap_port=port(), pop3_port=port(), lmtp_port=lmtp,
                                        auth_port=sasl, users=unused)  # fmt: skip
        stack.callback(store.stop)
        mta = postfix.start_postfix(smtp_port=port(), lmtp_port=lmtp, users=[ALICE])
        stack.callback(mta.stop)
        oauth2 = peers.start_dovecot(
            workdir, "oauth2store", imap_port=port(), pop3_port=port(), submission_port=port(),
            users={BOB: "unused-" + uuid.uuid4().hex}, master=None,
            oauth2_conf=oauth2_conf(idp, workdir), submission_relay_port=mta.ports["smtp"],
        )  # fmt: skip
        stack.callback(oauth2.stop)
        peers.deliver(store, ALICE, SUBJECTS[ALICE])
        peers.deliver(oauth2, BOB, SUBJECTS[BOB])
        yield World(idp, store, mta, oauth2, server_cert)


def listeners() -> dict[str, dict[str, Any]]:
    """One listener per protocol and OAuth mechanism (so that curl has one choice), and
    password listeners for app passwords."""
    tables: dict[str, dict[str, Any]] = {}
    base = {"imap": ["login", "plain"], "pop3": ["user", "plain"], "smtp": ["plain", "login"]}
    for mech in ("xoauth2", "oauthbearer"):
        tables[f"imap-{mech}"] = {"protocol": "imap", "auth": [mech]}
        for protocol in ("imap", "pop3", "smtp"):
            tables[f"{protocol}s-{mech}"] = {"protocol": protocol, "tls": "implicit",
                                             "auth": [*base[protocol], mech]}  # fmt: skip
    for protocol, auth in base.items():
        tables[f"{protocol}s"] = {"protocol": protocol, "tls": "implicit", "auth": auth}
    return tables


def common_config(w: World) -> dict[str, Any]:
    return {
        "hostname": "mx.mailgate.test",
        "shutdown_timeout": 1.0,
        "tls": {"certificate": str(w.cert.cert), "certificate_key": str(w.cert.key)},
        "backend": {"connect_timeout": 5.0, "login_timeout": 10.0, "smtp_mode": "xclient"},
        "throttle": {"enabled": False},
    }


def oauth_table(w: World, **more: Any) -> dict[str, Any]:
    return {
        "issuer": w.idp.issuer,
        "audience": AUDIENCE,
        "introspection_url": w.idp.introspection_url,
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "timeout": 2.0,
        "scope": SCOPE,
        **more,
    }


def directory_config(w: World, db: Path, **more: Any) -> dict[str, Any]:
    return {
        **common_config(w),
        "directory": {"url": f"sqlite:///{db}", "cache_ttl": 0},
        "oauth": oauth_table(w),
        **more,
    }


def populate_directory(config: Path, w: World) -> None:
    """mailstore (master user, SMTP to Postfix by XCLIENT) for example.com, oauth2store
    (tokens passed on, SMTP to Dovecot's submission by AUTH) for example.org; Alice and Bob
    with random passwords they never learn, refused anyway (oauth-only)."""
    s, o = w.mailstore.ports, w.oauth2store.ports
    admin_here(config, "directory", "init")
    admin_here(config, "mailstore", "add", "mailstore", "--host", "127.0.0.1",
               "--imap-port", str(s["imap"]), "--pop3-port", str(s["pop3"]),
               "--smtp-port", str(w.postfix.ports["smtp"]), "--smtp-login", "xclient",
               "--master-user", peers.MASTER_USER, "--master-password-stdin",
               stdin=f"{peers.MASTER_PASSWORD}\n")  # fmt: skip
    admin_here(config, "mailstore", "add", "oauth2store", "--host", "127.0.0.1",
               "--imap-port", str(o["imap"]), "--pop3-port", str(o["pop3"]),
               "--smtp-port", str(o["submission"]), "--smtp-login", "auth",
               "--oauth-login", "token")  # fmt: skip
    admin_here(config, "domain", "add", "example.com", "--mailstore", "mailstore")
    admin_here(config, "domain", "add", "example.org", "--mailstore", "oauth2store")
    for user in (ALICE, BOB):
        admin_here(config, "user", "add", user, "--password-stdin",
                   stdin=f"never-{uuid.uuid4().hex}\n")  # fmt: skip
        admin_here(config, "user", "set-oauth-only", user, "on")


@pytest.fixture(scope="module")
def directory_mailgate(
    world: World, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailgateProcess]:
    workdir = tmp_path_factory.mktemp("oauth-directory")
    db = workdir / "directory.db"
    config = write_config(workdir, directory_config(world, db))
    populate_directory(config, world)
    with running_mailgate(workdir, listeners(), directory_config(world, db)) as mg:
        yield mg


# --- an auth_http service that decides on the token -----------------------------------------------


def token_service(w: World) -> Callable[[dict[str, str]], dict[str, str]]:
    """An operator's auth_http service for token logins: the JWT checked against the
    issuer's JWKS (fetched per request: a down IdP is a "try later"), Alice routed to the
    mailstore as alice*master (with Auth-Pass), Bob to the oauth2store with his own token
    (no Auth-Pass: mailgate passes the token on)."""
    routes = {
        ALICE: ({"imap": w.mailstore.ports["imap"], "pop3": w.mailstore.ports["pop3"],
                 "smtp": w.postfix.ports["smtp"]},
                {"Auth-User": f"{ALICE}*{peers.MASTER_USER}", "Auth-Pass": peers.MASTER_PASSWORD}),
        BOB: ({"imap": w.oauth2store.ports["imap"], "pop3": w.oauth2store.ports["pop3"],
               "smtp": w.oauth2store.ports["submission"]}, {"Auth-User": BOB}),
    }  # fmt: skip
    refused = {"Auth-Status": "Invalid token", "Auth-Wait": "0", "Auth-Error-Code": "535 5.7.8"}

    def answer(req: dict[str, str]) -> dict[str, str]:
        if req["Auth-Method"] not in ("xoauth2", "oauthbearer"):
            return refused
        try:
            with urllib.request.urlopen(w.idp.jwks_url, timeout=2) as got:
                keys = KeySet.import_key_set(json.load(got))
        except OSError:
            return {"Auth-Status": "WAIT", "Auth-Wait": "1"}  # the IdP is down: try later
        try:
            claims = jwt.decode(
                unquote(req["Auth-Pass"]), keys, algorithms=["RS256", "ES256"]
            ).claims
            jwt.JWTClaimsRegistry(
                iss={"essential": True, "value": w.idp.issuer},
                aud={"essential": True, "value": AUDIENCE},
                exp={"essential": True},
            ).validate(claims)
        except (JoseError, ValueError):
            return refused
        user, named = claims.get("email"), unquote(req.get("Auth-User", ""))
        if user not in routes or (named and named != user):
            return refused
        ports, login = routes[user]
        port = ports[req["Auth-Protocol"]]
        return {"Auth-Status": "OK", "Auth-Server": "127.0.0.1", "Auth-Port": str(port), **login}

    return answer


@pytest.fixture(scope="module")
def auth_service(world: World) -> Iterator[FakeAuth]:
    with running_auth(FakeAuth(token_service(world))) as service:
        yield service


@pytest.fixture(scope="module")
def http_mailgate(
    world: World, auth_service: FakeAuth, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MailgateProcess]:
    config = {
        **common_config(world),
        "auth_http": {"url": auth_service.url, "timeout": 5.0},
        "oauth": {"issuer": world.idp.issuer, "scope": SCOPE},  # the error challenge's words
    }
    workdir = tmp_path_factory.mktemp("oauth-auth-http")
    with running_mailgate(workdir, listeners(), config) as mg:
        yield mg


@pytest.fixture(params=["directory", "auth_http"])
def mailgate(request: pytest.FixtureRequest) -> MailgateProcess:
    name = "directory_mailgate" if request.param == "directory" else "http_mailgate"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def with_directory(mg: MailgateProcess) -> bool:
    return '\n["directory"]' in mg.config_path.read_text()  # as mailgate_proc writes TOML


def home_ports(w: World, user: str) -> set[int]:
    """The backend ports a session of `user` may land on: their store's (and its MTA's)."""
    if user == ALICE:
        return {w.mailstore.ports["imap"], w.mailstore.ports["pop3"], w.postfix.ports["smtp"]}
    return {w.oauth2store.ports[name] for name in ("imap", "pop3", "submission")}


# --- clients --------------------------------------------------------------------------------------


def curl(
    w: World, url: str, user: str, token: str, *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(TOOL_TIMEOUT)),
         "--cacert", str(w.cert.ca), "--oauth2-bearer", token, "--user", f"{user}:",
         *extra, url],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT + 5, check=False,
    )  # fmt: skip


def xoauth2(user: str, token: str) -> bytes:
    return f"user={user}\x01auth=Bearer {token}\x01\x01".encode()


def message(sender: str, rcpt: str, subject: str) -> str:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, rcpt, subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@mailgate.test>"
    msg.set_content("sent through mailgate with a token\n")
    return msg.as_string().replace("\n", "\r\n")


def imap_subjects(mg: MailgateProcess, user: str, token: str, wanted: str = "") -> list[str]:
    """The subjects in the user's INBOX, read with imaplib's AUTHENTICATE XOAUTH2; waits for
    `wanted` to arrive when given (a delivery through Postfix takes a moment)."""
    imap = imaplib.IMAP4("127.0.0.1", mg.ports["imap-xoauth2"], timeout=CLIENT_TIMEOUT)
    try:
        imap.authenticate("XOAUTH2", lambda _: xoauth2(user, token))
        deadline = time.monotonic() + DELIVERY_WAIT
        while True:
            imap.select("INBOX", readonly=True)
            _, data = imap.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
            subjects = [
                part[1].decode().partition(":")[2].strip()
                for part in data
                if isinstance(part, tuple)
            ]
            if not wanted or wanted in subjects or time.monotonic() > deadline:
                return subjects
            time.sleep(0.2)
    finally:
        imap.logout()


# --- a user with only a token reads and sends mail ------------------------------------------------


@pytest.mark.parametrize("user", [ALICE, BOB], ids=["master-user", "token-passed-on"])
@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("scheme", ["imap", "imaps", "pop3s"])
def test_curl_reads_the_users_message_with_only_a_token(
    world: World, mailgate: MailgateProcess, scheme: str, mech: str, user: str
) -> None:
    listener = f"{scheme}-{mech.lower()}"
    path = "/1" if scheme == "pop3s" else "/INBOX;UID=1"
    since = mailgate.log_size()
    done = curl(world, f"{scheme}://localhost:{mailgate.ports[listener]}{path}", user,
                world.idp.token(email=user), *(["--sasl-ir"] * (mech == "XOAUTH2")))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Subject: {SUBJECTS[user]}" in done.stdout.splitlines()
    line = mailgate.wait_for_sessions(lambda s: s["user"] == user, since=since)
    assert line, mailgate.log_tail()
    assert int(line[0]["backend"].rpartition(":")[2]) in home_ports(world, user), line


@pytest.mark.parametrize("user", [ALICE, BOB], ids=["master-user", "token-passed-on"])
@pytest.mark.parametrize("mech", MECHS)
def test_curl_sends_over_smtps_with_only_a_token(
    world: World, mailgate: MailgateProcess, tmp_path: Path, mech: str, user: str
) -> None:
    subject = f"from {user} by {mech} {uuid.uuid4().hex}"
    body = tmp_path / "message.eml"
    body.write_text(message(user, ALICE, subject), newline="")
    port = mailgate.ports[f"smtps-{mech.lower()}"]
    done = curl(world, f"smtps://localhost:{port}/client.example", user,
                world.idp.token(email=user), "--mail-from", user, "--mail-rcpt", ALICE,
                "--upload-file", str(body))  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Alice reads it: it came through Postfix (and, from Bob, Dovecot's submission first).
    assert subject in imap_subjects(mailgate, ALICE, world.idp.token(email=ALICE), subject)


def test_imaplib_and_smtplib_log_in_with_xoauth2(world: World, mailgate: MailgateProcess) -> None:
    token = world.idp.token(email=BOB)
    assert SUBJECTS[BOB] in imap_subjects(mailgate, BOB, token)
    subject = f"smtplib {uuid.uuid4().hex}"
    context = ssl.create_default_context(cafile=str(world.cert.ca))
    port = mailgate.ports["smtps-xoauth2"]
    with smtplib.SMTP_SSL("localhost", port, context=context, timeout=CLIENT_TIMEOUT) as smtp:
        smtp.ehlo("client.example")
        code, _ = smtp.auth("XOAUTH2", lambda challenge=None: xoauth2(BOB, token).decode())
        assert code == 235
        smtp.sendmail(BOB, [ALICE], message(BOB, ALICE, subject))
    assert subject in imap_subjects(mailgate, ALICE, world.idp.token(email=ALICE), subject)


# --- refused tokens: the RFC 7628 failure flow ----------------------------------------------------


class Wire:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data + b"\r\n")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


BAD_TOKENS: dict[str, Callable[[Issuer], str]] = {
    "expired": lambda idp: idp.expired(email=ALICE),
    "wrong audience": lambda idp: idp.wrong_audience(email=ALICE),
    "alg none": lambda idp: idp.alg_none(email=ALICE),
    "tampered": lambda idp: idp.tampered(email=ALICE),
    "another user's": lambda idp: idp.token(email=BOB),
}


@pytest.mark.parametrize("kind", list(BAD_TOKENS))
def test_a_bad_token_gets_the_error_challenge_then_the_failure(
    world: World, mailgate: MailgateProcess, kind: str
) -> None:
    token = BAD_TOKENS[kind](world.idp)
    imap = Wire(mailgate.ports["imap-oauthbearer"])
    try:
        assert imap.line().startswith(b"* OK")
        blob = base64.b64encode(f"n,a={ALICE},\x01auth=Bearer {token}\x01\x01".encode())
        imap.send(b"a AUTHENTICATE OAUTHBEARER " + blob)
        challenge = imap.line()
        assert challenge.startswith(b"+ "), challenge
        error = json.loads(base64.b64decode(challenge[2:]))
        assert error["status"] == "invalid_token" and error["scope"] == SCOPE
        assert (
            error["openid-configuration"] == world.idp.issuer + "/.well-known/openid-configuration"
        )
        imap.send(b"AQ==")  # RFC 7628 3.2.3's dummy response
        text = b"Authentication failed." if with_directory(mailgate) else b"Invalid token"
        assert imap.line() == b"a NO [AUTHENTICATIONFAILED] " + text
    finally:
        imap.close()


@pytest.mark.parametrize("kind", ["expired", "tampered"])
def test_real_clients_are_told_no_after_the_challenge(
    world: World, mailgate: MailgateProcess, kind: str
) -> None:
    token = BAD_TOKENS[kind](world.idp)
    imap = imaplib.IMAP4("127.0.0.1", mailgate.ports["imap-xoauth2"], timeout=CLIENT_TIMEOUT)
    try:
        answers = iter([xoauth2(ALICE, token), b""])  # the message, then the empty dummy
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.authenticate("XOAUTH2", lambda _: next(answers))
    finally:
        imap.shutdown()
    for mech in MECHS:  # curl answers the challenge too, and says "login denied", not timeout
        port = mailgate.ports[f"pop3s-{mech.lower()}"]
        done = curl(world, f"pop3s://localhost:{port}/1", ALICE, token)
        assert done.returncode == CURL_LOGIN_DENIED, (done.returncode, done.stderr)


def test_dovecot_refusing_a_passed_on_token_reaches_the_client_as_its_refusal(
    world: World, directory_mailgate: MailgateProcess
) -> None:
    """The directory accepts Bob's token (valid for mailgate's audience and issuer); Dovecot's
    oauth2 passdb has keys only for tokens issued to "thunderbird" (its key files are named
    <azp>/<alg>/<kid>), and this one was issued to another client: the backend's own refusal
    comes back to the client as the RFC 7628 flow, not as "try later"."""
    token = world.idp.token(email=BOB, azp="roundcube")
    since = directory_mailgate.log_size()
    imap = Wire(directory_mailgate.ports["imap-xoauth2"])
    try:
        assert imap.line().startswith(b"* OK")
        imap.send(b"a AUTHENTICATE XOAUTH2 " + base64.b64encode(xoauth2(BOB, token)))
        challenge = imap.line()
        assert challenge.startswith(b"+ "), challenge
        assert json.loads(base64.b64decode(challenge[2:]))["status"]  # Dovecot's own JSON
        imap.send(b"")
        assert imap.line().startswith(b"a NO [AUTHENTICATIONFAILED]")
    finally:
        imap.close()
    assert "backend login failed" in directory_mailgate.log_text()[since:]
    assert token not in directory_mailgate.log_text()


# --- the IdP down: a temporary failure, never a bad password --------------------------------------


def test_idp_down_is_a_temporary_failure(world: World, mailgate: MailgateProcess) -> None:
    # An opaque token needs introspection; the auth service fetches the JWKS each time.
    token = world.idp.opaque_token(email=ALICE, username=ALICE)
    jwt_token = world.idp.token(email=ALICE)
    directory = with_directory(mailgate)
    world.idp.mode = "down"
    try:
        imap = Wire(mailgate.ports["imap-xoauth2"])
        try:
            assert imap.line().startswith(b"* OK")
            used = token if directory else jwt_token
            imap.send(b"a AUTHENTICATE XOAUTH2 " + base64.b64encode(xoauth2(ALICE, used)))
            reply = imap.line()
            assert reply.startswith(b"a NO [UNAVAILABLE]"), reply  # no challenge, no "bad"
        finally:
            imap.close()
        pop3 = poplib.POP3_SSL(
            "localhost", mailgate.ports["pop3s-xoauth2"],
            context=ssl.create_default_context(cafile=str(world.cert.ca)), timeout=CLIENT_TIMEOUT,
        )  # fmt: skip
        try:
            used = token if directory else jwt_token
            blob = base64.b64encode(xoauth2(ALICE, used)).decode()
            with pytest.raises(poplib.error_proto, match=r"SYS/TEMP"):
                pop3._shortcmd(f"AUTH XOAUTH2 {blob}")
        finally:
            pop3.close()
    finally:
        world.idp.mode = "ok"


def test_a_directory_that_never_reached_its_idp_answers_try_later(
    world: World, tmp_path: Path
) -> None:
    """No key was ever fetched (the IdP was down from the start): every JWT is a temporary
    failure, and over SMTP the 454 of RFC 4954, with no challenge."""
    db = tmp_path / "directory.db"
    config = write_config(tmp_path, directory_config(world, db))
    populate_directory(config, world)
    dead = f"http://127.0.0.1:{peers.free_port()}/certs"  # nothing listens there
    settings = directory_config(world, db, oauth=oauth_table(world, jwks_url=dead))
    with running_mailgate(tmp_path, {"smtps": {"protocol": "smtp", "tls": "implicit",
                                               "auth": ["xoauth2"]}}, settings) as mg:  # fmt: skip
        context = ssl.create_default_context(cafile=str(world.cert.ca))
        with smtplib.SMTP_SSL("localhost", mg.ports["smtps"], context=context,
                              timeout=CLIENT_TIMEOUT) as smtp:  # fmt: skip
            smtp.ehlo("client.example")
            token = world.idp.token(email=ALICE)
            with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                smtp.auth("XOAUTH2", lambda challenge=None: xoauth2(ALICE, token).decode())
            assert refused.value.smtp_code == 454


# --- app passwords --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app_passwords(world: World, directory_mailgate: MailgateProcess) -> dict[str, str]:
    """Alice's app passwords: "phone" for IMAP and SMTP, "laptop" for POP3 (expired)."""
    config = directory_mailgate.config_path
    made = {}
    for label, protocols in (("phone", "imap,smtp"), ("laptop", "pop3")):
        out = admin_here(config, "user", "app-password", "add", ALICE, "--label", label,
                         "--protocols", protocols)  # fmt: skip
        made[label] = re.search(r"\b([a-z2-9]{4}(?:-[a-z2-9]{4}){4})\b", out).group(1)  # type: ignore[union-attr]
    db = re.search(r'sqlite:///([^"]+)', config.read_text()).group(1)  # type: ignore[union-attr]
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE app_passwords SET expires_at = '2020-01-01 00:00:00'"
                     " WHERE label = 'laptop'")  # fmt: skip
    return made


def test_an_app_password_logs_in_where_allowed_only_and_the_log_names_it(
    world: World, directory_mailgate: MailgateProcess, app_passwords: dict[str, str]
) -> None:
    mg, phone = directory_mailgate, app_passwords["phone"]
    since = mg.log_size()
    done = subprocess.run(
        ["curl", "--silent", "--show-error", "--max-time", str(int(TOOL_TIMEOUT)),
         "--cacert", str(world.cert.ca), "-u", f"{ALICE}:{phone}",
         f"imaps://localhost:{mg.ports['imaps']}/INBOX;UID=1"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT + 5, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Subject: {SUBJECTS[ALICE]}" in done.stdout.splitlines()
    context = ssl.create_default_context(cafile=str(world.cert.ca))
    imap = imaplib.IMAP4_SSL("localhost", mg.ports["imaps"], ssl_context=context,
                             timeout=CLIENT_TIMEOUT)  # fmt: skip
    assert imap.login(ALICE, phone)[0] == "OK"
    imap.logout()
    with smtplib.SMTP_SSL("localhost", mg.ports["smtps"], context=context,
                          timeout=CLIENT_TIMEOUT) as smtp:  # fmt: skip
        assert smtp.login(ALICE, phone)[0] == 235
    pop3 = poplib.POP3_SSL("localhost", mg.ports["pop3s"], context=context,
                           timeout=CLIENT_TIMEOUT)  # fmt: skip
    try:
        pop3.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):  # not for POP3
            pop3.pass_(phone)
    finally:
        pop3.close()
    lines = mg.wait_for_sessions(lambda s: s.fields.get("app_password") == "phone", since=since)
    assert len(lines) >= 3, lines  # curl, imaplib, smtplib
    assert all(s["user"] == ALICE for s in lines)
    log = mg.log_text()
    for secret in app_passwords.values():
        assert secret not in log and secret.replace("-", "") not in log


def test_an_expired_app_password_and_the_main_password_are_refused(
    world: World, directory_mailgate: MailgateProcess, app_passwords: dict[str, str]
) -> None:
    mg = directory_mailgate
    context = ssl.create_default_context(cafile=str(world.cert.ca))
    pop3 = poplib.POP3_SSL("localhost", mg.ports["pop3s"], context=context,
                           timeout=CLIENT_TIMEOUT)  # fmt: skip
    try:
        pop3.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            pop3.pass_(app_passwords["laptop"])  # for POP3, but expired
    finally:
        pop3.close()
    done = subprocess.run(
        ["curl", "--silent", "--max-time", str(int(TOOL_TIMEOUT)), "--cacert", str(world.cert.ca),
         "-u", f"{ALICE}:{app_passwords['laptop']}", f"pop3s://localhost:{mg.ports['pop3s']}/1"],
        capture_output=True, text=True, timeout=TOOL_TIMEOUT + 5, check=False,
    )  # fmt: skip
    assert done.returncode == CURL_LOGIN_DENIED, done.stderr


# --- the throttle counts OAuth failures like wrong passwords --------------------------------------


def test_oauth_failures_go_through_the_throttle(world: World, tmp_path: Path) -> None:
    """Three refused tokens from one address lock it out (lockout_after = 2): then even a
    good token is refused, as a good password would be."""
    db = tmp_path / "directory.db"
    config = write_config(tmp_path, directory_config(world, db))
    populate_directory(config, world)
    throttle = {"enabled": True, "free": 1000, "lockout_after": 2, "lockout": 300.0}
    settings = directory_config(world, db, throttle=throttle)
    with running_mailgate(tmp_path, {"imap": {"protocol": "imap", "auth": ["xoauth2"]}},
                          settings) as mg:  # fmt: skip

        def login(token: str) -> bytes:
            imap = Wire(mg.ports["imap"])
            try:
                imap.line()
                imap.send(b"a AUTHENTICATE XOAUTH2 " + base64.b64encode(xoauth2(ALICE, token)))
                reply = imap.line()
                if reply.startswith(b"+ "):
                    imap.send(b"")
                    reply = imap.line()
                return reply
            finally:
                imap.close()

        assert login(world.idp.token(email=ALICE)).startswith(b"a OK")  # not locked yet
        for _ in range(3):
            assert login(world.idp.expired(email=ALICE)).startswith(b"a NO [AUTHENTICATIONFAILED]")
        assert login(world.idp.token(email=ALICE)).startswith(b"a NO [AUTHENTICATIONFAILED]")
