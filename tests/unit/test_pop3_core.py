"""The POP3 pre-auth core, bytes in and events out.

Every exchange goes through `feed`, which runs it three ways (whole, one byte at a time, and
followed by an unfinished line) and insists that all three give the same events and state.
"""

from __future__ import annotations

import base64
import dataclasses

import pytest

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
from mailgate.protocols.policy import MAX_PIPELINED, PreAuthPolicy
from mailgate.protocols.pop3 import Pop3Core
from mailgate.values import CloseReason, Method

SALT = "<1234.5678@mail.example>"
POLICY = PreAuthPolicy(
    mechanisms=("user", "apop", "plain", "login", "cram-md5"),
    capabilities=("TOP", "UIDL", "PIPELINING", "RESP-CODES", "AUTH-RESP-CODE"),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="mailgate ready",
)
DIGEST = "c4c9334bac560ecc979e58001b3e22fb"
PARTIAL = b"NOO"  # an unfinished line: must change nothing


def make(**changes: object) -> Pop3Core:
    return Pop3Core(dataclasses.replace(POLICY, **changes), SALT)  # type: ignore[arg-type]


def feed(data: bytes, **changes: object) -> tuple[list[Event], Pop3Core]:
    """Feed `data` whole, byte by byte, and with a partial line after it; all must agree."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))], [data + PARTIAL]]
    outcomes = []
    for chunks in ways:
        core = make(**changes)
        events: list[Event] = []
        for chunk in chunks:
            events += core.receive(chunk)
        outcomes.append((events, core.state, core))
    first_events, first_state, first_core = outcomes[0]  # the core fed whole, nothing after
    for events, state, _ in outcomes[1:]:
        assert comparable(events) == comparable(first_events)
        assert state is first_state
    return first_events, first_core


def comparable(events: list[Event]) -> list[object]:
    """Events with secrets revealed: `Secret` compares only through `equals`, never with ==."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Authenticate):
            creds = event.credentials
            out.append(
                ("auth", creds.method, creds.user, creds.secret.reveal(), creds.salt, creds.attempt)
            )
        else:
            out.append(event)
    return out


def wire(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def creds_of(events: list[Event]):
    found = [e.credentials for e in events if isinstance(e, Authenticate)]
    assert len(found) == 1
    return found[0]


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


# --- greeting and CAPA ---------------------------------------------------------------------------


def test_greeting_carries_apop_timestamp_only_when_apop_is_enabled():
    assert make().greet() == [Send(b"+OK mailgate ready " + SALT.encode() + b"\r\n")]
    assert make(mechanisms=("user",)).greet() == [Send(b"+OK mailgate ready\r\n")]


def test_capa_lists_policy_user_sasl_and_stls():
    events, core = feed(b"CAPA\r\n")
    assert wire(events) == (
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nPIPELINING\r\nRESP-CODES\r\n"
        b"AUTH-RESP-CODE\r\nUSER\r\nSASL PLAIN LOGIN CRAM-MD5\r\nSTLS\r\n.\r\n"
    )
    assert core.state is State.COMMAND


def test_capa_without_user_or_sasl_or_stls():
    events, _ = feed(b"capa\r\n", mechanisms=("apop",), starttls=False, capabilities=())
    assert wire(events) == b"+OK Capability list follows\r\n.\r\n"


def test_capa_leaves_out_stls_when_tls_is_active_and_never_says_implementation():
    events, _ = feed(b"CAPA\r\n", tls_active=True, capabilities=("IMPLEMENTATION x", "STLS"))
    assert wire(events) == (
        b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n.\r\n"
    )


def test_capa_hides_logins_until_tls_when_starttls_only():
    events, core = feed(b"CAPA\r\nSTLS\r\n", starttls_only=True, capabilities=())
    assert wire(events) == (
        b"+OK Capability list follows\r\nSTLS\r\n.\r\n+OK Begin TLS negotiation\r\n"
    )
    core.tls_started()
    assert wire(core.receive(b"CAPA\r\n")) == (
        b"+OK Capability list follows\r\nUSER\r\nSASL PLAIN LOGIN CRAM-MD5\r\n.\r\n"
    )


def test_capa_with_argument_is_a_syntax_error():
    events, _ = feed(b"CAPA x\r\n")
    assert events == [Send(b"-ERR Syntax error\r\n")]


# --- USER / PASS ---------------------------------------------------------------------------------


def test_user_pass_asks_the_authenticator():
    events, core = feed(b"USER alice@example.com\r\nPASS hunter2\r\n")
    assert events[0] == Send(b"+OK\r\n")
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (
        Method.PLAIN,
        "alice@example.com",
        "hunter2",
    )
    assert creds.salt is None and creds.attempt == 1
    assert core.state is State.AUTHENTICATING


def test_commands_are_case_insensitive():
    events, _ = feed(b"user bob\r\npAsS pw\r\n")
    assert creds_of(events).user == "bob"


def test_pass_keeps_spaces_inside_the_password():
    events, _ = feed(b'USER bob\r\nPASS  bob secret "quoted" \r\n')
    assert creds_of(events).secret.reveal() == ' bob secret "quoted" '


def test_user_name_may_hold_spaces_like_nginx():
    events, _ = feed(b"USER bob smith\r\nPASS x\r\n")
    assert creds_of(events).user == "bob smith"


def test_pass_without_user_is_refused():
    events, core = feed(b"PASS hunter2\r\n")
    assert events == [Send(b"-ERR No user name given\r\n")]
    assert core.state is State.COMMAND


def test_second_user_replaces_the_first():
    events, _ = feed(b"USER a\r\nUSER b\r\nPASS x\r\n")
    assert creds_of(events).user == "b"


@pytest.mark.parametrize("line", [b"USER\r\n", b"USER \r\n", b"USER a\0b\r\n", b"USER a\rb\r\n"])
def test_bad_user_is_a_syntax_error(line):
    events, core = feed(line)
    assert events == [Send(b"-ERR Syntax error\r\n")]
    assert core.state is State.COMMAND


def test_empty_pass_is_refused_and_user_is_forgotten():
    events, core = feed(b"USER a\r\nPASS\r\nPASS x\r\n")
    assert wire(events) == b"+OK\r\n-ERR Syntax error\r\n-ERR No user name given\r\n"
    assert core.state is State.COMMAND


def test_user_refused_when_not_enabled():
    events, _ = feed(b"USER a\r\n", mechanisms=("apop",))
    assert events == [Send(b"-ERR Command not enabled\r\n")]


def test_non_utf8_password_is_kept_byte_exact():
    events, _ = feed(b"USER a\r\nPASS p\xe4ss\r\n")
    secret = creds_of(events).secret.reveal()
    assert secret.encode("utf-8", "surrogateescape") == b"p\xe4ss"


# --- APOP ----------------------------------------------------------------------------------------


def test_apop_sends_digest_lower_case_and_the_greeting_salt():
    events, core = feed(b"APOP alice " + DIGEST.upper().encode() + b"\r\n")
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal(), creds.salt) == (
        Method.APOP,
        "alice",
        DIGEST,
        SALT,
    )
    assert core.state is State.AUTHENTICATING


@pytest.mark.parametrize(
    "line",
    [b"APOP\r\n", b"APOP alice\r\n", b"APOP alice abc\r\n", b"APOP alice " + b"g" * 32 + b"\r\n"],
)
def test_apop_malformed(line):
    events, _ = feed(line)
    assert events == [Send(b"-ERR Syntax error\r\n")]


def test_apop_refused_when_not_enabled():
    events, _ = feed(b"APOP alice " + DIGEST.encode() + b"\r\n", mechanisms=("user",))
    assert events == [Send(b"-ERR Command not enabled\r\n")]


# --- AUTH ----------------------------------------------------------------------------------------


def test_auth_without_arguments_lists_enabled_mechanisms():
    events, _ = feed(b"AUTH\r\n", mechanisms=("user", "plain", "cram-md5"))
    assert wire(events) == b"+OK Supported mechanisms follow\r\nPLAIN\r\nCRAM-MD5\r\n.\r\n"


def test_auth_plain_with_initial_response():
    events, core = feed(b"AUTH PLAIN " + b64(b"\0alice\0two words") + b"\r\n")
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (Method.PLAIN, "alice", "two words")
    assert core.state is State.AUTHENTICATING


def test_auth_plain_with_a_challenge():
    events, _ = feed(b"auth plain\r\n" + b64(b"zid\0alice\0pw") + b"\r\n")
    assert events[0] == Send(b"+ \r\n")
    assert creds_of(events).user == "alice"


@pytest.mark.parametrize("line", [b"AUTH PLAIN =\r\n", b"AUTH PLAIN \r\n"])
def test_auth_plain_empty_initial_response_is_no_initial_response(line):
    """RFC 5034 4: "=" is an empty initial response; nothing after the space is read the same
    way (mutt sends it), and both get the mechanism's first challenge, as Dovecot answers."""
    events, core = feed(line)
    assert events == [Send(b"+ \r\n")]
    assert core.state is State.SASL


def test_auth_login_without_initial_response():
    data = b"AUTH LOGIN\r\n" + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\n"
    events, _ = feed(data)
    assert wire(events) == b"+ VXNlcm5hbWU6\r\n+ UGFzc3dvcmQ6\r\n"
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (Method.LOGIN, "alice", "pw")


def test_auth_login_with_initial_response():
    events, _ = feed(b"AUTH LOGIN " + b64(b"alice") + b"\r\n" + b64(b"pw") + b"\r\n")
    assert wire(events) == b"+ UGFzc3dvcmQ6\r\n"
    assert creds_of(events).user == "alice"


def test_auth_cram_md5_challenges_with_the_salt():
    data = b"AUTH CRAM-MD5\r\n" + b64(b"alice " + DIGEST.upper().encode()) + b"\r\n"
    events, _ = feed(data)
    assert events[0] == Send(b"+ " + b64(SALT.encode()) + b"\r\n")
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal(), creds.salt) == (
        Method.CRAM_MD5,
        "alice",
        DIGEST,
        SALT,
    )


def test_auth_cram_md5_refuses_an_initial_response():
    events, _ = feed(b"AUTH CRAM-MD5 " + b64(b"alice " + DIGEST.encode()) + b"\r\n")
    assert events == [Send(b"-ERR Invalid SASL response\r\n")]


@pytest.mark.parametrize(
    "data",
    [b"AUTH PLAIN\r\n*\r\n", b"AUTH LOGIN\r\n*\r\n", b"AUTH LOGIN\r\nYWxpY2U=\r\n*\r\n"],
)
def test_auth_cancel_returns_to_authorization(data):
    events, core = feed(data + b"CAPA\r\n")
    assert Send(b"-ERR Authentication cancelled\r\n") in events
    assert wire(events).endswith(b".\r\n")  # CAPA answered: a command again
    assert core.state is State.COMMAND


def test_auth_bad_base64():
    events, core = feed(b"AUTH PLAIN\r\n!!!\r\nAUTH PLAIN not-base64\r\n")
    assert wire(events) == b"+ \r\n-ERR Invalid SASL response\r\n-ERR Invalid SASL response\r\n"
    assert core.state is State.COMMAND


@pytest.mark.parametrize("line", [b"AUTH GSSAPI\r\n", b"AUTH LOGIN\r\n"])
def test_auth_unknown_or_disabled_mechanism(line):
    events, _ = feed(line, mechanisms=("user", "plain"))
    assert events == [Send(b"-ERR Unsupported authentication mechanism\r\n")]


@pytest.mark.parametrize("line", [b"AUTH PLAIN a b\r\n", b"AUTH PLAIN = x\r\n"])
def test_auth_malformed_arguments(line):
    events, _ = feed(line)
    assert events == [Send(b"-ERR Syntax error\r\n")]


# --- STLS ----------------------------------------------------------------------------------------


def test_stls_discards_pipelined_plaintext():
    events, core = feed(b"STLS\r\nUSER evil\r\nPASS evil\r\n")
    assert events == [Send(b"+OK Begin TLS negotiation\r\n"), StartTLS()]
    assert core.state is State.TLS_PENDING
    assert core.receive(b"USER late\r\n") == []
    assert core.tls_started() == []
    assert core.state is State.COMMAND
    assert core.receive(b"PASS x\r\n") == [Send(b"-ERR No user name given\r\n")]


def test_stls_forgets_user():
    _, core = feed(b"USER a\r\nSTLS\r\n")
    core.tls_started()
    assert core.receive(b"PASS x\r\n") == [Send(b"-ERR No user name given\r\n")]


def test_stls_not_offered_or_already_active():
    assert feed(b"STLS\r\n", starttls=False)[0] == [Send(b"-ERR Command not enabled\r\n")]
    active = feed(b"STLS\r\n", tls_active=True)[0]
    assert active == [Send(b"-ERR Command not permitted when TLS active\r\n")]
    _, core = feed(b"STLS\r\n")
    core.tls_started()
    assert core.receive(b"STLS\r\n") == [Send(b"-ERR Command not permitted when TLS active\r\n")]


def test_tls_started_outside_tls_pending_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        make().tls_started()


PLAINTEXT = Send(b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n")


@pytest.mark.parametrize(
    "line",
    [b"USER a\r\n", b"APOP a " + DIGEST.encode() + b"\r\n", b"AUTH PLAIN\r\n", b"AUTH\r\n"],
)
def test_starttls_only_refuses_logins_before_tls(line):
    events, core = feed(line, starttls_only=True)
    assert events == [PLAINTEXT]
    assert core.state is State.COMMAND


def test_starttls_only_allows_logins_after_tls():
    _, core = feed(b"STLS\r\n", starttls_only=True)
    core.tls_started()
    events = core.receive(b"USER a\r\nPASS b\r\n")
    assert creds_of(events).user == "a"


def test_starttls_only_on_implicit_tls_allows_logins():
    events, _ = feed(b"USER a\r\nPASS b\r\n", starttls_only=True, tls_active=True)
    assert creds_of(events).user == "a"


# --- QUIT, wrong-state and unknown commands, limits ----------------------------------------------


def test_quit_says_bye_and_ignores_the_rest():
    events, core = feed(b"QUIT\r\nUSER a\r\n")
    assert events == [Send(b"+OK Bye\r\n"), Close(CloseReason.LOGOUT)]
    assert core.state is State.CLOSED
    assert core.receive(b"CAPA\r\n") == []


@pytest.mark.parametrize("command", [b"NOOP", b"STAT", b"LIST", b"RETR 1", b"UIDL", b"TOP 1 2"])
def test_transaction_commands_are_refused_before_login(command):
    events, core = feed(command + b"\r\n")
    assert events == [Send(b"-ERR Command not valid in this state\r\n")]
    assert core.state is State.COMMAND


@pytest.mark.parametrize(
    ("foreign", "reason"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n", CloseReason.FOREIGN_HTTP),
        (b"EHLO client.example\r\n", CloseReason.FOREIGN_SMTP),
        (b"\x16\x03\x01\x02\x00\x01\n", CloseReason.FOREIGN_TLS),
    ],
)
def test_another_protocol_closes_at_once(foreign, reason):
    events, core = feed(foreign)
    assert events == [Send(b"-ERR This is a POP3 server\r\n"), Close(reason)]
    assert core.state is State.CLOSED


def test_an_unknown_first_command_is_only_an_error():
    events, core = feed(b"FROB\r\nCAPA\r\n")
    assert wire(events).startswith(b"-ERR Unknown command\r\n+OK Capability list follows\r\n")
    assert core.state is State.COMMAND


def test_unknown_commands_spend_the_error_budget():
    # The fifth bad command (NOOP counts too) is answered with the closing reply, as nginx does.
    events, core = feed(b"CAPA\r\n" + b"XYZZY\r\n" * 4 + b"NOOP\r\n" + b"CAPA\r\n", max_errors=5)
    sends = [e.data for e in events if isinstance(e, Send)]
    assert sends[1:] == [b"-ERR Unknown command\r\n"] * 4 + [b"-ERR Too many invalid commands\r\n"]
    assert events[-1] == Close(CloseReason.TOO_MANY_ERRORS)
    assert core.state is State.CLOSED


def test_longest_line_is_accepted_and_one_more_byte_closes():
    ok, _ = feed(b"USER " + b"a" * 94 + b"\r\n", max_line=100)
    assert ok == [Send(b"+OK\r\n")]
    events, core = feed(b"USER " + b"a" * 95 + b"\r\n", max_line=100)
    assert events == [Send(b"-ERR Line too long\r\n"), Close(CloseReason.LINE_TOO_LONG)]
    assert core.state is State.CLOSED


def test_endless_line_without_crlf_closes():
    events, _ = feed(b"A" * 300, max_line=255)
    assert events == [Send(b"-ERR Line too long\r\n"), Close(CloseReason.LINE_TOO_LONG)]


def test_eof_closes():
    core = make()
    assert core.receive(b"CAP") == []
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.state is State.CLOSED


def test_replies_never_echo_the_client():
    events, _ = feed(b"CAPA\r\nUSER alice\r\nPASS s3cret\r\n")
    assert b"alice" not in wire(events) and b"s3cret" not in wire(events)


# --- finish_login ---------------------------------------------------------------------------------


def test_logged_in_passes_the_backend_reply_and_hands_over_pipelined_bytes():
    events, core = feed(b"USER a\r\nPASS b\r\nSTAT\r\nLIST\r\n")
    assert wire(events) == b"+OK\r\n"
    core.receive(b"RETR 1\r\n")
    assert core.finish_login(LoggedIn(b"+OK Logged in.")) == [Send(b"+OK Logged in.\r\n")]
    assert core.state is State.LOGGED_IN
    assert core.trailing == b"STAT\r\nLIST\r\nRETR 1\r\n"  # feed returns the core fed whole


def test_trailing_is_exact():
    core = make()
    core.receive(b"USER a\r\nPASS b\r\nSTAT\r\nLI")
    core.receive(b"ST\r\n")
    core.finish_login(LoggedIn(b"+OK"))
    assert core.trailing == b"STAT\r\nLIST\r\n"
    assert core.receive(b"QUIT\r\n") == []  # after login the relay owns the connection
    assert core.trailing == b"STAT\r\nLIST\r\n"


def test_nothing_is_trailing_without_pipelining():
    _, core = feed(b"APOP a " + DIGEST.encode() + b"\r\n")
    core.finish_login(LoggedIn(b"+OK"))
    assert core.trailing == b""


def test_rejected_shows_sanitised_message_and_forgets_user():
    _, core = feed(b"USER a\r\nPASS b\r\n")
    events = core.finish_login(Rejected("bad\r\n-ERR injected\x00\xe9" + "x" * 300))
    reply = wire(events)
    assert reply.startswith(b"-ERR [AUTH] bad  -ERR injected  xxx")
    assert reply.endswith(b"\r\n") and reply.count(b"\r\n") == 1
    assert len(reply) == len(b"-ERR [AUTH] ") + 200 + 2
    assert core.state is State.COMMAND
    assert core.receive(b"PASS b\r\n") == [Send(b"-ERR No user name given\r\n")]


def test_rejected_with_empty_message_has_a_fixed_text():
    _, core = feed(b"USER a\r\nPASS b\r\n")
    assert core.finish_login(Rejected("\r\n")) == [Send(b"-ERR [AUTH] Authentication failed\r\n")]


def test_unavailable_is_a_temporary_failure():
    _, core = feed(b"USER a\r\nPASS b\r\n")
    assert core.finish_login(Unavailable()) == [
        Send(b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n")
    ]
    assert core.state is State.COMMAND


def test_commands_pipelined_behind_a_failed_login_are_answered():
    core = make()
    assert wire(core.receive(b"USER a\r\nPASS b\r\nUSER c\r\nPASS d\r\n")) == b"+OK\r\n"
    events = core.finish_login(Rejected("no")) + core.drain()
    assert wire(events) == b"-ERR [AUTH] no\r\n+OK\r\n"
    creds = creds_of(events)
    assert (creds.user, creds.attempt) == ("c", 2)


def test_too_many_failed_logins_close():
    core = make(max_auth_attempts=2)
    core.receive(b"USER a\r\nPASS b\r\n")
    core.finish_login(Unavailable())
    core.receive(b"USER a\r\nPASS b\r\n")
    events = core.finish_login(Rejected("no"))
    assert events == [Send(b"-ERR [AUTH] no\r\n"), Close(CloseReason.TOO_MANY_FAILURES)]
    assert core.state is State.CLOSED


def test_finish_login_after_the_client_left_does_nothing():
    _, core = feed(b"USER a\r\nPASS b\r\n")
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.finish_login(LoggedIn(b"+OK")) == []


def test_finish_login_outside_authenticating_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        make().finish_login(Unavailable())


def test_pipelining_during_authentication_is_bounded():
    _, core = feed(b"USER a\r\nPASS b\r\n")
    assert core.receive(b"NOOP\r\n" * (MAX_PIPELINED // 6)) == []
    events = core.receive(b"NOOP\r\n" * 2)
    assert events == [Send(b"-ERR Too much pipelined input\r\n"), Close(CloseReason.FLOODED)]
    assert core.finish_login(LoggedIn(b"+OK")) == []


def test_pipelined_session_split_at_every_byte():
    data = b"CAPA\r\nUSER a\r\nCAPA\r\nPASS b c\r\nSTAT\r\n"
    expected = comparable(make().receive(data))
    for cut in range(1, len(data)):
        core = make()
        assert comparable(core.receive(data[:cut]) + core.receive(data[cut:])) == expected
        core.finish_login(LoggedIn(b"+OK"))
        assert core.trailing == b"STAT\r\n"
    assert expected[-1] == ("auth", Method.PLAIN, "a", "b c", None, 1)


def test_capa_between_user_and_pass_keeps_the_user():
    events, _ = feed(b"USER a\r\nCAPA\r\nPASS b\r\n")
    assert creds_of(events).user == "a"


def test_auth_or_apop_after_user_forgets_the_user():
    events, _ = feed(b"USER a\r\nAUTH PLAIN\r\n*\r\nPASS b\r\n")
    assert wire(events).endswith(b"-ERR No user name given\r\n")
