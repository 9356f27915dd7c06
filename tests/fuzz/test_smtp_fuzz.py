"""Invariants of the SMTP core under any input: it returns events and nothing else, every reply
is a well-formed SMTP reply, it never repeats a credential to the client, what it hands to
auth_http and the backend is line-safe, and once closed it stays silent."""

from __future__ import annotations

import base64
import dataclasses
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocols.core import State
from mailgate.protocols.events import (
    Authenticate,
    Close,
    LoggedIn,
    Rejected,
    Send,
    StartTLS,
    Unavailable,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.smtp import SmtpCore

USER = "zq-user"
PASSWORD = "Pw-7x!secret"  # neither may ever come back to the client
DIGEST = "0123456789abcdef0123456789abcdef"
SALT = "<42.1@fuzz>"

BASE = PreAuthPolicy(
    mechanisms=("plain", "login", "cram-md5"),
    capabilities=("SIZE 1000", "PIPELINING", "8BITMIME"),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="fuzz ready",
    hostname="mx.fuzz",
    max_line=2048,
)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# Lines a real client might send, credentials included.
LINES = [
    b"EHLO client.fuzz",
    b"HELO client.fuzz",
    b"EHLO",
    b"STARTTLS",
    b"QUIT",
    b"NOOP",
    b"RSET",
    b"VRFY " + USER.encode(),
    b"HELP",
    b"MAIL FROM:<" + USER.encode() + b"@fuzz>",
    b"RCPT TO:<rcpt@fuzz>",
    b"DATA",
    b"Subject: body line",
    b".",
    b"AUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"),
    b"AUTH PLAIN",
    b64(f"\0{USER}\0{PASSWORD}"),
    b"AUTH LOGIN " + b64(USER),
    b"AUTH LOGIN",
    b64(USER),
    b64(PASSWORD),
    b"AUTH CRAM-MD5",
    b64(f"{USER} {DIGEST}"),
    b"AUTH PLAIN =",
    b"*",
    b"",
]
# Whole conversations as one item each, so that logins are reached often.
CONVERSATIONS = [
    b"EHLO c\r\nAUTH PLAIN " + b64(f"\0{USER}\0{PASSWORD}"),
    b"EHLO c\r\nAUTH LOGIN\r\n" + b64(USER) + b"\r\n" + b64(PASSWORD),
    b"EHLO c\r\nAUTH CRAM-MD5\r\n" + b64(f"{USER} {DIGEST}"),
    b"EHLO c\r\nMAIL FROM:<a@fuzz>\r\nRCPT TO:<b@fuzz>",
    b"EHLO c\r\nSTARTTLS",
]
HOSTILE = [
    PASSWORD.encode(),
    b"GET / HTTP/1.1",
    b"RCPT TO:<a\x00b@fuzz>",
    b"VRFY " + b"x" * 1100,
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"", b"\r"]  # mostly whole lines

body = st.one_of(
    *[st.sampled_from(CONVERSATIONS)] * 3,
    *[st.sampled_from(LINES)] * 5,
    st.sampled_from(HOSTILE),
)
line = st.builds(lambda text, end: text + end, body, st.sampled_from(ENDINGS))
lines = st.lists(line, min_size=1, max_size=4).map(b"".join)  # pipelined in one read
outcome = st.sampled_from(
    [
        LoggedIn(b"250 2.1.5 Ok"),
        LoggedIn(b"garbage\r\n250 injected"),
        Rejected("Authentication failed."),
        Rejected("bad\r\ncode", "550 5.1.1"),
        Rejected("x", "junk"),
        Unavailable(),
    ]
)
policy = st.builds(
    lambda mechs, only, tls, starttls, errors: dataclasses.replace(
        BASE,
        mechanisms=mechs,
        starttls_only=only,
        tls_active=tls,
        starttls=starttls,
        max_errors=errors,
    ),
    st.sampled_from([BASE.mechanisms, ("none",), ("none", "plain")]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(min_value=1, max_value=20),
)
# A step: bytes from the client, or the driver reporting back (applied only when it applies).
# Strategies are repeated to weight them: mostly commands, now and then noise or an EOF.
step = st.one_of(
    *[lines] * 6,
    outcome,
    outcome,
    st.binary(min_size=1, max_size=40),
    st.sampled_from(["tls", "tls", "tls", "eof", b"A" * 3000]),
)

EVENT_TYPES = (Send, StartTLS, Authenticate, Close)
SECRETS = (USER.encode(), PASSWORD.encode(), DIGEST.encode(), b64(PASSWORD), b64(USER))
# RFC 5321 4.2: a reply is lines of a code, "-" or " ", and printable text, ending in CRLF.
REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][ -~]*")


def check(events: list[object], closed_before: bool) -> None:
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, EVENT_TYPES)
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n")
            for reply_line in event.data[:-2].split(b"\r\n"):
                assert REPLY_LINE.fullmatch(reply_line), event.data
                assert len(reply_line) <= 510
            for secret in SECRETS:
                assert secret not in event.data
        if isinstance(event, Authenticate):
            creds = event.credentials
            for text in (creds.smtp_helo, creds.smtp_from, creds.smtp_to):
                assert text is None or not any(c in text for c in "\r\n\0")
    if closed_before:
        assert events == []
    assert sum(isinstance(e, Close) for e in events) <= 1
    if any(isinstance(e, Close) for e in events):
        assert isinstance(events[-1], Close)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policy, steps=st.lists(step, max_size=30))
def test_any_input_gives_only_events(policy, steps):
    core = SmtpCore(policy, SALT)
    check(core.greet(), False)
    for item in steps:
        closed = core.state is State.CLOSED
        if isinstance(item, bytes):
            events = core.receive(item)
        elif item == "eof":
            events = core.receive(b"")
        elif item == "tls":
            if core.state is not State.TLS_PENDING:
                continue
            events = core.tls_started()
        else:
            if core.state not in (State.AUTHENTICATING, State.CLOSED):
                continue
            events = core.finish_login(item) + core.drain()
        check(events, closed)
        if any(isinstance(e, Authenticate) for e in events):
            assert core.state is State.AUTHENTICATING
        if any(isinstance(e, Close) for e in events):
            assert core.state is State.CLOSED
        if any(isinstance(e, StartTLS) for e in events):
            assert core.state is State.TLS_PENDING


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=2, max_size=600), cut=st.integers(min_value=1, max_value=599))
def test_raw_bytes_split_anywhere_give_the_same_replies(data, cut):
    relay = dataclasses.replace(BASE, mechanisms=("none", "plain"))
    whole = SmtpCore(relay, SALT)
    split = SmtpCore(relay, SALT)
    cut = min(cut, len(data) - 1)  # two non-empty chunks: b"" would mean EOF
    one = whole.receive(data)
    two = split.receive(data[:cut]) + split.receive(data[cut:])
    sends = [e for e in one if not isinstance(e, Authenticate)]
    assert sends == [e for e in two if not isinstance(e, Authenticate)]
    assert whole.state is split.state
