"""XOAUTH2 and OAUTHBEARER in the IMAP, POP3 and SMTP cores, bytes in and events out.

The same scenarios in each protocol's words: what is advertised (and hidden before TLS on a
`starttls_only` listener), a token as long as `max_token` on the command line and as a SASL
response line (so the line limit takes it, even where the protocol's own is shorter), and the
RFC 7628 failure flow: on a refusal that carries an error challenge, the challenge, the
client's one dummy response (whatever it is: ^A, an empty line, "*"), then the failure reply,
counted as one failed login. Every exchange is fed whole, one byte at a time and with an
unfinished line after it, and bytes pipelined behind a successful login are kept.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from feeding import WAYS, chunks

from mailgate.protocols.core import PreAuthCore, State
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    LoginOutcome,
    Rejected,
    Send,
    Unavailable,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import MAX_TOKEN, error_challenge, max_oauth_response
from mailgate.protocols.spec import SPECS
from mailgate.values import CloseReason, Credentials, Method

OAUTH = ("xoauth2", "oauthbearer")
POLICY = PreAuthPolicy(
    mechanisms=(),
    capabilities=(),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="ready",
    hostname="mx.example",
)
USER = "alice@example.com"
CHALLENGE = error_challenge(Method.OAUTHBEARER, scope="mail", openid_configuration="https://i/x")


def token(size: int) -> str:
    """A JWT-shaped token of exactly `size` bytes (RFC 6750 b64token characters)."""
    body = base64.urlsafe_b64encode(secrets.token_bytes(size)).decode().rstrip("=")
    return ("eyJhbGciOiJSUzI1NiJ9." + body)[:size]


def xoauth2(user: str, tok: str) -> bytes:
    return base64.b64encode(f"user={user}\x01auth=Bearer {tok}\x01\x01".encode())


def oauthbearer(user: str, tok: str) -> bytes:
    authzid = f"a={user}" if user else ""
    return base64.b64encode(f"n,{authzid},\x01host=mx\x01auth=Bearer {tok}\x01\x01".encode())


RESPONSES: dict[str, Callable[[str, str], bytes]] = {"XOAUTH2": xoauth2, "OAUTHBEARER": oauthbearer}
METHODS = {"XOAUTH2": Method.XOAUTH2, "OAUTHBEARER": Method.OAUTHBEARER}
DUMMIES = {"XOAUTH2": b"", "OAUTHBEARER": b"AQ=="}  # what curl and Thunderbird send


@dataclass(frozen=True)
class Words:
    name: str
    hello: bytes  # said before AUTH (SMTP: EHLO), its reply not checked here
    capability: bytes  # the command that lists the mechanisms
    advertised: Callable[[list[str]], bytes]  # what that lists for these mechanisms
    auth: Callable[[str, bytes | None], bytes]  # the command, with or without a response
    challenge: bytes  # the continuation prefix: "+ " or "334 "
    success: bytes  # our reply to LoggedIn(b"OK Logged in")
    failure: bytes  # our reply to Rejected("Authentication failed.")
    temporary: bytes  # ... to Unavailable()
    too_long: bytes  # fatal reply to a line over the limit
    bad_sasl: bytes  # reply to a malformed client response


def _imap_auth(mech: str, response: bytes | None) -> bytes:
    return b"a AUTHENTICATE " + mech.encode() + (b" " + response if response else b"") + b"\r\n"


def _auth(mech: str, response: bytes | None) -> bytes:
    return b"AUTH " + mech.encode() + (b" " + response if response else b"") + b"\r\n"


PROTOCOLS = [
    Words(
        "imap",
        b"",
        b"c CAPABILITY\r\n",
        lambda mechs: b" ".join(b"AUTH=" + m.encode() for m in mechs),
        _imap_auth,
        b"+ ",
        b"a OK Logged in\r\n",
        b"a NO [AUTHENTICATIONFAILED] Authentication failed.\r\n",
        b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n",
        b"* BYE Line too long\r\n",
        b"a BAD Malformed authentication response\r\n",
    ),
    Words(
        "pop3",
        b"",
        b"CAPA\r\n",
        lambda mechs: b"SASL " + b" ".join(m.encode() for m in mechs) + b"\r\n",
        _auth,
        b"+ ",
        b"OK Logged in\r\n",
        b"-ERR [AUTH] Authentication failed.\r\n",
        b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n",
        b"-ERR Line too long\r\n",
        b"-ERR Invalid SASL response\r\n",
    ),
    Words(
        "smtp",
        b"EHLO client.example\r\n",
        b"EHLO client.example\r\n",
        lambda mechs: b"AUTH " + b" ".join(m.encode() for m in mechs) + b"\r\n",
        _auth,
        b"334 ",
        b"235 2.7.0 Authentication successful\r\n",
        b"535 5.7.8 Authentication failed.\r\n",
        b"454 4.7.0 Temporary authentication failure\r\n",
        b"500 5.5.6 Line too long\r\n",
        b"501 5.5.2 Invalid authentication data\r\n",
    ),
]
ids = [w.name for w in PROTOCOLS]
MECHS = ["XOAUTH2", "OAUTHBEARER"]
# A script: bytes from the client, or the outcome the driver reports for a pending login.
Step = bytes | LoginOutcome


def make(words: Words, **changes: object) -> PreAuthCore:
    changes.setdefault("mechanisms", OAUTH)
    policy = replace(POLICY, **changes)  # type: ignore[arg-type]
    core = SPECS[words.name].core(policy, "<1.2@mx.example>")
    if words.hello:
        core.receive(words.hello)
    return core


def play(core: PreAuthCore, script: list[Step], way: str) -> list[Event]:
    """Run `script` on `core`, each bytes step split as `way` says (the unfinished line only
    after the last one, so that it is what a successful login leaves as trailing)."""
    events: list[Event] = []
    last = max((i for i, step in enumerate(script) if isinstance(step, bytes)), default=-1)
    for i, step in enumerate(script):
        if isinstance(step, bytes):
            for chunk in chunks(step, way if way != "trailing" or i == last else "whole"):
                events += core.receive(chunk)
        else:
            events += core.finish_login(step)
            events += core.drain()
    return events


def every_way(words: Words, script: list[Step], **changes: object) -> list[Event]:
    """The events of `script`, the same fed every way; the core's final state too."""
    results = []
    for way in WAYS:
        core = make(words, **changes)
        results.append((way, play(core, script, way), core.state, core.trailing))
    first = results[0]
    for way, events, state, trailing in results[1:]:
        assert _comparable(events) == _comparable(first[1]), f"fed {way}, the events differ"
        assert state is first[2], f"fed {way}, the state differs"
        if way == "trailing" and state is State.LOGGED_IN:
            assert trailing == first[3] + b"Z", "bytes behind a login are kept for the relay"
    return first[1]


def _comparable(events: list[Event]) -> list[object]:
    return [
        (e.credentials.method, e.credentials.user, e.credentials.secret.reveal())
        if isinstance(e, Authenticate)
        else e
        for e in events
    ]


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def creds_of(events: list[Event]) -> Credentials:
    found = [e.credentials for e in events if isinstance(e, Authenticate)]
    assert len(found) == 1, events
    return found[0]


# --- advertising -----------------------------------------------------------------------------


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("mechs", [["XOAUTH2"], ["OAUTHBEARER"], ["XOAUTH2", "OAUTHBEARER"]])
def test_the_enabled_oauth_mechanisms_are_advertised(words: Words, mechs: list[str]) -> None:
    events = every_way(words, [words.capability], mechanisms=tuple(m.lower() for m in mechs))
    assert words.advertised(mechs) in sent(events)
    for other in set(MECHS) - set(mechs):
        assert other.encode() not in sent(events)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_starttls_only_hides_them_until_tls_as_the_other_mechanisms(words: Words) -> None:
    hidden = sent(every_way(words, [words.capability], starttls_only=True))
    assert b"XOAUTH2" not in hidden and b"OAUTHBEARER" not in hidden
    shown = sent(every_way(words, [words.capability], starttls_only=True, tls_active=True))
    assert words.advertised(MECHS) in shown


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_mechanism_that_is_not_enabled_is_refused(words: Words) -> None:
    events = every_way(words, [words.auth("XOAUTH2", xoauth2(USER, "t"))], mechanisms=("plain",))
    assert not any(isinstance(e, Authenticate) for e in events)


# --- tokens as long as max_token -------------------------------------------------------------


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("mech", MECHS)
def test_a_max_token_with_initial_response_logs_in(words: Words, mech: str) -> None:
    tok = token(MAX_TOKEN)
    line = words.auth(mech, RESPONSES[mech](USER, tok))
    assert len(line) > 16 * 1024  # longer than POP3's and SMTP's own max_line
    events = every_way(words, [line, LoggedIn(b"OK Logged in")], max_line=16 * 1024)
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (METHODS[mech], USER, tok)
    assert sent(events).endswith(words.success)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("mech", MECHS)
def test_a_max_token_as_a_sasl_response_line_logs_in(words: Words, mech: str) -> None:
    tok = token(MAX_TOKEN)
    script: list[Step] = [words.auth(mech, None), RESPONSES[mech](USER, tok) + b"\r\n"]
    events = every_way(words, [*script, LoggedIn(b"OK Logged in")], max_line=16 * 1024)
    assert sent(events).startswith(words.challenge + b"\r\n")  # an empty challenge first
    assert creds_of(events).secret.reveal() == tok


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_oauthbearer_without_authzid_leaves_the_user_to_the_token(words: Words) -> None:
    events = every_way(words, [words.auth("OAUTHBEARER", oauthbearer("", "tok.en"))])
    assert (creds_of(events).user, creds_of(events).secret.reveal()) == ("", "tok.en")


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_token_past_max_token_is_a_malformed_response_not_a_long_line(words: Words) -> None:
    line = words.auth("XOAUTH2", xoauth2(USER, token(2049)))
    events = every_way(words, [line], max_token=2048)
    assert sent(events) == words.bad_sasl
    assert not any(isinstance(e, (Authenticate, Close)) for e in events)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_the_line_limit_follows_max_token_and_still_holds(words: Words) -> None:
    policy = replace(POLICY, mechanisms=OAUTH, max_line=16 * 1024, max_token=64 * 1024)
    limit = policy.line_limit
    assert limit >= max_oauth_response(64 * 1024) + 1024
    assert replace(policy, mechanisms=("plain",)).line_limit == 16 * 1024  # no OAuth: as set
    events = every_way(words, [b"X" * (limit + 1)], max_token=64 * 1024, max_line=16 * 1024)
    assert sent(events) == words.too_long
    assert events[-1] == Close(CloseReason.LINE_TOO_LONG)


# --- the RFC 7628 failure flow ----------------------------------------------------------------


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("mech", MECHS)
@pytest.mark.parametrize("dummy", ["mechanism's", "empty", "cancel"])
def test_a_refused_token_gets_the_challenge_then_after_the_dummy_the_failure(
    words: Words, mech: str, dummy: str
) -> None:
    answer = {"mechanism's": DUMMIES[mech], "empty": b"", "cancel": b"*"}[dummy]
    refused = Rejected("Authentication failed.", challenge=CHALLENGE)
    line = words.auth(mech, RESPONSES[mech](USER, "tok.en"))
    events = every_way(words, [line, refused])
    challenge = words.challenge + base64.b64encode(CHALLENGE) + b"\r\n"
    assert sent(events) == challenge  # nothing more until the client's dummy response
    events = every_way(words, [line, refused, answer + b"\r\n"])
    assert sent(events) == challenge + words.failure
    assert not any(isinstance(e, Close) for e in events)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_each_refusal_with_its_challenge_counts_as_one_failed_login(words: Words) -> None:
    line = words.auth("OAUTHBEARER", oauthbearer(USER, "tok.en"))
    refused = Rejected("Authentication failed.", challenge=CHALLENGE)
    one = [line, refused, b"AQ==\r\n"]
    events = every_way(words, one * 2, max_auth_attempts=3)
    assert not any(isinstance(e, Close) for e in events)
    events = every_way(words, one * 3, max_auth_attempts=3)
    assert events[-1] == Close(CloseReason.TOO_MANY_FAILURES)
    assert sent(events).count(words.failure) == 3


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_temporary_failure_has_no_challenge(words: Words) -> None:
    line = words.auth("XOAUTH2", xoauth2(USER, "tok.en"))
    events = every_way(words, [line, Unavailable()])
    assert sent(events) == words.temporary
    assert b"eyJ" not in sent(events)  # base64 of '{"': no challenge


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_refusal_without_challenge_is_the_plain_failure(words: Words) -> None:
    line = words.auth("XOAUTH2", xoauth2(USER, "tok.en"))
    events = every_way(words, [line, Rejected("Authentication failed.")])
    assert sent(events) == words.failure


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_after_the_failure_the_client_may_log_in_again(words: Words) -> None:
    tok = token(4000)
    first = words.auth("XOAUTH2", xoauth2(USER, "old"))
    again = words.auth("XOAUTH2", xoauth2(USER, tok))
    refused = Rejected("Authentication failed.", challenge=CHALLENGE)
    events = every_way(words, [first, refused, b"\r\n", again, LoggedIn(b"OK Logged in")])
    logins = [e.credentials for e in events if isinstance(e, Authenticate)]
    assert [c.secret.reveal() for c in logins] == ["old", tok]
    assert [c.attempt for c in logins] == [1, 2]
    assert sent(events).endswith(words.failure + words.success)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_malformed_oauth_message_is_refused_like_a_malformed_plain(words: Words) -> None:
    bad = base64.b64encode(b"user=alice\x01auth=Basic abc\x01\x01")
    events = every_way(words, [words.auth("XOAUTH2", bad)])
    assert sent(events) == words.bad_sasl
    assert make(words).state is State.COMMAND


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_the_client_leaving_during_the_challenge_ends_the_session(words: Words) -> None:
    line = words.auth("XOAUTH2", xoauth2(USER, "tok.en"))
    core = make(words)
    core.receive(line)
    core.finish_login(Rejected("no", challenge=CHALLENGE))
    assert core.receive(b"") == [Close(CloseReason.EOF)]
