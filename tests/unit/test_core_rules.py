"""One rule each, in every protocol (issue 7, item 6: the cores had drifted apart).

Each test runs the same scenario through the IMAP, POP3 and SMTP cores, written in each
protocol's words, and asserts the same outcome.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, replace

import pytest

from mailgate.protocols.core import PreAuthCore, State
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    Limited,
    Rejected,
    Send,
    Unavailable,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.spec import SPECS
from mailgate.values import CloseReason

POLICY = PreAuthPolicy(
    mechanisms=(),
    capabilities=(),
    starttls=False,
    tls_active=False,
    starttls_only=False,
    greeting="ready",
    hostname="mx.example",
)
PLAIN_RESPONSE = base64.b64encode(b"\0alice\0secret")


@dataclass(frozen=True)
class Words:
    """How a protocol says the same things."""

    name: str
    mechanisms: tuple[str, ...]
    hello: bytes  # what a client says first (SMTP needs EHLO before AUTH)
    auth_plain: bytes  # AUTH(ENTICATE) PLAIN, without initial response
    auth_plain_empty: bytes  # ... with an empty initial response, "="
    auth_plain_space: bytes  # ... with nothing after the space (mutt)
    bad: bytes  # a command the protocol does not know


PROTOCOLS = [
    Words(
        "imap",
        ("login", "plain"),
        b"",
        b"a AUTHENTICATE PLAIN\r\n",
        b"a AUTHENTICATE PLAIN =\r\n",
        b"a AUTHENTICATE PLAIN \r\n",
        b"a FROB\r\n",
    ),
    Words(
        "pop3",
        ("user", "plain"),
        b"",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH PLAIN \r\n",
        b"FROB\r\n",
    ),
    Words(
        "smtp",
        ("plain", "login"),
        b"EHLO c\r\n",
        b"AUTH PLAIN\r\n",
        b"AUTH PLAIN =\r\n",
        b"AUTH PLAIN \r\n",
        b"FROB\r\n",
    ),
]
ids = [words.name for words in PROTOCOLS]


def make(words: Words, **changes: object) -> PreAuthCore:
    policy = replace(POLICY, mechanisms=words.mechanisms, **changes)  # type: ignore[arg-type]
    core = SPECS[words.name].core(policy, "<1.2@mx.example>")
    if words.hello:
        core.receive(words.hello)
    return core


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def login(core: PreAuthCore, words: Words) -> None:
    events = core.receive(words.auth_plain + PLAIN_RESPONSE + b"\r\n")
    assert any(isinstance(e, Authenticate) for e in events), events


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("outcome", [Unavailable(), Rejected("no")], ids=["tempfail", "reject"])
def test_every_failed_login_counts_against_max_auth_attempts(words: Words, outcome) -> None:  # type: ignore[no-untyped-def]
    core = make(words, max_auth_attempts=2)
    login(core, words)
    assert not any(isinstance(e, Close) for e in core.finish_login(outcome))
    login(core, words)
    events = core.finish_login(outcome)
    assert events[-1] == Close(CloseReason.TOO_MANY_FAILURES)
    assert core.state is State.CLOSED


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_a_sasl_cancel_spends_the_error_budget(words: Words) -> None:
    core = make(words, max_errors=2)
    core.receive(words.auth_plain + b"*\r\n")
    assert core.state is State.COMMAND
    events = core.receive(words.auth_plain + b"*\r\n")
    assert events[-1] == Close(CloseReason.TOO_MANY_ERRORS)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_every_refused_command_spends_the_error_budget(words: Words) -> None:
    core = make(words, max_errors=3)
    events = core.receive(words.bad * 2)
    assert core.state is State.COMMAND and not any(isinstance(e, Close) for e in events)
    assert core.receive(words.bad)[-1] == Close(CloseReason.TOO_MANY_ERRORS)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_the_pipelining_cap_while_authenticating_is_max_pipelined(words: Words) -> None:
    core = make(words, max_pipelined=1000)
    login(core, words)
    assert core.receive(b"x" * 1000) == []
    events = core.receive(b"x")
    assert events[-1] == Close(CloseReason.FLOODED)


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize("field", ["auth_plain_empty", "auth_plain_space"])
def test_an_empty_initial_response_gets_the_first_challenge(words: Words, field: str) -> None:
    core = make(words)
    events = core.receive(getattr(words, field))
    assert sent(events) in (b"+ \r\n", b"334 \r\n")
    assert core.state is State.SASL


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", CloseReason.FOREIGN_HTTP),
        (b"POST /imap HTTP/1.0\r\n", CloseReason.FOREIGN_HTTP),
        (b"\x16\x03\x01\x00\xc8\x01\x00\x00\xc4\x03\x03", CloseReason.FOREIGN_TLS),
    ],
)
def test_another_protocol_ends_the_session_at_once(
    words: Words, foreign: bytes, reason: CloseReason
) -> None:
    core = SPECS[words.name].core(replace(POLICY, mechanisms=words.mechanisms), "<1@x>")
    events = core.receive(foreign)
    assert events[-1] == Close(reason)
    assert sent(events).endswith(b"\r\n")  # one line saying what this server is


@pytest.mark.parametrize("words", PROTOCOLS, ids=ids)
def test_one_command_at_a_time(words: Words) -> None:
    """next_events handles one command, so a driver can stop while replies are unsent."""
    core = make(words)
    core.feed(words.bad * 3)
    steps = []
    while step := core.next_events():
        steps.append(step)
    assert len(steps) == 3


@pytest.mark.parametrize(
    ("words", "reply"),
    [
        (PROTOCOLS[0], b"a NO [LIMIT] Too many sessions, try again later\r\n"),
        (PROTOCOLS[1], b"-ERR [IN-USE] Too many sessions, try again later\r\n"),
        (PROTOCOLS[2], b"421 4.7.0 Too many sessions, try again later\r\n"),
    ],
    ids=ids,
)
def test_a_session_limit_is_a_temporary_refusal_that_says_so(words: Words, reply: bytes) -> None:
    core = make(words)
    login(core, words)
    events = core.finish_login(Limited())
    assert sent(events) == reply
    # SMTP's 421 closes; IMAP and POP3 clients may try again in the session.
    assert (core.state is State.CLOSED) == (words.name == "smtp")
