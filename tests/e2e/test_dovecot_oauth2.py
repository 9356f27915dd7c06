"""Real Dovecot 2.3 validating tokens itself (oauth2 passdb, introspection_mode = local).

This is the backend side of `oauth_login = token`: it pins down the exact bytes a backend
login must send to pass a client's token on (IMAP `AUTHENTICATE XOAUTH2|OAUTHBEARER` with
SASL-IR, POP3 `AUTH ...`, SMTP `AUTH ...`), what Dovecot answers when it refuses a token
(an error challenge that wants the dummy response before the final NO), and that the
Dovecot configuration in docs/oauth.md works with keys and tokens from the test issuer.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import peers  # on sys.path through tests/e2e/conftest.py
import pytest

from oauth_issuer import Issuer

from .conftest import require

USER = "alice@example.com"
SUBJECT = "on the oauth2 store"


@dataclass
class Store:
    idp: Issuer
    peer: peers.Peer

    def port(self, name: str) -> int:
        return self.peer.ports[name]


def oauth2_conf(idp: Issuer, workdir: Path) -> Path:
    """dovecot-oauth2.conf.ext as docs/oauth.md gives it, and the key files it reads.

    Dovecot 2.3 does not fetch a JWKS: each public key is a PEM file named
    <azp>/<alg>/<kid> under the dict's prefix ("default" for a token without azp or kid).
    """
    keys = workdir / "oauth2-keys"
    for kty, alg in (("RSA", "RS256"), ("EC", "ES256")):
        kid = idp.current[kty]
        path = keys / "thunderbird" / alg / kid
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(idp.keys[kid].as_pem(private=False))
    conf = workdir / "dovecot-oauth2.conf.ext"
    conf.write_text(
        "introspection_mode = local\n"
        f"local_validation_key_dict = fs:posix:prefix={keys}/\n"
        "username_attribute = email\n"
        f"issuers = {idp.issuer}\n"
        f"openid_configuration_url = {idp.issuer}/.well-known/openid-configuration\n"
    )
    return conf


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    require("dovecot")
    workdir = tmp_path_factory.mktemp("dovecot-oauth2")
    with Issuer() as idp:
        port = peers.free_port
        peer = peers.start_dovecot(
            workdir, "oauth2store", imap_port=port(), pop3_port=port(),
            submission_port=port(), users={USER: "not-used-here"}, master=None,
            oauth2_conf=oauth2_conf(idp, workdir),
        )  # fmt: skip
        try:
            peers.deliver(peer, USER, SUBJECT)
            yield Store(idp, peer)
        finally:
            peer.stop()


class Wire:
    """A line-by-line client: what goes out is exactly what a backend login core writes."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline().rstrip(b"\r\n")

    def send(self, line: bytes) -> None:
        self.sock.sendall(line + b"\r\n")

    def until(self, prefix: bytes) -> bytes:
        while not (got := self.line()).startswith(prefix):
            assert got, "connection closed"
        return got

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def xoauth2(user: str, token: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer(user: str, token: str) -> bytes:
    return base64.b64encode(f"n,a={user},\x01auth=Bearer {token}\x01\x01".encode())


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_imap_authenticate_with_sasl_ir_reads_the_mailbox(
    store: Store, mech: str, alg: str
) -> None:
    token = store.idp.token(alg=alg, email=USER)
    response = (xoauth2 if mech == "XOAUTH2" else oauthbearer)(USER, token)
    imap = Wire(store.port("imap"))
    try:
        assert imap.line().startswith(b"* OK")
        imap.send(b"a1 AUTHENTICATE " + mech.encode() + b" " + response)
        assert imap.until(b"a1 ").startswith(b"a1 OK")
        imap.send(b"a2 STATUS INBOX (MESSAGES)")
        assert imap.until(b"* STATUS").endswith(b"(MESSAGES 1)")
    finally:
        imap.close()


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_a_refused_token_gets_a_challenge_then_no_after_the_dummy_response(
    store: Store, mech: str
) -> None:
    token = store.idp.expired(email=USER)
    response = (xoauth2 if mech == "XOAUTH2" else oauthbearer)(USER, token)
    imap = Wire(store.port("imap"))
    try:
        imap.line()
        imap.send(b"a1 AUTHENTICATE " + mech.encode() + b" " + response)
        challenge = imap.line()
        assert challenge.startswith(b"+ ")
        error = json.loads(base64.b64decode(challenge[2:]))
        expected = "401" if mech == "XOAUTH2" else "invalid_token"
        assert error["status"] == expected
        assert error["openid-configuration"].endswith("/.well-known/openid-configuration")
        imap.send(b"" if mech == "XOAUTH2" else b"AQ==")  # the dummy response
        assert imap.until(b"a1 ").startswith(b"a1 NO [AUTHENTICATIONFAILED]")
    finally:
        imap.close()


def test_oauthbearer_needs_the_authzid_in_dovecot_23(store: Store) -> None:
    """RFC 7628 makes a= optional; Dovecot 2.3 refuses a message without it, at once."""
    token = store.idp.token(email=USER)
    response = base64.b64encode(f"n,,\x01auth=Bearer {token}\x01\x01".encode())
    imap = Wire(store.port("imap"))
    try:
        imap.line()
        imap.send(b"a1 AUTHENTICATE OAUTHBEARER " + response)
        assert imap.until(b"a1 ").startswith(b"a1 NO")
    finally:
        imap.close()


def test_pop3_auth_xoauth2(store: Store) -> None:
    pop = Wire(store.port("pop3"))
    try:
        assert pop.line().startswith(b"+OK")
        pop.send(b"AUTH XOAUTH2 " + xoauth2(USER, store.idp.token(email=USER)))
        assert pop.line().startswith(b"+OK")
        pop.send(b"STAT")
        assert pop.line().startswith(b"+OK 1 ")
    finally:
        pop.close()


@pytest.mark.parametrize("mech", ["XOAUTH2", "OAUTHBEARER"])
def test_smtp_submission_takes_the_token_after_a_334_not_on_the_auth_line(
    store: Store, mech: str
) -> None:
    """Dovecot's submission-login caps AUTH's parameters at ~1 KiB (LOGIN_MAX_INBUF_SIZE),
    so a JWT does not fit as an initial response; a response line may be 8 KiB."""
    token = store.idp.token(email=USER, groups=[f"group-{n}" for n in range(10)])
    response = (xoauth2 if mech == "XOAUTH2" else oauthbearer)(USER, token)
    assert len(response) > 1100
    smtp = Wire(store.port("submission"))
    try:
        assert smtp.line().startswith(b"220")
        smtp.send(b"EHLO mailgate.test")
        auth = _ehlo(smtp)
        assert b"XOAUTH2" in auth and b"OAUTHBEARER" in auth
        smtp.send(b"AUTH " + mech.encode() + b" " + response)
        assert smtp.line() == b"500 5.5.2 Line too long"
        smtp.send(b"AUTH " + mech.encode())
        assert smtp.line() == b"334 "
        smtp.send(response)
        assert smtp.line().startswith(b"235 2.7.0")
    finally:
        smtp.close()


def test_pop3_and_imap_take_up_to_8_kib_of_base64(store: Store) -> None:
    """Dovecot 2.3's login processes read a SASL response into 8 KiB (LOGIN_MAX_AUTH_BUF_SIZE):
    a token passed on may be ~6 KiB at most, less than mailgate's own limit of 16 KiB."""
    padding = "x" * 6000  # an extra claim, as many group memberships make
    fits = xoauth2(USER, store.idp.token(email=USER, groups=padding[:3500]))
    too_long = xoauth2(USER, store.idp.token(email=USER, groups=padding))
    assert len(fits) < 8192 < len(too_long)
    pop = Wire(store.port("pop3"))
    try:
        pop.line()
        pop.send(b"AUTH XOAUTH2 " + fits)
        assert pop.line().startswith(b"+OK")
    finally:
        pop.close()
    pop = Wire(store.port("pop3"))
    try:
        pop.line()
        pop.send(b"AUTH XOAUTH2 " + too_long)
        answer = pop.line()
    except ConnectionResetError:
        answer = b""  # Dovecot may close before we have read its last words
    finally:
        pop.close()
    assert not answer.startswith(b"+OK"), answer


def _ehlo(smtp: Wire) -> bytes:
    """The AUTH line of a multi-line EHLO reply."""
    auth = b""
    while True:
        line = smtp.line()
        if line[4:].startswith(b"AUTH "):
            auth = line
        if line[3:4] == b" ":
            return auth
