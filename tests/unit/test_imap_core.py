"""The IMAP pre-auth core, bytes in and events out.

Every exchange goes through `exchange`, which feeds it whole, one byte at a time, and followed
by an unfinished line, and insists that all three give the same events and end in one state.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import hmac
import subprocess
import sys
from pathlib import Path

import pytest
from feeding import WAYS, comparable, feed, same_every_way

from mailgate.protocols import imap
from mailgate.protocols.core import State
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    Rejected,
    Send,
    StartTLS,
    Unavailable,
)
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.values import CloseReason, Credentials, Method

SALT = "<1234.5678@mail.example>"
POLICY = PreAuthPolicy(
    mechanisms=("login", "plain", "cram-md5"),
    capabilities=("IDLE", "NAMESPACE"),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="mailgate ready",
)
CAPS = b"IMAP4rev1 IDLE NAMESPACE LITERAL+ SASL-IR ID STARTTLS AUTH=LOGIN AUTH=PLAIN AUTH=CRAM-MD5"
OK_REPLY = b"OK [CAPABILITY IMAP4rev1 IDLE] Logged in"


def make(**changes: object) -> ImapCore:
    return ImapCore(dataclasses.replace(POLICY, **changes), SALT)  # type: ignore[arg-type]


def exchange(data: bytes, **changes: object) -> tuple[list[Event], ImapCore]:
    cores: list[ImapCore] = []

    def factory() -> ImapCore:
        cores.append(make(**changes))
        return cores[-1]

    events = same_every_way(factory, data)
    assert len({core.state for core in cores}) == 1, "the three ways end in different states"
    return events, cores[0]


def state_of(core: ImapCore) -> State:
    return core.state  # read through a call, so that mypy does not keep an earlier narrowing


def sent(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def only_creds(events: list[Event]) -> Credentials:
    found = [e.credentials for e in events if isinstance(e, Authenticate)]
    assert len(found) == 1
    assert isinstance(events[-1], Authenticate), "the driver acts on Authenticate: it comes last"
    return found[0]


def login(data: bytes, **changes: object) -> tuple[Credentials, bytes, ImapCore]:
    events, core = exchange(data, **changes)
    assert core.state is State.AUTHENTICATING
    return only_creds(events), sent(events), core


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- greeting and capabilities -----------------------------------------------------------------


def test_greeting_lists_capabilities() -> None:
    assert make().greet() == [Send(b"* OK [CAPABILITY " + CAPS + b"] mailgate ready\r\n")]


@pytest.mark.parametrize(
    ("changes", "caps"),
    [
        ({"tls_active": True}, CAPS.replace(b" STARTTLS", b"")),
        ({"starttls": False}, CAPS.replace(b" STARTTLS", b"")),
        (
            {"starttls_only": True},
            b"IMAP4rev1 IDLE NAMESPACE LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED",
        ),
        (
            {"mechanisms": ("cram-md5", "plain")},
            b"IMAP4rev1 IDLE NAMESPACE LITERAL+ SASL-IR ID STARTTLS LOGINDISABLED"
            b" AUTH=CRAM-MD5 AUTH=PLAIN",
        ),
        (
            {
                "capabilities": (
                    "idle",
                    "IDLE",
                    "STARTTLS",
                    "AUTH=XOAUTH2",
                    "bad cap",
                    "ID",
                    "X]",
                    "LITERAL-",
                )
            },
            b"IMAP4rev1 idle LITERAL+ SASL-IR ID STARTTLS AUTH=LOGIN AUTH=PLAIN AUTH=CRAM-MD5",
        ),
    ],
)
def test_capabilities_follow_the_policy(changes: dict[str, object], caps: bytes) -> None:
    events, _ = exchange(b"t1 CAPABILITY\r\n", **changes)
    assert sent(events) == b"* CAPABILITY " + caps + b"\r\nt1 OK CAPABILITY completed\r\n"


def test_capability_takes_no_arguments() -> None:
    events, _ = exchange(b"t1 NOOP\r\nt2 CAPABILITY IMAP4rev1\r\n")
    assert sent(events) == b"t1 OK NOOP completed\r\nt2 BAD Syntax error\r\n"


# --- simple commands ---------------------------------------------------------------------------


def test_noop_and_case_insensitive_commands() -> None:
    events, core = exchange(b"a1 noop\r\nA2 Noop\r\n")
    assert sent(events) == b"a1 OK NOOP completed\r\nA2 OK NOOP completed\r\n"
    assert core.state is State.COMMAND


def test_logout_says_bye_and_closes() -> None:
    events, core = exchange(b"z LOGOUT\r\nz2 NOOP\r\n")
    assert events == [
        Send(b"* BYE Logging out\r\nz OK LOGOUT completed\r\n"),
        Close(CloseReason.LOGOUT),
    ]
    assert core.state is State.CLOSED
    assert core.receive(b"z3 NOOP\r\n") == []


def test_eof_closes() -> None:
    core = make()
    assert core.receive(b"a NOOP\r\n") == [Send(b"a OK NOOP completed\r\n")]
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.state is State.CLOSED
    assert core.receive(b"b NOOP\r\n") == []
    assert core.receive(b"") == []


@pytest.mark.parametrize(
    "params",
    [b"NIL", b"()", b'("name" "Thunderbird" "version" "115.0")', b'("os" NIL "x" {4}\r\na\r\nb)'],
)
def test_id_answers_nil(params: bytes) -> None:
    data = b"i1 ID " + params + b"\r\n"
    events, _ = exchange(data.replace(b"{4}", b"{4+}"))  # a literal may hold CRLF
    assert sent(events) == b"* ID NIL\r\ni1 OK ID completed\r\n"


def test_id_syntax_errors_are_bad() -> None:
    events, _ = exchange(b'i0 NOOP\r\ni1 ID\r\ni2 ID (name x)\r\ni3 ID ("a")\r\n')
    assert sent(events).split(b"\r\n")[1:4] == [b"i%d BAD Syntax error" % i for i in (1, 2, 3)]


# --- LOGIN -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "user", "password"),
    [
        (b"a LOGIN alice secret\r\n", "alice", "secret"),
        (
            b'a LOGIN "alice@example.com" "my little p%ony"\r\n',
            "alice@example.com",
            "my little p%ony",
        ),
        (rb'a LOGIN bob "q\"uo\\te"' + b"\r\n", "bob", 'q"uo\\te'),
        (b'a login alice ""\r\n', "alice", ""),
        (b"a LOGIN alice {0+}\r\n\r\n", "alice", ""),
        (b'a LOGIN {5+}\r\nalice {9+}\r\nx) y"z{1}\r\n', "alice", 'x) y"z{1}'),
        (b'a LOGIN "caf\xc3\xa9" "\xe9t\xe9"\r\n', "caf\u00e9", "\udce9t\udce9"),
    ],
)
def test_login_forms(data: bytes, user: str, password: str) -> None:
    creds, out, _ = login(data)
    assert out == b""
    assert (creds.method, creds.user, creds.secret.reveal(), creds.attempt) == (
        Method.PLAIN,
        user,
        password,
        1,
    )


def test_login_with_synchronising_literals_waits_for_the_go_ahead() -> None:
    creds, out, _ = login(b"a LOGIN {5}\r\nalice {6}\r\nsecret\r\n")
    assert out == b"+ OK\r\n+ OK\r\n"
    assert (creds.user, creds.secret.reveal()) == ("alice", "secret")


def test_login_literal_arrives_in_pieces() -> None:
    core = make()
    assert core.receive(b"a LOGIN {5}\r\n") == [Send(b"+ OK\r\n")]
    assert core.state is State.LITERAL
    assert core.receive(b"al") == []
    assert core.receive(b"ice {3+}\r\nab") == []
    events = core.receive(b"c\r\n")
    assert only_creds(events).secret.reveal() == "abc"


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"a LOGIN alice\r\n", b"a BAD Syntax error\r\n"),
        (b"a LOGIN\r\n", b"a BAD Syntax error\r\n"),
        (b"a LOGIN alice secret extra\r\n", b"a BAD Syntax error\r\n"),
        (
            b'a LOGIN "" secret\r\n',
            b"a BAD Invalid characters or length in user name or password\r\n",
        ),
        (b"a LOGIN alice {3}\r\n", b"+ OK\r\n"),  # still waiting for the literal
        (b"a LOGIN alice {3}x\r\n", b"a BAD Syntax error\r\n"),
        (b'a LOGIN alice "unterminated\r\n', b"a BAD Syntax error\r\n"),
    ],
)
def test_login_syntax(data: bytes, reply: bytes) -> None:
    events, _ = exchange(b"n NOOP\r\n" + data)
    assert sent(events) == b"n OK NOOP completed\r\n" + reply
    assert not any(isinstance(e, Authenticate) for e in events)


@pytest.mark.parametrize(
    ("literal", "reply"),
    [
        (b"a\x00b", b"x BAD Syntax error\r\n"),  # CHAR8 has no NUL
        (b"a\r\nb", b"x BAD Invalid characters or length in user name or password\r\n"),
        (b"p" * 1025, b"x BAD Invalid characters or length in user name or password\r\n"),
    ],
)
def test_login_refuses_nul_line_breaks_and_overlong_fields(literal: bytes, reply: bytes) -> None:
    data = b"x LOGIN alice {%d}\r\n%s\r\ny NOOP\r\n" % (len(literal), literal)
    events, _ = exchange(data, max_literal=2000)
    assert sent(events) == b"+ OK\r\n" + reply + b"y OK NOOP completed\r\n"


def test_a_bad_command_with_a_non_synchronising_literal_is_fatal() -> None:
    events, core = exchange(b"x LOGIN alice {3+}\r\na\rb\r\ny NOOP\r\n")
    assert sent(events) == (
        b"x BAD Invalid characters or length in user name or password\r\n"
        b"* BYE Syntax error after a non-synchronising literal\r\n"
    )
    assert core.state is State.CLOSED


def test_login_disabled() -> None:
    events, _ = exchange(b"a LOGIN {5}\r\nb NOOP\r\n", mechanisms=("plain",))
    assert sent(events) == b"a NO [CANNOT] LOGIN is disabled\r\nb OK NOOP completed\r\n"


def test_starttls_only_refuses_login_before_the_password_is_sent() -> None:
    events, _ = exchange(b"a LOGIN alice {6}\r\nb LOGIN alice secret\r\n", starttls_only=True)
    refusal = (
        b" NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connection\r\n"
    )
    assert sent(events) == b"a" + refusal + b"b" + refusal  # no "+ OK": the password stays home


def test_starttls_only_allows_login_once_tls_is_active() -> None:
    creds, _, _ = login(b"a LOGIN alice secret\r\n", starttls_only=True, tls_active=True)
    assert creds.user == "alice"


# --- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_discards_injected_plaintext() -> None:
    events, core = exchange(b"s STARTTLS\r\nx LOGIN alice secret\r\ny NOOP\r\n")
    assert events == [Send(b"s OK Begin TLS negotiation now\r\n"), StartTLS()]
    assert core.state is State.TLS_PENDING
    assert core.receive(b"z LOGIN more plaintext\r\n") == []
    assert core.tls_started() == []  # no second greeting
    assert state_of(core) is State.COMMAND
    events = core.receive(b"c CAPABILITY\r\n")
    assert sent(events) == b"* CAPABILITY " + CAPS.replace(b" STARTTLS", b"") + (
        b"\r\nc OK CAPABILITY completed\r\n"
    )


def test_starttls_only_capabilities_change_after_tls() -> None:
    core = make(starttls_only=True)
    core.receive(b"s STARTTLS\r\n")
    core.tls_started()
    events = core.receive(b"c CAPABILITY\r\nl LOGIN alice secret\r\n")
    assert b"LOGINDISABLED" not in sent(events)
    assert b"STARTTLS" not in sent(events)
    assert b"AUTH=PLAIN" in sent(events)
    assert only_creds(events).user == "alice"


@pytest.mark.parametrize(
    ("changes", "reply"),
    [
        ({"tls_active": True}, b"s BAD TLS is already active\r\n"),
        ({"starttls": False}, b"s BAD STARTTLS is not available\r\n"),
    ],
)
def test_starttls_refused(changes: dict[str, object], reply: bytes) -> None:
    events, core = exchange(b"s STARTTLS\r\nn NOOP\r\n", **changes)
    assert sent(events) == reply + b"n OK NOOP completed\r\n"
    assert core.state is State.COMMAND


# --- AUTHENTICATE ------------------------------------------------------------------------------

PLAIN = b64(b"\0alice\0secret")


@pytest.mark.parametrize(
    ("data", "server"),
    [
        (b"a AUTHENTICATE PLAIN\r\n" + PLAIN + b"\r\n", b"+ \r\n"),
        (b"a AUTHENTICATE PLAIN " + PLAIN + b"\r\n", b""),
        (b"a authenticate plain " + PLAIN + b"\r\n", b""),
        (
            b"a AUTHENTICATE LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n",
            b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n",
        ),
        (
            b"a AUTHENTICATE LOGIN " + b64(b"alice") + b"\r\n" + b64(b"secret") + b"\r\n",
            b"+ UGFzc3dvcmQ6\r\n",
        ),
    ],
)
def test_authenticate_plain_and_login(data: bytes, server: bytes) -> None:
    creds, out, _ = login(data)
    assert out == server
    assert (creds.user, creds.secret.reveal(), creds.attempt) == ("alice", "secret", 1)
    assert creds.method is (Method.LOGIN if b"LOGIN" in data else Method.PLAIN)


def test_authenticate_cram_md5() -> None:
    digest = hmac.new(b"secret", SALT.encode(), hashlib.md5).hexdigest()
    data = b"a AUTHENTICATE CRAM-MD5\r\n" + b64(b"alice " + digest.encode()) + b"\r\n"
    creds, out, _ = login(data)
    assert out == b"+ " + b64(SALT.encode()) + b"\r\n"
    assert (creds.method, creds.user, creds.secret.reveal(), creds.salt) == (
        Method.CRAM_MD5,
        "alice",
        digest,
        SALT,
    )


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"a AUTHENTICATE PLAIN\r\n*\r\n", b"+ \r\na BAD Authentication cancelled\r\n"),
        (b"a AUTHENTICATE LOGIN\r\n*\r\n", b"+ VXNlcm5hbWU6\r\na BAD Authentication cancelled\r\n"),
        (
            b"a AUTHENTICATE CRAM-MD5\r\n*\r\n",
            b"+ " + b64(SALT.encode()) + b"\r\na BAD Authentication cancelled\r\n",
        ),
        (b"a AUTHENTICATE PLAIN\r\n!!\r\n", b"+ \r\na BAD Invalid base64 data\r\n"),
        (b"a AUTHENTICATE PLAIN !!\r\n", b"a BAD Invalid base64 data\r\n"),
        (b"a AUTHENTICATE PLAIN YWxpY2U\r\n", b"a BAD Invalid base64 data\r\n"),
        # An empty initial response is none: the mechanism's challenge, then "*" cancels.
        (b"a AUTHENTICATE PLAIN =\r\n*\r\n", b"+ \r\na BAD Authentication cancelled\r\n"),
        (
            b"a AUTHENTICATE PLAIN " + b64(b"no nuls") + b"\r\n",
            b"a BAD Malformed authentication response\r\n",
        ),
        (
            b"a AUTHENTICATE CRAM-MD5 " + b64(b"x") + b"\r\n",
            b"a BAD Malformed authentication response\r\n",
        ),
        (b"a AUTHENTICATE\r\n", b"a BAD Syntax error\r\n"),
        (b"a AUTHENTICATE XOAUTH2\r\n", b"a NO [CANNOT] Unsupported authentication mechanism\r\n"),
        (b"a AUTHENTICATE PLAIN " + PLAIN + b" x\r\n", b"a BAD Syntax error\r\n"),
    ],
)
def test_authenticate_failures_return_to_commands(data: bytes, reply: bytes) -> None:
    events, core = exchange(b"n NOOP\r\n" + data + b"b NOOP\r\n")
    assert sent(events) == b"n OK NOOP completed\r\n" + reply + b"b OK NOOP completed\r\n"
    assert core.state is State.COMMAND


def test_authenticate_disabled_mechanism() -> None:
    events, _ = exchange(b"a AUTHENTICATE CRAM-MD5\r\n", mechanisms=("login", "plain"))
    assert sent(events) == b"a NO [CANNOT] Unsupported authentication mechanism\r\n"


def test_authenticate_refused_in_cleartext_when_starttls_only() -> None:
    events, _ = exchange(b"a AUTHENTICATE PLAIN " + PLAIN + b"\r\n", starttls_only=True)
    assert sent(events).startswith(b"a NO [PRIVACYREQUIRED] ")
    assert not any(isinstance(e, Authenticate) for e in events)


# --- tags, unknown commands, the error budget --------------------------------------------------


@pytest.mark.parametrize("tag", [b"a1", b"A.001", b"x]y", b"~!#$&'-/:;<=>?@^_`|"])
def test_tags_are_echoed_exactly(tag: bytes) -> None:
    events, _ = exchange(tag + b" NOOP\r\n")
    assert sent(events) == tag + b" OK NOOP completed\r\n"


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"a+b NOOP", b"* BAD Invalid tag\r\n"),
        (b'"a" NOOP', b"* BAD Invalid tag\r\n"),
        (b" NOOP", b"* BAD Invalid tag\r\n"),
        (b"", b"* BAD Empty command line\r\n"),
        (b"t1", b"* BAD Missing command\r\n"),  # a lone word may be a credential
        (b"t1 (", b"t1 BAD Missing or malformed command\r\n"),
        (b"t1 FROB", b"t1 BAD Unknown command\r\n"),
        (b"t1 SELECT INBOX", b"t1 BAD Command not allowed before login\r\n"),
        (b"t1 NOOP {3}", b"t1 BAD Syntax error\r\n"),  # no "+ OK" for a command without strings
    ],
)
def test_bad_commands(line: bytes, reply: bytes) -> None:
    events, core = exchange(b"n NOOP\r\n" + line + b"\r\nm NOOP\r\n")
    assert sent(events) == b"n OK NOOP completed\r\n" + reply + b"m OK NOOP completed\r\n"
    assert core.state is State.COMMAND


def test_error_budget() -> None:
    data = b"n NOOP\r\na FROB\r\n\r\nb+ x\r\nc SELECT x\r\nd NOOP\r\n"
    events, core = exchange(data, max_errors=4)
    assert sent(events) == (
        b"n OK NOOP completed\r\na BAD Unknown command\r\n* BAD Empty command line\r\n"
        b"* BAD Invalid tag\r\nc BAD Command not allowed before login\r\n"
        b"* BYE Too many invalid commands\r\n"
    )
    assert events[-1] == Close(CloseReason.TOO_MANY_ERRORS)
    assert core.state is State.CLOSED


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", CloseReason.FOREIGN_HTTP),
        (b"POST /x HTTP/1.0\r\n", CloseReason.FOREIGN_HTTP),
        (b"EHLO client.example\r\n", CloseReason.FOREIGN_SMTP),
        (b"HELO client.example\r\n", CloseReason.FOREIGN_SMTP),
        (b"\x16\x03\x01\x02\x00\x01\n", CloseReason.FOREIGN_TLS),  # a ClientHello, in plaintext
    ],
)
def test_input_that_is_plainly_another_protocol_closes_at_once(
    foreign: bytes, reason: CloseReason
) -> None:
    """The ALPACA class: an HTTP request, an SMTP client or a TLS handshake on an IMAP port."""
    events, core = exchange(b"n NOOP\r\n" * (reason is not CloseReason.FOREIGN_TLS) + foreign)
    assert sent(events).endswith(b"* BYE This is an IMAP server\r\n")
    assert events[-1] == Close(reason)
    assert core.state is State.CLOSED


@pytest.mark.parametrize(
    ("first", "reply"),
    [
        (b"a1 FROBNICATE\r\n", b"a1 BAD Unknown command\r\n"),
        (b"USER alice\r\n", b"USER BAD Unknown command\r\n"),
        (b"* OK hello\r\n", b"* BAD Invalid tag\r\n"),
        (b"a1\r\n", b"* BAD Missing command\r\n"),
    ],
)
def test_an_unknown_first_command_is_bad_and_the_session_goes_on(
    first: bytes, reply: bytes
) -> None:
    """RFC 9051 and Dovecot, nginx: BAD, counted by max_errors, not a guess that closes."""
    events, core = exchange(first + b"a NOOP\r\n")
    assert sent(events) == reply + b"a OK NOOP completed\r\n"
    assert core.state is State.COMMAND


def test_a_first_command_that_is_imap_but_wrong_is_only_bad() -> None:
    events, _ = exchange(b"a SELECT INBOX\r\nb LOGIN\r\nc NOOP\r\n")
    assert sent(events) == (
        b"a BAD Command not allowed before login\r\nb BAD Syntax error\r\nc OK NOOP completed\r\n"
    )


# --- limits ------------------------------------------------------------------------------------

SMALL = {"max_line": 64, "max_literal": 16}


def test_line_too_long() -> None:
    events, core = exchange(b"n NOOP\r\na LOGIN " + b"x" * 80 + b" y\r\n", **SMALL)
    assert sent(events) == b"n OK NOOP completed\r\n* BYE Line too long\r\n"
    assert events[-1] == Close(CloseReason.LINE_TOO_LONG)
    assert core.state is State.CLOSED


def test_endless_line_without_newline() -> None:
    events, _ = exchange(b"a" * 100, **SMALL)
    assert events == [Send(b"* BYE Line too long\r\n"), Close(CloseReason.LINE_TOO_LONG)]


def test_synchronising_literal_too_large_is_refused_before_buffering() -> None:
    events, core = exchange(b"a LOGIN alice {17}\r\nb NOOP\r\n", **SMALL)
    assert sent(events) == b"a BAD Literal too large\r\nb OK NOOP completed\r\n"
    assert core.state is State.COMMAND


@pytest.mark.parametrize("header", [b"{17+}", b"{" + b"9" * 30 + b"+}"])
def test_non_synchronising_literal_too_large_is_fatal(header: bytes) -> None:
    events, _ = exchange(b"a LOGIN alice " + header + b"\r\n" + b"x" * 17 + b"\r\n", **SMALL)
    assert events == [Send(b"* BYE Literal too large\r\n"), Close(CloseReason.LITERAL_TOO_LARGE)]


def test_literal_of_exactly_the_limit_is_read() -> None:
    creds, _, _ = login(
        b"a LOGIN {16+}\r\n" + b"u" * 16 + b" {16}\r\n" + b"p" * 16 + b"\r\n", **SMALL
    )
    assert (creds.user, creds.secret.reveal()) == ("u" * 16, "p" * 16)


def test_a_command_is_capped_as_a_whole() -> None:
    # ID may carry many literals; together they may not pass one line plus two literals.
    params = b" ".join([b"{16+}\r\n" + b"k" * 16 + b' "v"'] * 6)
    events, _ = exchange(b"i ID (" + params + b")\r\n", **SMALL)
    assert events[-1] == Close(CloseReason.LITERAL_TOO_LARGE)


def test_syntax_error_after_non_synchronising_literal_is_fatal() -> None:
    events, core = exchange(b"n NOOP\r\ni ID ({3+}\r\nabc)\r\nj NOOP\r\n")
    assert sent(events) == (
        b"n OK NOOP completed\r\ni BAD Syntax error\r\n"
        b"* BYE Syntax error after a non-synchronising literal\r\n"
    )
    assert core.state is State.CLOSED


def test_non_synchronising_literal_on_a_command_without_strings_is_fatal() -> None:
    events, _ = exchange(b"n NOOP\r\nc CAPABILITY {3+}\r\nabc\r\n")
    assert sent(events).endswith(
        b"c BAD Syntax error\r\n* BYE Syntax error after a non-synchronising literal\r\n"
    )


# --- pipelining and the login outcome ----------------------------------------------------------

PIPELINE = b"a CAPABILITY\r\nb NOOP\r\nc LOGIN alice secret\r\nd NOOP\r\ne LOGOUT\r\n"


def test_pipelined_commands_stop_at_the_login() -> None:
    events, core = exchange(PIPELINE)
    assert sent(events) == (
        b"* CAPABILITY " + CAPS + b"\r\na OK CAPABILITY completed\r\nb OK NOOP completed\r\n"
    )
    assert isinstance(events[-1], Authenticate)
    assert core.receive(b"f NOOP\r\n") == []  # held, not read, until the outcome is known


@pytest.mark.parametrize("way", WAYS)
def test_logged_in_hands_over_pipelined_bytes(way: str) -> None:
    core = make()
    feed(core, PIPELINE, way)
    assert core.finish_login(LoggedIn(OK_REPLY)) == [Send(b"c " + OK_REPLY + b"\r\n")]
    assert core.state is State.LOGGED_IN
    expected = b"d NOOP\r\ne LOGOUT\r\n" + (b"Z" if way == "trailing" else b"")
    assert core.trailing == expected


def test_rejected_login_goes_on_with_pipelined_commands() -> None:
    core = make()
    core.receive(PIPELINE)
    events = core.finish_login(Rejected("Wrong\r\n* OK injected \u00e9 password"))
    events += core.drain()  # the driver reads the pipelined commands one by one
    assert events == [
        Send(b"c NO [AUTHENTICATIONFAILED] Wrong* OK injected  password\r\n"),
        Send(b"d OK NOOP completed\r\n"),
        Send(b"* BYE Logging out\r\ne OK LOGOUT completed\r\n"),
        Close(CloseReason.LOGOUT),
    ]


def test_rejected_message_is_bounded_and_has_a_default() -> None:
    core = make()
    core.receive(b"a LOGIN alice x\r\n")
    reply = sent(core.finish_login(Rejected("x" * 500)))
    assert reply == b"a NO [AUTHENTICATIONFAILED] " + b"x" * 200 + b"\r\n"
    core.receive(b"b LOGIN alice y\r\n")
    assert sent(core.finish_login(Rejected("\r\n"))) == (
        b"b NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    )


def test_attempts_count_up_and_failed_logins_are_capped() -> None:
    core = make(max_auth_attempts=3)
    first = only_creds(core.receive(b"a LOGIN alice x\r\n"))
    core.finish_login(Unavailable())  # a temporary failure counts too: one rule everywhere
    second = only_creds(core.receive(b"b AUTHENTICATE PLAIN " + PLAIN + b"\r\n"))
    core.finish_login(Rejected("no"))
    third = only_creds(core.receive(b"c LOGIN alice z\r\nd NOOP\r\n"))
    assert [first.attempt, second.attempt, third.attempt] == [1, 2, 3]
    events = core.finish_login(Rejected("no"))
    assert events == [
        Send(b"c NO [AUTHENTICATIONFAILED] no\r\n* BYE Too many failed logins\r\n"),
        Close(CloseReason.TOO_MANY_FAILURES),
    ]
    assert core.state is State.CLOSED


def test_unavailable_is_a_temporary_failure() -> None:
    core = make()
    core.receive(b"a LOGIN alice x\r\nb NOOP\r\n")
    assert core.finish_login(Unavailable()) + core.drain() == [
        Send(b"a NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"),
        Send(b"b OK NOOP completed\r\n"),
    ]
    assert core.state is State.COMMAND


def test_after_login_the_core_reads_nothing() -> None:
    core = make()
    core.receive(b"a LOGIN alice x\r\nb NOOP\r\n")
    core.finish_login(LoggedIn(OK_REPLY))
    assert core.receive(b"c NOOP\r\n") == []  # the relay owns the connection now
    assert core.trailing == b"b NOOP\r\n"


def test_too_much_input_while_authenticating_closes() -> None:
    core = make(max_pipelined=80)
    core.receive(b"a LOGIN alice x\r\n")
    assert core.receive(b"b" * 80) == []
    assert core.receive(b"b") == [
        Send(b"* BYE Too much input while logging in\r\n"),
        Close(CloseReason.FLOODED),
    ]
    assert core.finish_login(Rejected("no")) == []


def test_eof_while_authenticating() -> None:
    core = make()
    core.receive(b"a LOGIN alice x\r\n")
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.finish_login(LoggedIn(OK_REPLY)) == []


# --- secrets and structure ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b'a LOGIN alice "s3cr3t-pw',
        b"a LOGIN alice s3cr3t-pw extra",
        b"a LOGIN alice s3cr3t-pw(",
        b"a LOGIN alice {9+}\r\ns3cr3t-pw x",
        b"a AUTHENTICATE PLAIN s3cr3t-pw!",
        b"s3cr3t-pw+ NOOP",
        b"s3cr3t-pw",  # a SASL response sent without waiting for "+"
        b"a LOGIN alice {9}\r\ns3cr3t-pw(",
    ],
)
def test_no_reply_repeats_a_password(data: bytes) -> None:
    events, _ = exchange(b"n NOOP\r\n" + data + b"\r\n")
    assert b"s3cr3t-pw" not in sent(events)
    assert sent(events).startswith(b"n OK NOOP completed\r\n")


def test_events_compare_only_with_secrets_revealed() -> None:
    # feeding.comparable exists because Secret has no __eq__; make sure it sees the secret.
    a = comparable(make().receive(b"a LOGIN alice x\r\n"))
    b = comparable(make().receive(b"a LOGIN alice y\r\n"))
    assert a != b


def test_command_table_matches_the_handlers() -> None:
    assert frozenset(imap._COMMANDS) == imap.PRE_AUTH_COMMANDS
    assert imap.LITERAL_COMMANDS <= imap.PRE_AUTH_COMMANDS
    assert not imap.PRE_AUTH_COMMANDS & imap.POST_AUTH_COMMANDS


PROTOCOLS = Path(imap.__file__).parent
BANNED = {"asyncio", "socket", "ssl", "time"}


@pytest.mark.parametrize("module", ["imap.py", "imapwire.py"])
def test_core_imports_no_io(module: str) -> None:
    tree = ast.parse((PROTOCOLS / module).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & BANNED


def test_importing_the_core_loads_no_io_module() -> None:
    # `time` is loaded by the interpreter itself, so only the others are checked at run time.
    code = (
        "import sys, mailgate.protocols.imap;"
        "print(sorted({'asyncio', 'socket', 'ssl', 'selectors'} & set(sys.modules)))"
    )
    src = str(PROTOCOLS.parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src},
    )
    assert result.stdout.strip() == "[]"


def rfc2971_largest_id() -> bytes:
    """What Dovecot's imaptest `id` group sends: 30 pairs, 30-octet fields and 1024-octet
    values, RFC 2971 3.3's limits, on one line of about 31.8 KB."""
    pairs = [b'"%s" "%s"' % (b"f%029d" % i, b"v" * 1024) for i in range(30)]
    return b"a ID (" + b" ".join(pairs) + b")\r\n"


def test_the_largest_id_rfc_2971_allows_is_accepted() -> None:
    line = rfc2971_largest_id()
    assert len(line) > 31_000
    core = make()
    assert sent(core.receive(line + b"b NOOP\r\n")) == (
        b"* ID NIL\r\na OK ID completed\r\nb OK NOOP completed\r\n"
    )


def test_the_pre_auth_line_limit_is_a_setting() -> None:
    events = make(max_line=8192).receive(rfc2971_largest_id())
    assert events == [Send(b"* BYE Line too long\r\n"), Close(CloseReason.LINE_TOO_LONG)]
