"""The SMTP pre-auth core, bytes in and events out.

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
from mailgate.protocols.smtp import MAX_COMMAND_LINE, SmtpCore
from mailgate.values import CloseReason, Method

SALT = "<1234.5678@mx.example>"
SUBMISSION = PreAuthPolicy(
    mechanisms=("plain", "login", "cram-md5"),
    capabilities=("SIZE 35882577", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"),
    starttls=True,
    tls_active=False,
    starttls_only=False,
    greeting="mailgate ready",
    hostname="mx.example",
)
RELAY = dataclasses.replace(SUBMISSION, mechanisms=("none",))
DIGEST = "c4c9334bac560ecc979e58001b3e22fb"
PARTIAL = b"NOO"  # an unfinished line: must change nothing

EHLO_REPLY = (
    b"250-mx.example\r\n250-SIZE 35882577\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-STARTTLS\r\n"
    b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n"
)
EHLO_RELAY_REPLY = (
    b"250-mx.example\r\n250-SIZE 35882577\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250 STARTTLS\r\n"
)


def make(policy: PreAuthPolicy = SUBMISSION, **changes: object) -> SmtpCore:
    return SmtpCore(dataclasses.replace(policy, **changes), SALT)  # type: ignore[arg-type]


def feed(
    data: bytes, policy: PreAuthPolicy = SUBMISSION, **changes: object
) -> tuple[list[Event], SmtpCore]:
    """Feed `data` whole, byte by byte, and with a partial line after it; all must agree."""
    ways = [[data], [data[i : i + 1] for i in range(len(data))], [data + PARTIAL]]
    outcomes = []
    for chunks in ways:
        core = make(policy, **changes)
        events: list[Event] = []
        for chunk in chunks:
            events += core.receive(chunk)
        outcomes.append((events, core.state))
        if len(outcomes) == 1:
            first_core = core
    first_events, first_state = outcomes[0]
    for events, state in outcomes[1:]:
        assert comparable(events) == comparable(first_events)
        assert state is first_state
    return first_events, first_core


def helo_of(core: SmtpCore) -> str | None:
    """The HELO name the core holds, as a login carries it to the backend (None: AUTH is
    refused for want of one)."""
    events = core.receive(b"AUTH PLAIN " + base64.b64encode(b"\0u\0p") + b"\r\n")
    found = [e.credentials.smtp_helo for e in events if isinstance(e, Authenticate)]
    return found[0] if found else None


def comparable(events: list[Event]) -> list[object]:
    """Events with secrets revealed: `Secret` compares only through `equals`, never with ==."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Authenticate):
            creds = event.credentials
            out.append(("auth", dataclasses.replace(creds, secret=None), creds.secret.reveal()))
        else:
            out.append(event)
    return out


def wire(events: list[Event]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def creds_of(events: list[Event]):
    found = [e.credentials for e in events if isinstance(e, Authenticate)]
    assert len(found) == 1
    return found[0]


def closes(events: list[Event]) -> bool:
    return any(isinstance(e, Close) for e in events)


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


PLAIN_IR = b"AUTH PLAIN " + b64(b"\0alice@example.com\0alice-secret") + b"\r\n"


# --- greeting ------------------------------------------------------------------------------------


def test_greeting_names_host_and_esmtp():
    assert make().greet() == [Send(b"220 mx.example ESMTP mailgate ready\r\n")]
    assert make(greeting="").greet() == [Send(b"220 mx.example ESMTP\r\n")]


def test_early_talker_is_refused_and_closed():
    core = make()
    events = core.early_talker()
    assert events[0] == Send(b"554 5.5.0 Improper use of SMTP command pipelining\r\n")
    assert isinstance(events[-1], Close)
    assert core.state is State.CLOSED
    assert core.receive(b"EHLO x\r\n") == []


# --- EHLO / HELO ---------------------------------------------------------------------------------


def test_ehlo_lists_hostname_capabilities_starttls_and_auth():
    events, core = feed(b"EHLO client.example\r\n")
    assert wire(events) == EHLO_REPLY
    assert core.state is State.COMMAND
    assert helo_of(core) == "client.example"


def test_ehlo_over_tls_leaves_out_starttls():
    events, _ = feed(b"ehlo c\r\n", tls_active=True, capabilities=("PIPELINING",))
    assert wire(events) == b"250-mx.example\r\n250-PIPELINING\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n"


def test_ehlo_hides_auth_until_tls_when_starttls_only():
    events, _ = feed(b"EHLO c\r\n", starttls_only=True, capabilities=())
    assert wire(events) == b"250-mx.example\r\n250 STARTTLS\r\n"
    events, _ = feed(b"EHLO c\r\n", starttls_only=True, tls_active=True, capabilities=())
    assert wire(events) == b"250-mx.example\r\n250 AUTH PLAIN LOGIN CRAM-MD5\r\n"


def test_ehlo_lists_only_enabled_mechanisms_and_never_repeats_core_keywords():
    events, _ = feed(
        b"EHLO c\r\n",
        mechanisms=("cram-md5", "plain"),
        capabilities=("AUTH GSSAPI", "STARTTLS", "8BITMIME"),
        starttls=False,
    )
    assert wire(events) == b"250-mx.example\r\n250-8BITMIME\r\n250 AUTH PLAIN CRAM-MD5\r\n"


def test_relay_listener_advertises_no_auth():
    events, _ = feed(b"EHLO c\r\n", RELAY)
    assert wire(events) == EHLO_RELAY_REPLY


def test_helo_answers_one_line():
    events, core = feed(b"HELO client.example\r\n")
    assert wire(events) == b"250 mx.example\r\n"
    assert helo_of(core) == "client.example"


@pytest.mark.parametrize(
    "line",
    [b"EHLO", b"EHLO ", b"HELO", b"EHLO two words", b"EHLO " + b"a" * 256, b"EHLO a\x01b"],
)
def test_ehlo_and_helo_need_one_sane_name(line):
    events, core = feed(line + b"\r\n")
    assert wire(events) == b"501 5.5.4 Invalid argument\r\n"
    assert helo_of(core) is None


def test_ehlo_accepts_an_address_literal_and_a_utf8_name():
    _, core = feed(b"EHLO [192.0.2.1]\r\n")
    assert helo_of(core) == "[192.0.2.1]"
    _, core = feed("EHLO bücher.example\r\n".encode())
    assert helo_of(core) == "bücher.example"


# --- STARTTLS ------------------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_forgets_ehlo():
    events, core = feed(b"EHLO c\r\nSTARTTLS\r\nAUTH PLAIN AGFAAGI=\r\n")
    assert wire(events) == EHLO_REPLY + b"220 2.0.0 Ready to start TLS\r\n"
    assert isinstance(events[-1], StartTLS)
    assert core.state is State.TLS_PENDING
    assert core.receive(b"MAIL FROM:<evil@example>\r\n") == []  # injected before the handshake
    assert core.tls_started() == []
    assert core.state is State.COMMAND
    # RFC 3207 4.2: the client must EHLO again; AUTH first is a bad sequence.
    assert wire(core.receive(b"AUTH PLAIN\r\n")) == b"503 5.5.1 Send HELO/EHLO first\r\n"
    reply = wire(core.receive(b"EHLO c\r\n"))
    assert b"STARTTLS" not in reply
    assert reply.endswith(b"250 AUTH PLAIN LOGIN CRAM-MD5\r\n")


def test_starttls_refusals():
    events, _ = feed(b"STARTTLS\r\n", starttls=False)
    assert wire(events) == b"454 4.7.0 TLS not available\r\n"
    events, _ = feed(b"STARTTLS\r\n", tls_active=True)
    assert wire(events) == b"503 5.5.1 TLS already active\r\n"
    events, _ = feed(b"STARTTLS now\r\n")
    assert wire(events) == b"501 5.5.4 Invalid argument\r\n"


def test_tls_started_outside_starttls_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        make().tls_started()


def test_relay_transaction_is_forgotten_after_starttls():
    core = make(RELAY)
    core.receive(b"EHLO c\r\nMAIL FROM:<a@b>\r\nSTARTTLS\r\n")
    core.tls_started()
    reply = core.receive(b"EHLO c\r\nRCPT TO:<x@y>\r\n")
    assert wire(reply).endswith(b"503 5.5.1 Need MAIL command\r\n")


# --- AUTH ----------------------------------------------------------------------------------------


def test_auth_plain_with_initial_response():
    events, core = feed(b"EHLO c\r\n" + PLAIN_IR)
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (
        Method.PLAIN,
        "alice@example.com",
        "alice-secret",
    )
    assert creds.attempt == 1
    assert core.state is State.AUTHENTICATING
    assert wire(events) == EHLO_REPLY


def test_auth_plain_without_initial_response_gets_an_empty_challenge():
    data = b"EHLO c\r\nAUTH PLAIN\r\n" + b64(b"\0bob\0pw") + b"\r\n"
    events, _ = feed(data)
    assert wire(events) == EHLO_REPLY + b"334 \r\n"
    assert creds_of(events).user == "bob"


def test_auth_login_asks_username_then_password():
    data = b"EHLO c\r\nAUTH LOGIN\r\n" + b64(b"carol") + b"\r\n" + b64(b"c pw") + b"\r\n"
    events, _ = feed(data)
    assert wire(events) == EHLO_REPLY + b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal()) == (Method.LOGIN, "carol", "c pw")


def test_auth_login_with_the_user_name_as_initial_response():
    data = b"EHLO c\r\nauth login " + b64(b"carol") + b"\r\n" + b64(b"pw") + b"\r\n"
    events, _ = feed(data)
    assert wire(events) == EHLO_REPLY + b"334 UGFzc3dvcmQ6\r\n"
    assert creds_of(events).user == "carol"


def test_auth_cram_md5_sends_the_salt_and_passes_it_on():
    data = b"EHLO c\r\nAUTH CRAM-MD5\r\n" + b64(b"dave " + DIGEST.encode()) + b"\r\n"
    events, _ = feed(data)
    assert wire(events) == EHLO_REPLY + b"334 " + b64(SALT.encode()) + b"\r\n"
    creds = creds_of(events)
    assert (creds.method, creds.user, creds.secret.reveal(), creds.salt) == (
        Method.CRAM_MD5,
        "dave",
        DIGEST,
        SALT,
    )


def test_auth_star_cancels():
    events, core = feed(b"EHLO c\r\nAUTH LOGIN\r\n*\r\n")
    assert (
        wire(events) == EHLO_REPLY + b"334 VXNlcm5hbWU6\r\n501 5.7.0 Authentication cancelled\r\n"
    )
    assert core.state is State.COMMAND


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"AUTH PLAIN not-base64!", b"501 5.5.2 Cannot decode response\r\n"),
        # An empty initial response is none: the first challenge, then "*" cancels.
        (b"AUTH PLAIN =\r\n*", b"334 \r\n501 5.7.0 Authentication cancelled\r\n"),
        (b"AUTH PLAIN \r\n*", b"334 \r\n501 5.7.0 Authentication cancelled\r\n"),
        (b"AUTH PLAIN " + b64(b"only-one-part"), b"501 5.5.2 Invalid authentication data\r\n"),
        (b"AUTH CRAM-MD5 " + b64(b"x"), b"501 5.5.2 Invalid authentication data\r\n"),
        (b"AUTH PLAIN a b", b"501 5.5.4 Invalid argument\r\n"),
        (b"AUTH", b"501 5.5.4 Invalid argument\r\n"),
        (b"AUTH GSSAPI", b"504 5.5.4 Unrecognized authentication type\r\n"),
    ],
)
def test_auth_errors(command, reply):
    events, core = feed(b"EHLO c\r\n" + command + b"\r\n")
    assert wire(events) == EHLO_REPLY + reply
    assert core.state is State.COMMAND


def test_auth_bad_continuation_goes_back_to_commands():
    events, core = feed(b"EHLO c\r\nAUTH LOGIN\r\n!!!\r\nNOOP\r\n")
    assert wire(events).endswith(b"501 5.5.2 Cannot decode response\r\n250 2.0.0 OK\r\n")
    assert core.state is State.COMMAND


def test_auth_before_ehlo_and_disabled_mechanisms():
    events, _ = feed(PLAIN_IR)
    assert wire(events) == b"503 5.5.1 Send HELO/EHLO first\r\n"
    events, _ = feed(b"EHLO c\r\n" + PLAIN_IR, mechanisms=("login",))
    assert wire(events).endswith(b"504 5.5.4 Unrecognized authentication type\r\n")
    events, _ = feed(b"EHLO c\r\n" + PLAIN_IR, RELAY)
    assert wire(events).endswith(b"502 5.5.1 AUTH not available\r\n")


def test_auth_in_cleartext_refused_when_starttls_only():
    events, _ = feed(b"EHLO c\r\n" + PLAIN_IR, starttls_only=True)
    assert wire(events).endswith(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
    events, _ = feed(b"EHLO c\r\n" + PLAIN_IR, starttls_only=True, tls_active=True)
    assert creds_of(events).user == "alice@example.com"


# --- the outcome of a login ----------------------------------------------------------------------


def authenticating(policy: PreAuthPolicy = SUBMISSION, after: bytes = b"", **changes: object):
    core = make(policy, **changes)
    events = core.receive(b"EHLO c\r\n" + PLAIN_IR + after)
    assert core.state is State.AUTHENTICATING, events
    return core


def test_logged_in_answers_235_and_hands_over_pipelined_bytes():
    core = authenticating(after=b"MAIL FROM:<alice@example.com>\r\n")
    core.receive(b"RCPT TO:<bob@example.org>\r\n")
    events = core.finish_login(LoggedIn(b"235 2.7.0 backend says ok"))
    assert events == [Send(b"235 2.7.0 Authentication successful\r\n")]
    assert core.state is State.LOGGED_IN
    assert core.trailing == b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\n"


def test_rejected_uses_the_default_code_and_sanitised_text():
    core = authenticating()
    events = core.finish_login(Rejected("Bad\r\n250 OK injected"))
    assert events == [Send(b"535 5.7.8 Bad  250 OK injected\r\n")]
    assert core.state is State.COMMAND


def test_rejected_passes_a_sane_error_code_only():
    core = authenticating()
    assert core.finish_login(Rejected("Slow down", "454 4.7.0")) == [
        Send(b"454 4.7.0 Slow down\r\n")
    ]
    core = authenticating()
    assert core.finish_login(Rejected("", "250 2.0.0\r\nX")) == [
        Send(b"535 5.7.8 Authentication failed\r\n")
    ]


def test_unavailable_is_a_temporary_failure():
    core = authenticating()
    assert core.finish_login(Unavailable()) == [
        Send(b"454 4.7.0 Temporary authentication failure\r\n")
    ]
    assert core.state is State.COMMAND


def test_commands_pipelined_behind_a_failed_auth_are_answered():
    core = authenticating(after=b"NOOP\r\n" + PLAIN_IR)
    events = core.finish_login(Rejected("no")) + core.drain()
    assert wire(events) == b"535 5.7.8 no\r\n250 2.0.0 OK\r\n"
    assert creds_of(events).attempt == 2


def test_too_many_failed_logins_close():
    core = authenticating(max_auth_attempts=2)
    core.finish_login(Rejected("no"))
    core.receive(PLAIN_IR)
    events = core.finish_login(Unavailable())
    assert events[0] == Send(b"454 4.7.0 Temporary authentication failure\r\n")
    assert isinstance(events[-1], Close)
    assert core.state is State.CLOSED


def test_finish_login_after_the_client_left_is_ignored():
    core = authenticating()
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.finish_login(LoggedIn(b"")) == []


def test_finish_login_outside_authenticating_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        make().finish_login(Unavailable())


def test_flooding_while_the_authenticator_decides_closes():
    core = authenticating()
    events = core.receive(b"RCPT TO:<x@y>\r\n" * (MAX_PIPELINED // 15 + 1))
    assert events[0] == Send(b"421 4.7.0 Too much pipelined input, closing connection\r\n")
    assert isinstance(events[-1], Close)


def test_after_login_the_core_reads_nothing():
    core = authenticating()
    core.finish_login(LoggedIn(b""))
    assert core.receive(b"MAIL FROM:<>\r\n") == []  # the relay owns the connection now
    assert core.trailing == b""


# --- relay: auth none ----------------------------------------------------------------------------

RELAY_SESSION = (
    b"EHLO mx.sender.example\r\n"
    b"MAIL FROM:<someone@sender.example>\r\n"
    b"RCPT TO:<alice@example.com>\r\n"
)


def test_relay_collects_helo_from_and_to_as_nginx_sends_them():
    events, core = feed(RELAY_SESSION, RELAY)
    assert wire(events) == EHLO_RELAY_REPLY + b"250 2.1.0 OK\r\n"
    creds = creds_of(events)
    assert creds.method is Method.NONE
    assert creds.user == ""
    assert creds.secret.reveal() == ""
    assert creds.smtp_helo == "mx.sender.example"
    assert creds.smtp_from == "MAIL FROM:<someone@sender.example>"
    assert creds.smtp_to == "RCPT TO:<alice@example.com>"
    assert creds.envelope == (  # what the backend login replays
        b"MAIL FROM:<someone@sender.example>",
        b"RCPT TO:<alice@example.com>",
    )
    assert core.state is State.AUTHENTICATING


def test_relay_keeps_whole_lines_with_parameters():
    data = b"HELO h\r\nmail from:<a@b> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<c@d> NOTIFY=NEVER\r\n"
    events, _ = feed(data, RELAY)
    creds = creds_of(events)
    assert creds.smtp_from == "mail from:<a@b> SIZE=100 BODY=8BITMIME"
    assert creds.smtp_to == "RCPT TO:<c@d> NOTIFY=NEVER"
    assert creds.smtp_helo == "h"


def test_relay_passes_the_backend_rcpt_reply_and_hands_over_the_rest():
    core = make(RELAY)
    core.receive(RELAY_SESSION + b"RCPT TO:<bob@example.com>\r\nDATA\r\n")
    events = core.finish_login(LoggedIn(b"250 2.1.5 Ok"))
    assert events == [Send(b"250 2.1.5 Ok\r\n")]
    assert core.state is State.LOGGED_IN
    assert core.trailing == b"RCPT TO:<bob@example.com>\r\nDATA\r\n"


@pytest.mark.parametrize("reply", [b"", b"250-continued", b"OK", b"250 " + b"x" * 600, b"2\x00"])
def test_relay_replaces_a_backend_reply_it_cannot_pass_on(reply):
    core = make(RELAY)
    core.receive(RELAY_SESSION)
    assert core.finish_login(LoggedIn(reply)) == [Send(b"250 2.1.5 OK\r\n")]


def test_relay_rejection_keeps_the_sender_and_allows_another_recipient():
    core = make(RELAY)
    core.receive(RELAY_SESSION)
    events = core.finish_login(Rejected("User unknown", "550 5.1.1"))
    assert events == [Send(b"550 5.1.1 User unknown\r\n")]
    events = core.receive(b"RCPT TO:<bob@example.com>\r\n")
    creds = creds_of(events)
    assert creds.attempt == 2
    assert creds.smtp_from == "MAIL FROM:<someone@sender.example>"  # the sender stands
    assert creds.smtp_to == "RCPT TO:<bob@example.com>"


def test_relay_rejection_and_outage_codes():
    core = make(RELAY)
    core.receive(RELAY_SESSION)
    assert core.finish_login(Rejected("Relaying denied")) == [
        Send(b"550 5.7.1 Relaying denied\r\n")
    ]
    core.receive(b"RCPT TO:<x@example.com>\r\n")
    # RFC 5321 allows no 454 after RCPT.
    assert core.finish_login(Unavailable()) == [
        Send(b"451 4.3.0 Temporary failure, please try again later\r\n")
    ]


@pytest.mark.parametrize(
    ("data", "reply"),
    [
        (b"MAIL FROM:<a@b>\r\n", b"503 5.5.1 Send HELO/EHLO first\r\n"),
        (b"HELO h\r\nRCPT TO:<a@b>\r\n", b"250 mx.example\r\n503 5.5.1 Need MAIL command\r\n"),
        (
            b"HELO h\r\nMAIL FROM:<a@b>\r\nMAIL FROM:<c@d>\r\n",
            b"250 mx.example\r\n250 2.1.0 OK\r\n503 5.5.1 Sender already specified\r\n",
        ),
        (b"HELO h\r\nMAIL <a@b>\r\n", b"250 mx.example\r\n501 5.5.4 Invalid argument\r\n"),
        (b"HELO h\r\nMAIL FROM:\r\n", b"250 mx.example\r\n501 5.5.4 Invalid argument\r\n"),
        (b"HELO h\r\nMAIL FROM:<\xff>\r\n", b"250 mx.example\r\n501 5.5.4 Invalid argument\r\n"),
        (b"HELO h\r\nMAIL FROM:<a\tb>\r\n", b"250 mx.example\r\n501 5.5.4 Invalid argument\r\n"),
        (b"HELO h\r\nDATA\r\n", b"250 mx.example\r\n503 5.5.1 Need MAIL command\r\n"),
        (
            b"HELO h\r\nMAIL FROM:<a@b>\r\nDATA\r\n",
            b"250 mx.example\r\n250 2.1.0 OK\r\n503 5.5.1 Need RCPT command\r\n",
        ),
        (
            b"HELO h\r\nMAIL FROM:<a@b>\r\nRSET\r\nRCPT TO:<c@d>\r\n",
            b"250 mx.example\r\n250 2.1.0 OK\r\n250 2.0.0 OK\r\n503 5.5.1 Need MAIL command\r\n",
        ),
    ],
)
def test_relay_envelope_sequence_and_syntax(data, reply):
    events, core = feed(data, RELAY)
    assert wire(events) == reply
    assert core.state is State.COMMAND


def test_relay_accepts_utf8_addresses():
    events, _ = feed(
        "HELO h\r\nMAIL FROM:<jörg@bücher.example>\r\nRCPT TO:<a@b>\r\n".encode(), RELAY
    )
    assert creds_of(events).smtp_from == "MAIL FROM:<jörg@bücher.example>"


def test_relay_needs_tls_first_when_starttls_only():
    events, _ = feed(b"HELO h\r\nMAIL FROM:<a@b>\r\n", RELAY, starttls_only=True)
    assert wire(events).endswith(b"530 5.7.0 Must issue a STARTTLS command first\r\n")


def test_ehlo_ends_a_relay_transaction():
    _, core = feed(b"HELO h\r\nMAIL FROM:<a@b>\r\nEHLO again\r\n", RELAY)
    assert wire(core.receive(b"RCPT TO:<c@d>\r\n")) == b"503 5.5.1 Need MAIL command\r\n"
    creds = creds_of(core.receive(b"MAIL FROM:<e@f>\r\nRCPT TO:<c@d>\r\n"))
    assert creds.smtp_helo == "again"


def test_auth_inside_a_relay_transaction_is_refused():
    policy = dataclasses.replace(SUBMISSION, mechanisms=("none", "plain"))
    events, _ = feed(b"HELO h\r\nMAIL FROM:<a@b>\r\n" + PLAIN_IR, policy)
    assert wire(events).endswith(b"503 5.5.1 AUTH not allowed during a mail transaction\r\n")


# --- submission before AUTH: no mail transaction -------------------------------------------------


@pytest.mark.parametrize("command", [b"MAIL FROM:<a@b>", b"RCPT TO:<a@b>", b"DATA", b"BDAT 10"])
def test_submission_needs_auth_before_mail(command):
    events, _ = feed(b"EHLO c\r\n" + command + b"\r\n")
    assert wire(events) == EHLO_REPLY + b"530 5.7.0 Authentication required\r\n"


def test_pipelined_data_and_body_are_never_read_as_a_message():
    data = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nSubject: hi\r\n\r\nQUIT\r\n.\r\n"
    events, core = feed(data, max_errors=5)
    assert wire(events) == EHLO_REPLY + (
        b"530 5.7.0 Authentication required\r\n" * 3
        + b"500 5.5.2 Command not recognized\r\n"
        + b"421 4.7.0 Too many errors, closing connection\r\n"
    )
    assert isinstance(events[-1], Close)
    assert core.state is State.CLOSED


# --- small commands ------------------------------------------------------------------------------


def test_noop_rset_vrfy_help_quit():
    data = b"NOOP\r\nNOOP anything\r\nRSET\r\nVRFY alice\r\nHELP\r\nQUIT\r\nNOOP\r\n"
    events, core = feed(data)
    assert wire(events) == (
        b"250 2.0.0 OK\r\n250 2.0.0 OK\r\n250 2.0.0 OK\r\n"
        b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT RSET NOOP VRFY HELP QUIT\r\n"
        b"221 2.0.0 Bye\r\n"
    )
    assert events[-1] == Close(CloseReason.LOGOUT)
    assert core.state is State.CLOSED


def test_rset_and_vrfy_syntax():
    events, _ = feed(b"RSET x\r\nVRFY\r\n")
    assert wire(events) == b"501 5.5.4 Invalid argument\r\n" * 2


def test_eof_closes():
    core = make()
    assert core.receive(b"") == [Close(CloseReason.EOF)]
    assert core.state is State.CLOSED


# --- errors and limits ---------------------------------------------------------------------------


def test_unknown_commands_spend_the_error_budget():
    events, core = feed(b"XYZZY\r\nEXPN list\r\n\r\n", max_errors=3)
    assert wire(events) == (
        b"500 5.5.2 Command not recognized\r\n" * 2
        + b"421 4.7.0 Too many errors, closing connection\r\n"
    )
    assert events[-1] == Close(CloseReason.TOO_MANY_ERRORS)
    assert core.state is State.CLOSED


def test_an_http_request_is_closed_at_once():
    events, core = feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert wire(events) == b"521 5.5.1 Protocol error\r\n"
    assert core.state is State.CLOSED


def test_bare_lf_ends_a_command():
    events, _ = feed(b"EHLO c\nNOOP\n")
    assert wire(events) == EHLO_REPLY + b"250 2.0.0 OK\r\n"


def test_a_long_command_line_is_refused_but_not_fatal():
    long = b"VRFY " + b"a" * (MAX_COMMAND_LINE - len(b"VRFY ") - 1) + b"\r\n"
    events, core = feed(long + b"NOOP\r\n")
    assert wire(events) == b"500 5.5.6 Line too long\r\n250 2.0.0 OK\r\n"
    assert core.state is State.COMMAND
    just_fits = b"VRFY " + b"a" * (MAX_COMMAND_LINE - len(b"VRFY ") - 2) + b"\r\n"
    events, _ = feed(just_fits)
    assert wire(events).startswith(b"252 ")


def test_auth_lines_may_be_longer_than_commands():
    user = b"u" * 1000
    events, _ = feed(b"EHLO c\r\nAUTH PLAIN " + b64(b"\0" + user + b"\0" + b"p" * 1000) + b"\r\n")
    assert creds_of(events).user == "u" * 1000


def test_a_line_beyond_the_buffer_closes():
    events, core = feed(b"NOOP " + b"x" * 9000, max_line=8192)
    assert wire(events) == b"500 5.5.6 Line too long\r\n"
    assert events[-1] == Close(CloseReason.LINE_TOO_LONG)
    assert core.state is State.CLOSED


def test_pipelined_ehlo_auth_mail_in_one_read():
    core = make()
    events = core.receive(b"EHLO c\r\n" + PLAIN_IR + b"MAIL FROM:<alice@example.com>\r\n")
    assert wire(events) == EHLO_REPLY
    assert creds_of(events).user == "alice@example.com"
    assert core.finish_login(LoggedIn(b"")) == [Send(b"235 2.7.0 Authentication successful\r\n")]
    assert core.trailing == b"MAIL FROM:<alice@example.com>\r\n"


def test_replies_never_repeat_what_the_client_sent():
    events, _ = feed(b"EHLO c\r\nsecret-password\r\nAUTH PLAIN c2VjcmV0LXBhc3N3b3Jk!\r\n")
    assert b"secret" not in wire(events)
    assert b"c2VjcmV0" not in wire(events)
