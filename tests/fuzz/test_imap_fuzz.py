"""Invariants of the IMAP pre-auth core under any input (design rule 10).

A fake driver feeds bytes split anywhere, performs StartTLS and answers every Authenticate with
an outcome the test draws. Whatever arrives, the core returns events (never raises), every reply
is whole CRLF-terminated lines, nothing follows a Close, and no reply carries a password.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocols.core import State
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    LoginOutcome,
    Rejected,
    Send,
    StartTLS,
    Unavailable,
)
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy

# The most one command may make the core send: a CAPABILITY or a BYE after an error.
MAX_STEP_OUTPUT = 2048
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Pieces of IMAP that make random input reach deep states, mixed with raw bytes.
TOKENS = [
    b"a1 ",
    b"* ",
    b"+ ",
    b"LOGIN ",
    b"AUTHENTICATE ",
    b"PLAIN",
    b"LOGIN",
    b"CRAM-MD5",
    b"ID ",
    b"STARTTLS",
    b"CAPABILITY",
    b"NOOP",
    b"LOGOUT",
    b"SELECT",
    b"NIL",
    b"(",
    b")",
    b'"',
    b"\\",
    b"{0}",
    b"{3}",
    b"{2+}",
    b"{5+}",
    b"{99999}",
    b"{99999+}",
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"=",
    b"*",
    b"AGFsaWNlAHNlY3JldA==",
    b"YWxpY2U=",
    b"\x00",
    b"\xff",
    b"}",
    b"{",
]
pieces = st.lists(st.one_of(st.sampled_from(TOKENS), st.binary(max_size=6)), max_size=40)
inputs = pieces.map(b"".join)
outcomes = st.lists(
    st.one_of(
        st.just(Unavailable()),
        st.builds(LoggedIn, st.just(b"OK Logged in")),
        st.builds(Rejected, st.text(max_size=300)),
    ),
    max_size=6,
)
policies = st.builds(
    PreAuthPolicy,
    mechanisms=st.lists(st.sampled_from(["login", "plain", "cram-md5"]), unique=True).map(tuple),
    capabilities=st.just(("IDLE",)),
    starttls=st.booleans(),
    tls_active=st.booleans(),
    starttls_only=st.booleans(),
    greeting=st.just("ready"),
    max_errors=st.integers(1, 6),
    max_line=st.sampled_from([32, 200, 8192]),
    max_literal=st.sampled_from([4, 64, 4096]),
    max_auth_attempts=st.integers(1, 4),
)


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


def drive(core: ImapCore, data: bytes, cuts: list[int], answers: list[LoginOutcome]) -> list[Event]:
    """Run the core as the session driver does; every event it asked for, in order."""
    events: list[Event] = []
    answers = list(answers)

    def perform(new: list[Event]) -> None:
        for i, event in enumerate(new):
            events.append(event)
            if isinstance(event, StartTLS):
                assert i == len(new) - 1, "StartTLS must end the list: the driver acts on it"
                assert core.state is State.TLS_PENDING
                perform(core.tls_started())
            elif isinstance(event, Authenticate):
                assert i == len(new) - 1, "Authenticate must end the list: the driver acts on it"
                assert core.state is State.AUTHENTICATING
                perform(core.finish_login(answers.pop(0) if answers else Rejected("no")))
                pump()

    def pump() -> None:
        """Command by command, as the driver does; each gives a bounded reply (back-pressure
        works only if one command cannot produce unbounded output)."""
        while step := core.next_events():
            assert sum(len(e.data) for e in step if isinstance(e, Send)) <= MAX_STEP_OUTPUT
            perform(step)

    for chunk in split(data, cuts):
        if chunk:
            core.feed(chunk)
            pump()
    core.feed(b"")
    pump()
    return events


def check(events: list[Event]) -> None:
    for i, event in enumerate(events):
        assert isinstance(event, Send | StartTLS | Authenticate | Close)
        if isinstance(event, Send):
            assert event.data.endswith(b"\r\n")
            assert b"\r\n" not in event.data.replace(b"\r\n", b""), "a bare CR or LF in a reply"
            assert b"\n" not in event.data.replace(b"\r\n", b"")
        if isinstance(event, Close):
            assert i == len(events) - 1, "events after a Close"


@FUZZ
@given(policies, inputs, st.lists(st.integers(0, 400), max_size=8), outcomes)
def test_any_input_gives_events(
    policy: PreAuthPolicy, data: bytes, cuts: list[int], answers: list[LoginOutcome]
) -> None:
    core = ImapCore(policy, "<1.2@fuzz>")
    check(drive(core, data, cuts, answers))
    assert core.state is State.CLOSED or core.state is State.LOGGED_IN


@FUZZ
@given(
    policies,
    inputs,
    pieces.map(b"".join),
    st.text("0123456789abcdef", min_size=8, max_size=24),
    st.sampled_from(["atom", "quoted", "sasl-ir", "sasl"]),
    st.lists(st.integers(0, 400), max_size=8),
    outcomes,
)
def test_no_reply_carries_a_password(
    policy: PreAuthPolicy,
    before: bytes,
    after: bytes,
    hexpart: str,
    form: str,
    cuts: list[int],
    answers: list[LoginOutcome],
) -> None:
    password = b"pw-" + hexpart.encode()
    plain = base64.b64encode(b"\0user\0" + password)
    login = {
        "atom": b"t1 LOGIN user " + password + b"\r\n",
        "quoted": b't1 LOGIN user "' + password + b'"\r\n',
        "sasl-ir": b"t1 AUTHENTICATE PLAIN " + plain + b"\r\n",
        "sasl": b"t1 AUTHENTICATE PLAIN\r\n" + plain + b"\r\n",
    }[form]
    core = ImapCore(dataclasses.replace(policy, max_line=8192), "<1.2@fuzz>")
    events = drive(core, before + login + after, cuts, answers)
    check(events)
    out = b"".join(e.data for e in events if isinstance(e, Send))
    assert password not in out
    assert plain not in out


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_raw_bytes(data: bytes, cuts: list[int]) -> None:
    policy = PreAuthPolicy(("login", "plain"), (), True, False, False, "ready")
    check(drive(ImapCore(policy, "<1.2@fuzz>"), data, cuts, []))
