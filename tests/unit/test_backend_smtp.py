"""The backend SMTP login core: backend bytes in, events out.

Each transcript is fed three ways: each backend turn whole, one byte at a time, and whole with
extra bytes after the backend's last line. A transcript is a list of steps:
("S", bytes) the backend sends; ("C", bytes) the core must have sent exactly this since the last
"C"; ("TLS",) the core must have asked for TLS, and the handshake is reported done; ("EOF",)
the backend closes.
"""

from __future__ import annotations

import base64

import backend_script
import pytest

from mailgate.backend.smtp import MAX_COMMAND_LINE, SmtpLogin, SmtpLoginState, xtext
from mailgate.protocols.core import State
from mailgate.protocols.events import (
    Authenticate,
    BackendFailed,
    BackendReady,
    LoggedIn,
    Rejected,
    Send,
    Unavailable,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.smtp import SmtpCore
from mailgate.values import ClientInfo, Secret

MODES = ["whole", "bytes", "trailing"]
EXTRA = b"250 stray\r\n"  # what a broken backend may send right after its last reply

GREET = b"220 backend.example ESMTP Postfix\r\n"
EHLO = b"EHLO proxy.example\r\n"
EHLO_PLAIN = b"250-backend.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
EHLO_TLS = b"250-backend.example\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_AUTH = b"250-backend.example\r\n250-AUTH LOGIN PLAIN\r\n250 SIZE 10240000\r\n"
EHLO_XCLIENT = (
    b"250-backend.example\r\n250-PIPELINING\r\n"
    b"250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME PORT LOGIN DESTADDR DESTPORT\r\n"
    b"250 SMTPUTF8\r\n"
)
FORWARD = ClientInfo("192.0.2.7", 51234, "smtp")
ENVELOPE = (b"MAIL FROM:<someone@sender.example>", b"RCPT TO:<alice@example.com>")
PASSWORD = "alice-secret"
BLOB = base64.b64encode(b"\0alice@example.com\0" + PASSWORD.encode())


def run(core, script, mode):
    final, leftover = backend_script.run(core, script, mode, EXTRA)
    assert core.state is SmtpLoginState.DONE
    return final, leftover


def ready(core, script, mode, reply):
    final, leftover = run(core, script, mode)
    assert isinstance(final, BackendReady), final
    assert final.reply == reply
    expected = EXTRA if mode == "trailing" and script[-1][0] == "S" else b""
    assert final.trailing + leftover == expected
    return final


def failed(core, script, mode, temporary):
    final, _ = run(core, script, mode)
    assert isinstance(final, BackendFailed), final
    assert final.temporary is temporary
    assert PASSWORD not in final.detail
    assert BLOB.decode() not in final.detail
    return final


def login(mode="none", **kwargs):
    args = {
        "helo_name": "proxy.example",
        "user": "alice@example.com",
        "secret": Secret(PASSWORD),
        "mode": mode,
        "starttls": False,
        "forward": FORWARD,
        "client_helo": "mx.sender.example",
    }
    args.update(kwargs)
    return SmtpLogin(**args)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


# --- greeting and EHLO ---------------------------------------------------------------------------


def test_plain_session_is_ready_after_ehlo(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)]
    ready(login(), script, mode, reply=b"250 8BITMIME")


def test_multi_line_greeting(mode):
    script = [
        ("S", b"220-backend.example ESMTP\r\n220 welcome\r\n"),
        ("C", EHLO),
        ("S", EHLO_PLAIN),
    ]
    ready(login(), script, mode, reply=b"250 8BITMIME")


@pytest.mark.parametrize(
    ("greeting", "temporary"),
    [
        (b"421 4.3.2 busy\r\n", True),
        (b"554 5.7.1 go away\r\n", False),
        (b"hello there\r\n", True),
        (b"250 wrong code\r\n", True),
    ],
)
def test_greeting_codes(mode, greeting, temporary):
    final = failed(login(), [("S", greeting)], mode, temporary)
    assert greeting[:3].decode() in final.detail


def test_ehlo_refused_is_temporary(mode):
    script = [("S", GREET), ("C", EHLO), ("S", b"550 5.7.1 no\r\n")]
    final = failed(login(), script, mode, temporary=True)
    assert "550 5.7.1 no" in final.detail


def test_reply_code_must_not_change_within_a_reply(mode):
    script = [("S", GREET), ("C", EHLO), ("S", b"250-backend\r\n251 odd\r\n")]
    failed(login(), script, mode, temporary=True)


def test_endless_reply_and_long_line_are_bounded(mode):
    endless = b"250-x\r\n" * 200
    failed(login(), [("S", GREET), ("C", EHLO), ("S", endless)], mode, temporary=True)
    long = b"220 " + b"x" * 300
    failed(login(max_line=256), [("S", long)], mode, temporary=True)


def test_backend_closing_is_temporary(mode):
    final = failed(login(), [("S", GREET), ("C", EHLO), ("EOF",)], mode, temporary=True)
    assert "closed" in final.detail


# --- STARTTLS ------------------------------------------------------------------------------------


def test_starttls_then_ehlo_again(mode):
    script = [
        ("S", GREET),
        ("C", EHLO),
        ("S", EHLO_TLS),
        ("C", b"STARTTLS\r\n"),
        ("S", b"220 2.0.0 Ready to start TLS\r\n250 injected\r\n"),
        ("TLS",),
        ("C", EHLO),
        ("S", EHLO_PLAIN),
    ]
    ready(login(starttls=True), script, mode, reply=b"250 8BITMIME")


def test_starttls_not_offered_or_refused_is_temporary(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)]
    final = failed(login(starttls=True), script, mode, temporary=True)
    assert "STARTTLS" in final.detail
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_TLS), ("C", b"STARTTLS\r\n")]
    script.append(("S", b"454 4.7.0 TLS not available\r\n"))
    failed(login(starttls=True), script, mode, temporary=True)


def test_tls_started_outside_starttls_is_a_driver_bug():
    with pytest.raises(RuntimeError):
        login().tls_started()


# --- XCLIENT -------------------------------------------------------------------------------------

XCLIENT_LINE = (
    b"XCLIENT ADDR=192.0.2.7 PORT=51234 NAME=[UNAVAILABLE] HELO=mx.sender.example "
    b"LOGIN=alice@example.com PROTO=ESMTP\r\n"
)


def test_xclient_then_ehlo_with_the_client_name(mode):
    script = [
        ("S", GREET),
        ("C", EHLO),
        ("S", EHLO_XCLIENT),
        ("C", XCLIENT_LINE),
        ("S", GREET),
        ("C", b"EHLO mx.sender.example\r\n"),
        ("S", EHLO_PLAIN),
    ]
    ready(login("xclient"), script, mode, reply=b"250 8BITMIME")


def test_xclient_forwards_destination_and_ipv6(mode):
    forward = ClientInfo("2001:db8::1", 2525, "smtp", local_ip="2001:db8::25", local_port=587)
    line = (
        b"XCLIENT ADDR=IPV6:2001:db8::1 PORT=2525 NAME=[UNAVAILABLE] HELO=[UNAVAILABLE] "
        b"LOGIN=alice@example.com PROTO=ESMTP DESTADDR=IPV6:2001:db8::25 DESTPORT=587\r\n"
    )
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT), ("C", line)]
    script += [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)]
    ready(login("xclient", forward=forward, client_helo=None), script, mode, b"250 8BITMIME")


def test_xclient_sends_only_advertised_attributes_and_no_login_for_relay(mode):
    script = [
        ("S", GREET),
        ("C", EHLO),
        ("S", b"250-backend\r\n250 XCLIENT ADDR NAME LOGIN\r\n"),
        ("C", b"XCLIENT ADDR=[UNAVAILABLE] NAME=[UNAVAILABLE]\r\n"),
        ("S", b"250 2.0.0 Ok\r\n"),  # Postfix before 2.3 answered 250
        ("C", b"EHLO mx.sender.example\r\n"),
        ("S", EHLO_PLAIN),
    ]
    ready(login("xclient", user="", forward=None), script, mode, reply=b"250 8BITMIME")


def test_xclient_xtext_encodes_values(mode):
    line = (
        b"XCLIENT ADDR=192.0.2.7 PORT=51234 NAME=[UNAVAILABLE] HELO=mx.sender.example "
        b"LOGIN=a+2Bb+3Dc+20d+C3+A9 PROTO=ESMTP\r\n"
    )
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT), ("C", line)]
    script += [("S", GREET), ("C", b"EHLO mx.sender.example\r\n"), ("S", EHLO_PLAIN)]
    ready(login("xclient", user="a+b=c dé"), script, mode, reply=b"250 8BITMIME")


def test_xtext():
    assert xtext("plain-text_[x]") == b"plain-text_[x]"
    assert xtext("a+b=c d\r\n") == b"a+2Bb+3Dc+20d+0D+0A"
    assert xtext("é") == b"+C3+A9"


def test_long_xclient_is_split_under_512_octets(mode):
    user = "u" * 300 + "@example.com"
    helo = "h" * 250
    core = login("xclient", user=user, client_helo=helo)
    first = b"XCLIENT ADDR=192.0.2.7 PORT=51234 NAME=[UNAVAILABLE] HELO=" + helo.encode() + b"\r\n"
    second = b"XCLIENT LOGIN=" + user.encode() + b" PROTO=ESMTP\r\n"
    assert len(first) <= MAX_COMMAND_LINE and len(second) <= MAX_COMMAND_LINE
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT)]
    script += [("C", first), ("S", GREET), ("C", second), ("S", GREET)]
    script += [("C", b"EHLO " + helo.encode() + b"\r\n"), ("S", EHLO_PLAIN)]
    ready(core, script, mode, reply=b"250 8BITMIME")


def test_an_attribute_too_long_for_any_command_is_sent_as_unavailable(mode):
    core = login("xclient", user="u" * 600)
    line = XCLIENT_LINE.replace(b"LOGIN=alice@example.com", b"LOGIN=[UNAVAILABLE]")
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT), ("C", line), ("S", GREET)]
    script += [("C", b"EHLO mx.sender.example\r\n"), ("S", EHLO_PLAIN)]
    ready(core, script, mode, reply=b"250 8BITMIME")


def test_xclient_not_offered_or_refused_is_temporary(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)]
    final = failed(login("xclient"), script, mode, temporary=True)
    assert "XCLIENT" in final.detail
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT), ("C", XCLIENT_LINE)]
    script.append(("S", b"550 5.7.0 Error: insufficient authorization\r\n"))
    final = failed(login("xclient"), script, mode, temporary=True)
    assert "550 5.7.0" in final.detail


# --- AUTH ----------------------------------------------------------------------------------------


def test_auth_plain(mode):
    script = [
        ("S", GREET),
        ("C", EHLO),
        ("S", EHLO_AUTH),
        ("C", b"AUTH PLAIN " + BLOB + b"\r\n"),
        ("S", b"235 2.7.0 Authentication successful\r\n"),
    ]
    ready(login("auth"), script, mode, reply=b"235 2.7.0 Authentication successful")


def test_auth_plain_in_the_old_auth_equals_syntax(mode):
    ehlo = b"250-backend\r\n250 AUTH=PLAIN LOGIN\r\n"
    script = [("S", GREET), ("C", EHLO), ("S", ehlo), ("C", b"AUTH PLAIN " + BLOB + b"\r\n")]
    script.append(("S", b"235 ok\r\n"))
    ready(login("auth"), script, mode, reply=b"235 ok")


def test_auth_without_initial_response_when_it_would_be_too_long(mode):
    password = "p" * 10000
    blob = base64.b64encode(b"\0alice@example.com\0" + password.encode())
    script = [
        ("S", GREET),
        ("C", EHLO),
        ("S", EHLO_AUTH),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", b"334 \r\n"),
        ("C", blob + b"\r\n"),
        ("S", b"235 ok\r\n"),
    ]
    ready(login("auth", secret=Secret(password)), script, mode, reply=b"235 ok")


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [
        (b"535 5.7.8 Authentication credentials invalid\r\n", False),
        (b"454 4.7.0 Temporary authentication failure\r\n", True),
        (b"504 5.5.4 Unrecognized authentication type\r\n", True),  # our misconfiguration
        (b"334 more?\r\n", True),
    ],
)
def test_auth_refusals(mode, reply, temporary):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_AUTH), ("C", b"AUTH PLAIN " + BLOB + b"\r\n")]
    final = failed(login("auth"), [*script, ("S", reply)], mode, temporary)
    assert reply[:3].decode() in final.detail


def test_auth_not_offered_is_temporary(mode):
    final = failed(login("auth"), [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)], mode, True)
    assert "AUTH PLAIN" in final.detail


def test_a_backend_echoing_the_password_never_puts_it_in_the_detail(mode):
    echo = b"535 5.7.8 bad " + BLOB + b" / " + PASSWORD.encode() + b"\r\n"
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_AUTH), ("C", b"AUTH PLAIN " + BLOB + b"\r\n")]
    final = failed(login("auth"), [*script, ("S", echo)], mode, temporary=False)
    assert "***" in final.detail


def test_nul_in_the_password_is_never_sent(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_AUTH)]
    failed(login("auth", secret=Secret("a\0b")), script, mode, temporary=False)


def test_repr_hides_the_password():
    assert PASSWORD not in repr(login("auth"))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        login("bogus")


# --- envelope replay (relay) ---------------------------------------------------------------------


def relay_script(rcpt_reply: bytes, mail_reply: bytes = b"250 2.1.0 Ok\r\n"):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_PLAIN)]
    script += [("C", ENVELOPE[0] + b"\r\n"), ("S", mail_reply)]
    if mail_reply.startswith(b"2"):
        script += [("C", ENVELOPE[1] + b"\r\n"), ("S", rcpt_reply)]
    return script


def test_envelope_replay_ends_with_the_rcpt_reply(mode):
    core = login(user="", envelope=ENVELOPE)
    ready(core, relay_script(b"250 2.1.5 Ok\r\n"), mode, reply=b"250 2.1.5 Ok")


def test_envelope_after_xclient(mode):
    core = login("xclient", user="", envelope=ENVELOPE)
    line = XCLIENT_LINE.replace(b" LOGIN=alice@example.com", b"")
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_XCLIENT), ("C", line), ("S", GREET)]
    script += [("C", b"EHLO mx.sender.example\r\n"), ("S", EHLO_PLAIN)]
    script += [("C", ENVELOPE[0] + b"\r\n"), ("S", b"250 ok\r\n")]
    script += [("C", ENVELOPE[1] + b"\r\n"), ("S", b"251 2.1.5 forwarded\r\n")]
    ready(core, script, mode, reply=b"251 2.1.5 forwarded")


def test_multi_line_rcpt_reply_gives_its_last_line(mode):
    core = login(user="", envelope=ENVELOPE)
    ready(core, relay_script(b"250-one\r\n250 2.1.5 two\r\n"), mode, reply=b"250 2.1.5 two")


def test_rcpt_5xx_is_the_backends_verdict_and_stays_readable(mode):
    core = login(user="", envelope=ENVELOPE)
    final = failed(core, relay_script(b"550 5.1.1 User unknown\r\n"), mode, temporary=False)
    assert "550 5.1.1 User unknown" in final.detail
    assert final.client_reply == Rejected("User unknown", "550 5.1.1")


def test_rcpt_4xx_and_mail_4xx_are_temporary(mode):
    core = login(user="", envelope=ENVELOPE)
    final = failed(core, relay_script(b"450 4.2.0 greylisted\r\n"), mode, temporary=True)
    assert final.client_reply == Rejected("greylisted", "450 4.2.0")
    core = login(user="", envelope=ENVELOPE)
    script = relay_script(b"", mail_reply=b"451 4.3.0 try later\r\n")
    final = failed(core, script, mode, temporary=True)
    assert final.client_reply == Rejected("try later", "451 4.3.0")


def test_auth_then_envelope(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_AUTH), ("C", b"AUTH PLAIN " + BLOB + b"\r\n")]
    script += [("S", b"235 ok\r\n"), ("C", ENVELOPE[0] + b"\r\n"), ("S", b"250 ok\r\n")]
    script += [("C", ENVELOPE[1] + b"\r\n"), ("S", b"250 rcpt ok\r\n")]
    ready(login("auth", envelope=ENVELOPE), script, mode, reply=b"250 rcpt ok")


def test_envelope_rejection_carries_the_backends_code_and_text(mode):
    core = login(user="", envelope=ENVELOPE)
    script = relay_script(b"550 5.1.1 <alice@example.com>: User unknown\r\n")
    final = failed(core, script, mode, False)
    assert final.client_reply == Rejected("<alice@example.com>: User unknown", "550 5.1.1")
    core = login(user="", envelope=ENVELOPE)
    final = failed(core, relay_script(b"450 greylisted\r\n"), mode, temporary=True)
    assert final.client_reply == Rejected("greylisted", "450")


def test_no_envelope_rejection_for_other_failures(mode):
    script = [("S", GREET), ("C", EHLO), ("S", EHLO_AUTH), ("C", b"AUTH PLAIN " + BLOB + b"\r\n")]
    core = login("auth", envelope=ENVELOPE)
    final = failed(core, [*script, ("S", b"535 5.7.8 no\r\n")], mode, temporary=False)
    assert final.client_reply is None
    core = login(user="", envelope=ENVELOPE)
    final = failed(core, [("S", b"554 5.7.1 no service\r\n")], mode, temporary=False)
    assert final.client_reply is None


# --- the client core and the backend core together (what the driver does) -----------------------

RELAY_POLICY = PreAuthPolicy(
    mechanisms=("none",),
    capabilities=("PIPELINING",),
    starttls=False,
    tls_active=False,
    starttls_only=False,
    greeting="ready",
    hostname="mx.example",
)


def relay_pair(rcpt_reply: bytes):
    """A relay client's session through both cores; returns (client core, what it was sent)."""
    client = SmtpCore(RELAY_POLICY, "<1@mx.example>")
    events = client.receive(
        b"EHLO mx.sender.example\r\nMAIL FROM:<someone@sender.example>\r\n"
        b"RCPT TO:<alice@example.com>\r\nDATA\r\n"
    )
    (creds,) = [e.credentials for e in events if isinstance(e, Authenticate)]
    backend = SmtpLogin(
        helo_name="proxy.example",
        user="",
        secret=Secret(""),
        mode="xclient",
        starttls=False,
        forward=FORWARD,
        client_helo=creds.smtp_helo,
        envelope=creds.envelope,
    )
    sent = []
    for data in (GREET, EHLO_XCLIENT, GREET, EHLO_PLAIN, b"250 2.1.0 Ok\r\n", rcpt_reply):
        result = backend.receive(data)
        sent += [e.data for e in result if isinstance(e, Send)]
    final = result[-1]
    if isinstance(final, BackendReady):
        outcome = LoggedIn(final.reply)
    else:
        outcome = final.client_reply or Unavailable()
    assert sent[1] == XCLIENT_LINE.replace(b" LOGIN=alice@example.com", b"")
    assert sent[2:] == [b"EHLO mx.sender.example\r\n", *(line + b"\r\n" for line in ENVELOPE)]
    return client, client.finish_login(outcome) + client.drain()


def test_relay_through_both_cores_passes_the_backends_rcpt_reply():
    client, events = relay_pair(b"250 2.1.5 Ok\r\n")
    assert events == [Send(b"250 2.1.5 Ok\r\n")]
    assert client.trailing == b"DATA\r\n"


def test_relay_through_both_cores_passes_the_backends_refusal():
    client, events = relay_pair(b"550 5.1.1 User unknown\r\n")
    # The pipelined DATA is then answered here: there is no recipient.
    assert events == [Send(b"550 5.1.1 User unknown\r\n"), Send(b"503 5.5.1 Need RCPT command\r\n")]
    assert client.state is State.COMMAND
