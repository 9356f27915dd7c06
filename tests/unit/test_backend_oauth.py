"""Token routes in the backend login cores: the client's bearer token passed on with
AUTHENTICATE / AUTH XOAUTH2 or OAUTHBEARER, for the backend to validate (Dovecot's oauth2
passdb), and its refusal: the backend's error challenge, our dummy response, the NO / -ERR /
535, which is the client's answer too (the RFC 7628 failure flow, not "try again later").

The wire is what Dovecot 2.3.19 sends and accepts (tests/e2e/test_dovecot_oauth2.py checks it
against the real one). Each transcript is fed three ways, as in the other backend tests:
each backend turn whole, one byte at a time, and with extra bytes after the last line.
"""

from __future__ import annotations

import base64
import json
import ssl

import backend_script
import pytest

from mailgate.backend.connect import BackendOptions, make_core
from mailgate.backend.imap import ImapLogin
from mailgate.backend.pop3 import Pop3Login
from mailgate.backend.smtp import SmtpLogin
from mailgate.protocols.events import BackendFailed, BackendReady, Rejected
from mailgate.protocols.sasl import error_challenge
from mailgate.values import (
    BackendAuth,
    BackendTLS,
    ClientInfo,
    Credentials,
    Method,
    Route,
    Secret,
)

MODES = ["whole", "bytes", "trailing"]
USER = "alice@example.com"
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9." + "s" * 3000
XOAUTH2 = base64.b64encode(f"user={USER}\x01auth=Bearer {TOKEN}\x01\x01".encode())
OAUTHBEARER = base64.b64encode(f"n,a={USER},\x01auth=Bearer {TOKEN}\x01\x01".encode())
BLOBS = {"xoauth2": XOAUTH2, "oauthbearer": OAUTHBEARER}
DUMMY = {"xoauth2": b"\r\n", "oauthbearer": b"AQ==\r\n"}
# Dovecot 2.3's refusal of an expired token, as its oauth2 passdb words it.
DOVECOT_ERROR = b'{"status":"invalid_token","schemes":"bearer","scope":"mail"}'
DOVECOT_CHALLENGE = base64.b64encode(DOVECOT_ERROR)
MECHS = ["xoauth2", "oauthbearer"]


def run(core, script, mode, extra):
    return backend_script.run(core, script, mode, extra)


def ready(core, script, mode, extra, reply):
    final, leftover = run(core, script, mode, extra)
    assert isinstance(final, BackendReady), final
    assert final.reply == reply
    expected = extra if mode == "trailing" and script[-1][0] == "S" else b""
    assert final.trailing + leftover == expected
    return final


def refused(core, script, mode, extra, *, temporary=False):
    final, _ = run(core, script, mode, extra)
    assert isinstance(final, BackendFailed), final
    assert final.temporary is temporary
    assert TOKEN not in final.detail and TOKEN[:40] not in final.detail
    return final


# --- IMAP ------------------------------------------------------------------------------------

IMAP_EXTRA = b"* 1 EXISTS\r\n"
IMAP_GREET_IR = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2 AUTH=OAUTHBEARER] ready\r\n"
IMAP_GREET = b"* OK [CAPABILITY IMAP4rev1 AUTH=XOAUTH2 AUTH=OAUTHBEARER] ready\r\n"
IMAP_OK = b"mg3 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"
IMAP_NO = b"mg3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"


def imap(mech: str, user: str = USER) -> ImapLogin:
    return ImapLogin(user, Secret(TOKEN), mechanism=mech)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_imap_token_with_sasl_ir_is_one_command(mode: str, mech: str) -> None:
    verb = b"mg3 AUTHENTICATE " + mech.upper().encode()
    script = [("S", IMAP_GREET_IR), ("C", verb + b" " + BLOBS[mech] + b"\r\n"), ("S", IMAP_OK)]
    ready(imap(mech), script, mode, IMAP_EXTRA, IMAP_OK[4:-2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_imap_token_without_sasl_ir_waits_for_the_continuation(mode: str, mech: str) -> None:
    verb = b"mg3 AUTHENTICATE " + mech.upper().encode()
    script = [
        ("S", IMAP_GREET),
        ("C", verb + b"\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOBS[mech] + b"\r\n"),
        ("S", IMAP_OK),
    ]
    ready(imap(mech), script, mode, IMAP_EXTRA, IMAP_OK[4:-2])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_imap_refused_token_answers_the_challenge_and_passes_the_refusal_on(
    mode: str, mech: str
) -> None:
    script = [
        ("S", IMAP_GREET_IR),
        ("C", b"mg3 AUTHENTICATE " + mech.upper().encode() + b" " + BLOBS[mech] + b"\r\n"),
        ("S", b"+ " + DOVECOT_CHALLENGE + b"\r\n"),
        ("C", DUMMY[mech]),  # else Dovecot waits and the login hangs
        ("S", IMAP_NO),
    ]
    final = refused(imap(mech), script, mode, IMAP_EXTRA)
    assert final.client_reply == Rejected("Authentication failed.", challenge=DOVECOT_ERROR)


@pytest.mark.parametrize("mode", MODES)
def test_imap_temporary_refusal_of_a_token_is_temporary(mode: str) -> None:
    script = [
        ("S", IMAP_GREET_IR),
        ("C", b"mg3 AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n"),
        ("S", b"mg3 NO [UNAVAILABLE] Temporary authentication failure\r\n"),
    ]
    assert refused(imap("xoauth2"), script, mode, IMAP_EXTRA, temporary=True).client_reply is None


@pytest.mark.parametrize("mode", MODES)
def test_imap_no_without_a_challenge_still_gets_the_client_one(mode: str) -> None:
    script = [
        ("S", IMAP_GREET_IR),
        ("C", b"mg3 AUTHENTICATE OAUTHBEARER " + OAUTHBEARER + b"\r\n"),
        ("S", IMAP_NO),
    ]
    final = refused(imap("oauthbearer"), script, mode, IMAP_EXTRA)
    assert final.client_reply is not None
    assert final.client_reply.challenge == error_challenge(Method.OAUTHBEARER)


@pytest.mark.parametrize("mode", MODES)
def test_imap_a_strange_backend_challenge_is_replaced_by_ours(mode: str) -> None:
    strange = base64.b64encode(b"<html>" + b"x" * 5000)
    script = [
        ("S", IMAP_GREET_IR),
        ("C", b"mg3 AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n"),
        ("S", b"+ " + strange + b"\r\n"),
        ("C", b"\r\n"),
        ("S", IMAP_NO),
    ]
    final = refused(imap("xoauth2"), script, mode, IMAP_EXTRA)
    assert final.client_reply is not None
    assert final.client_reply.challenge == error_challenge(Method.XOAUTH2)


@pytest.mark.parametrize("mode", MODES)
def test_imap_a_backend_without_the_mechanism_is_a_temporary_failure(mode: str) -> None:
    greet = b"* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=PLAIN] ready\r\n"
    final = refused(imap("xoauth2"), [("S", greet)], mode, IMAP_EXTRA, temporary=True)
    assert "AUTH=XOAUTH2" in final.detail


@pytest.mark.parametrize("mode", MODES)
def test_imap_a_backend_that_lists_no_mechanisms_is_tried(mode: str) -> None:
    script = [
        ("S", b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n"),
        ("C", b"mg3 AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n"),
        ("S", IMAP_OK),
    ]
    ready(imap("xoauth2"), script, mode, IMAP_EXTRA, IMAP_OK[4:-2])


@pytest.mark.parametrize("mode", MODES)
def test_imap_a_bad_that_echoes_the_token_is_masked(mode: str) -> None:
    script = [
        ("S", IMAP_GREET_IR),
        ("C", b"mg3 AUTHENTICATE XOAUTH2 " + XOAUTH2 + b"\r\n"),
        ("S", b"mg3 BAD Error in " + XOAUTH2 + b" and " + TOKEN.encode() + b"\r\n"),
    ]
    final = refused(imap("xoauth2"), script, mode, IMAP_EXTRA, temporary=True)
    assert XOAUTH2.decode()[:40] not in final.detail
    assert "***" in final.detail


def test_oauthbearer_escapes_comma_and_equals_in_the_authzid() -> None:
    core = ImapLogin("a,b=c@example.com", Secret("tok"), mechanism="oauthbearer")
    sent = core.receive(IMAP_GREET_IR)[0]
    blob = sent.data.split(b" ")[-1].strip()  # type: ignore[union-attr]
    assert base64.b64decode(blob) == b"n,a=a=2Cb=3Dc@example.com,\x01auth=Bearer tok\x01\x01"


@pytest.mark.parametrize("token", ["two words", "a\x01b", "line\r\nbreak"])
def test_a_token_that_cannot_be_framed_is_not_sent(token: str) -> None:
    events = ImapLogin(USER, Secret(token), mechanism="xoauth2").receive(IMAP_GREET_IR)
    assert len(events) == 1 and isinstance(events[0], BackendFailed)
    assert "not sent" in events[0].detail


# --- POP3 ------------------------------------------------------------------------------------

POP3_EXTRA = b"+OK 2 messages\r\n"
POP3_GREET = b"+OK Dovecot ready.\r\n"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_pop3_token_goes_after_the_continuation(mode: str, mech: str) -> None:
    script = [
        ("S", POP3_GREET),
        ("C", b"AUTH " + mech.upper().encode() + b"\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOBS[mech] + b"\r\n"),
        ("S", b"+OK Logged in.\r\n"),
    ]
    ready(Pop3Login(USER, Secret(TOKEN), mechanism=mech), script, mode, POP3_EXTRA,
          b"+OK Logged in.")  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_pop3_refused_token_answers_the_challenge_and_passes_the_refusal_on(
    mode: str, mech: str
) -> None:
    script = [
        ("S", POP3_GREET),
        ("C", b"AUTH " + mech.upper().encode() + b"\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOBS[mech] + b"\r\n"),
        ("S", b"+ " + DOVECOT_CHALLENGE + b"\r\n"),
        ("C", DUMMY[mech]),
        ("S", b"-ERR [AUTH] Authentication failed.\r\n"),
    ]
    final = refused(Pop3Login(USER, Secret(TOKEN), mechanism=mech), script, mode, POP3_EXTRA)
    assert final.client_reply == Rejected("Authentication failed.", challenge=DOVECOT_ERROR)


@pytest.mark.parametrize("mode", MODES)
def test_pop3_sys_temp_is_temporary_for_a_token_too(mode: str) -> None:
    script = [
        ("S", POP3_GREET),
        ("C", b"AUTH XOAUTH2\r\n"),
        ("S", b"+ \r\n"),
        ("C", XOAUTH2 + b"\r\n"),
        ("S", b"-ERR [SYS/TEMP] Temporary authentication failure.\r\n"),
    ]
    final = refused(Pop3Login(USER, Secret(TOKEN), mechanism="xoauth2"), script, mode,
                    POP3_EXTRA, temporary=True)  # fmt: skip
    assert final.client_reply is None


@pytest.mark.parametrize("mode", MODES)
def test_pop3_ok_after_a_refusal_is_not_trusted(mode: str) -> None:
    script = [
        ("S", POP3_GREET),
        ("C", b"AUTH XOAUTH2\r\n"),
        ("S", b"+ \r\n"),
        ("C", XOAUTH2 + b"\r\n"),
        ("S", b"+ " + DOVECOT_CHALLENGE + b"\r\n"),
        ("C", b"\r\n"),
        ("S", b"+OK Logged in.\r\n"),
    ]
    refused(Pop3Login(USER, Secret(TOKEN), mechanism="xoauth2"), script, mode, POP3_EXTRA,
            temporary=True)  # fmt: skip


# --- SMTP ------------------------------------------------------------------------------------

SMTP_EXTRA = b"250 stray\r\n"
SMTP_GREET = b"220 backend.example ESMTP Dovecot\r\n"
SMTP_EHLO = b"250-backend.example\r\n250-AUTH PLAIN XOAUTH2 OAUTHBEARER\r\n250 8BITMIME\r\n"


def smtp(mech: str) -> SmtpLogin:
    return SmtpLogin(
        helo_name="proxy.example",
        user=USER,
        secret=Secret(TOKEN),
        mode="auth",
        starttls=False,
        forward=None,
        client_helo="c",
        token_mechanism=mech,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_smtp_token_never_rides_on_the_auth_line(mode: str, mech: str) -> None:
    script = [
        ("S", SMTP_GREET),
        ("C", b"EHLO proxy.example\r\n"),
        ("S", SMTP_EHLO),
        ("C", b"AUTH " + mech.upper().encode() + b"\r\n"),  # Dovecot's limit there: ~1 KiB
        ("S", b"334 \r\n"),
        ("C", BLOBS[mech] + b"\r\n"),
        ("S", b"235 2.7.0 Logged in.\r\n"),
    ]
    ready(smtp(mech), script, mode, SMTP_EXTRA, b"235 2.7.0 Logged in.")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("mech", MECHS)
def test_smtp_refused_token_answers_the_challenge_and_passes_the_refusal_on(
    mode: str, mech: str
) -> None:
    script = [
        ("S", SMTP_GREET),
        ("C", b"EHLO proxy.example\r\n"),
        ("S", SMTP_EHLO),
        ("C", b"AUTH " + mech.upper().encode() + b"\r\n"),
        ("S", b"334 \r\n"),
        ("C", BLOBS[mech] + b"\r\n"),
        ("S", b"334 " + DOVECOT_CHALLENGE + b"\r\n"),
        ("C", DUMMY[mech]),
        ("S", b"535 5.7.8 Authentication failed\r\n"),
    ]
    final = refused(smtp(mech), script, mode, SMTP_EXTRA)
    assert final.client_reply == Rejected("Authentication failed.", challenge=DOVECOT_ERROR)


@pytest.mark.parametrize("mode", MODES)
def test_smtp_backend_without_the_mechanism_is_temporary(mode: str) -> None:
    ehlo = b"250-backend.example\r\n250 AUTH PLAIN\r\n"
    script = [("S", SMTP_GREET), ("C", b"EHLO proxy.example\r\n"), ("S", ehlo)]
    final = refused(smtp("oauthbearer"), script, mode, SMTP_EXTRA, temporary=True)
    assert "AUTH OAUTHBEARER" in final.detail


def test_smtp_a_token_with_another_mode_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="mode must be 'auth'"):
        SmtpLogin(
            helo_name="p",
            user=USER,
            secret=Secret(TOKEN),
            mode="xclient",
            starttls=False,
            forward=None,
            client_helo=None,
            token_mechanism="xoauth2",
        )


# --- which core a route gets ------------------------------------------------------------------

OPTIONS = BackendOptions(
    tls=BackendTLS.NONE,
    tls_context=ssl.create_default_context(),
    server_name=None,
    forward_client=False,
    imap_auth="login",
    pop3_auth="user",
    smtp_mode="xclient",
    helo_name="proxy.example",
    connect_timeout=1.0,
    login_timeout=1.0,
)
CLIENT = ClientInfo("192.0.2.7", 50000, "imap")
CREDS = Credentials(Method.XOAUTH2, USER, Secret(TOKEN))


@pytest.mark.parametrize("how", [BackendAuth.XOAUTH2, BackendAuth.OAUTHBEARER])
def test_a_token_route_logs_in_with_its_mechanism_in_every_protocol(how: BackendAuth) -> None:
    route = Route("10.0.0.5", 143, USER, Secret(TOKEN), backend_auth=how)
    imap_core = make_core("imap", route, OPTIONS, CLIENT, CREDS)
    assert b"AUTHENTICATE " + how.value.upper().encode() in imap_core.receive(IMAP_GREET_IR)[0].data  # type: ignore[union-attr]
    pop3_core = make_core("pop3", route, OPTIONS, CLIENT, CREDS)
    assert pop3_core.receive(POP3_GREET)[0].data == b"AUTH " + how.value.upper().encode() + b"\r\n"  # type: ignore[union-attr]
    smtp_core = make_core("smtp", route, OPTIONS, CLIENT, CREDS)  # smtp_mode xclient: still AUTH
    smtp_core.receive(SMTP_GREET)
    assert smtp_core.receive(SMTP_EHLO)[0].data == b"AUTH " + how.value.upper().encode() + b"\r\n"  # type: ignore[union-attr]


def test_a_master_route_logs_in_with_the_password_login() -> None:
    route = Route("10.0.0.5", 143, USER + "*proxy", Secret("master-pw"),
                  backend_auth=BackendAuth.MASTER)  # fmt: skip
    core = make_core("imap", route, OPTIONS, CLIENT, CREDS)
    assert core.receive(IMAP_GREET_IR)[0].data == (  # type: ignore[union-attr]
        b'mg3 LOGIN "alice@example.com*proxy" "master-pw"\r\n'
    )


def test_the_error_json_dovecot_sends_is_what_we_pass_on() -> None:
    assert json.loads(DOVECOT_ERROR)["status"] == "invalid_token"
