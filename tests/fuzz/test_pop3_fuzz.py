"""Invariants of the POP3 core under any input: it returns events and nothing else, it never
repeats a credential to the client, and once closed it stays silent."""

from __future__ import annotations

import base64
import dataclasses

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
from mailgate.protocols.pop3 import Pop3Core

USER = "zq-user"
PASSWORD = "Pw-7x!secret"  # neither may ever come back to the client
DIGEST = "0123456789abcdef0123456789abcdef"
SALT = "<42.1@fuzz>"

BASE = PreAuthPolicy(
    mechanisms=("user", "apop", "plain", "login", "cram-md5"),
    capabilities=("TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="fuzz ready",
    max_line=255,
)


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


# Lines a real client might send, credentials included, mixed with hostile bytes.
LINES = [
    b"CAPA",
    b"STLS",
    b"QUIT",
    b"NOOP",
    b"STAT",
    b"AUTH",
    b"USER " + USER.encode(),
    b"PASS " + PASSWORD.encode(),
    b"pass " + PASSWORD.encode() + b" more",
    b"APOP " + USER.encode() + b" " + DIGEST.encode(),
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
    b"GET / HTTP/1.1",
    PASSWORD.encode(),
]
ENDINGS = [b"\r\n", b"\r\n", b"\r\n", b"\n", b"", b"\r"]  # mostly whole lines

line = st.builds(lambda body, end: body + end, st.sampled_from(LINES), st.sampled_from(ENDINGS))
lines = st.lists(line, min_size=1, max_size=4).map(b"".join)  # pipelined in one read
outcome = st.sampled_from(
    [LoggedIn(b"+OK Logged in."), Rejected("Authentication failed."), Unavailable()]
)
policy = st.builds(
    lambda only, tls, starttls, errors: dataclasses.replace(
        BASE, starttls_only=only, tls_active=tls, starttls=starttls, max_errors=errors
    ),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.integers(min_value=1, max_value=20),
)
# A step: bytes from the client, or the driver reporting back (applied only when it applies).
# Strategies are repeated to weight them: mostly commands, now and then noise. An EOF ends a
# session at once, and so does an endless line: each is tried only as the last step.
last = st.sampled_from([None, "eof", b"A" * 300])
step = st.one_of(
    *[lines] * 6,
    *[outcome] * 3,
    st.binary(max_size=40),
    st.just("tls"),
)

EVENT_TYPES = (Send, StartTLS, Authenticate, Close)
SECRETS = (USER.encode(), PASSWORD.encode(), DIGEST.encode(), b64(PASSWORD), b64(USER))


def check(events: list[object], closed_before: bool) -> None:
    assert isinstance(events, list)
    for event in events:
        assert isinstance(event, EVENT_TYPES)
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n")
            for secret in SECRETS:
                assert secret not in event.data
    if closed_before:
        assert events == []
    assert sum(isinstance(e, Close) for e in events) <= 1
    if any(isinstance(e, Close) for e in events):
        assert isinstance(events[-1], Close)


def run(core: Pop3Core, steps: list[object]) -> None:
    """Apply each step; driver reports that do not fit the state are skipped, as a driver would."""
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


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policy=policy, polite=st.booleans(), steps=st.lists(step, max_size=30), last=last)
def test_any_input_gives_only_events(policy, polite, steps, last):
    core = Pop3Core(policy, SALT)
    check(core.greet(), False)
    if polite:  # a first good command, so that more runs get past the garbage check
        check(core.receive(b"CAPA\r\n"), False)
    run(core, steps if last is None else [*steps, last])


# Whole login exchanges, one per route, so that scripts reach AUTHENTICATING often.
LOGINS = [
    b"USER %s\r\nPASS %s\r\n" % (USER.encode(), PASSWORD.encode()),
    b"APOP %s %s\r\n" % (USER.encode(), DIGEST.encode()),
    b"AUTH PLAIN %s\r\n" % b64(f"\0{USER}\0{PASSWORD}"),
    b"AUTH PLAIN\r\n%s\r\n" % b64(f"\0{USER}\0{PASSWORD}"),
    b"AUTH LOGIN\r\n%s\r\n%s\r\n" % (b64(USER), b64(PASSWORD)),
    b"AUTH LOGIN %s\r\n%s\r\n" % (b64(USER), b64(PASSWORD)),
    b"AUTH CRAM-MD5\r\n%s\r\n" % b64(f"{USER} {DIGEST}"),
]
# Only well-formed client lines, whole logins and driver reports.
script = st.lists(
    st.one_of(
        st.sampled_from(LOGINS),
        st.sampled_from(LINES).map(lambda body: body + b"\r\n"),
        outcome,
        st.just("tls"),
    ),
    max_size=40,
)


@settings(max_examples=600, deadline=None)
@given(policy=policy, steps=script)
def test_command_scripts_never_echo_credentials(policy, steps):
    run(Pop3Core(policy, SALT), [b"CAPA\r\n", *steps])


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=2, max_size=600), cut=st.integers(min_value=1, max_value=599))
def test_raw_bytes_split_anywhere_give_the_same_replies(data, cut):
    whole = Pop3Core(BASE, SALT)
    split = Pop3Core(BASE, SALT)
    cut = min(cut, len(data) - 1)  # two non-empty chunks: b"" would mean EOF
    one = whole.receive(data)
    two = split.receive(data[:cut]) + split.receive(data[cut:])
    sends = [e for e in one if not isinstance(e, Authenticate)]
    assert sends == [e for e in two if not isinstance(e, Authenticate)]
    assert whole.state is split.state
