"""The real client's address as a trusted peer claims it (IMAP ID x-originating-ip, POP3 and
SMTP XCLIENT): counted from trusted_networks only, bytes in and events out."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate.protocols import claims
from mailgate.protocols.claims import AddressClaim, ClaimSyntax
from mailgate.protocols.core import PreAuthCore
from mailgate.protocols.events import Authenticate, Send
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.pop3 import Pop3Core
from mailgate.protocols.smtp import SmtpCore

POLICY = PreAuthPolicy(
    mechanisms=("plain", "login", "user"),
    capabilities=(),
    starttls=False,
    tls_active=False,
    starttls_only=False,
    greeting="ready",
    hostname="mail.example.com",
    max_line=65536,
)
TRUSTED = dataclasses.replace(POLICY, trusted=True)


def sent(events: list[object]) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, Send))


def run(core: PreAuthCore, data: bytes) -> list[object]:
    core.greet()
    return list(core.receive(data))


# --- the parser -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "claim"),
    [
        (b"ADDR=192.0.2.7 PORT=51234", AddressClaim("192.0.2.7", 51234)),
        (b"addr=192.0.2.7", AddressClaim("192.0.2.7")),
        (b"ADDR=IPV6:2001:db8::1 PORT=1", AddressClaim("2001:db8::1", 1)),
        (b"ADDR=2001:DB8:0::1", AddressClaim("2001:db8::1")),
        (b"ADDR=::ffff:192.0.2.7", AddressClaim("192.0.2.7")),
        (b"NAME=host.example ADDR=192.0.2.7 HELO=x+2Ey", AddressClaim("192.0.2.7")),
        (b"ADDR=[UNAVAILABLE] PORT=[TEMPUNAVAIL]", None),
        (b"NAME=[UNAVAILABLE]", None),
        (b"PORT=25", None),  # a port without an address claims nothing
    ],
)
def test_xclient_attributes_name_the_client(args: bytes, claim: AddressClaim | None) -> None:
    assert claims.from_xclient(args) == claim


@pytest.mark.parametrize(
    "args",
    [
        b"",
        b"ADDR",
        b"BOGUS=1",
        b"ADDR=999.1.1.1",
        b"ADDR=example.com",
        b"ADDR=192.0.2.7 PORT=0",
        b"ADDR=192.0.2.7 PORT=65536",
        b"ADDR=192.0.2.7 PORT=x",
        b" ".join([b"NAME=x"] * 17),
    ],
)
def test_bad_xclient_attributes_are_a_syntax_error(args: bytes) -> None:
    with pytest.raises(ClaimSyntax):
        claims.from_xclient(args)


@given(st.binary(max_size=300))
def test_any_xclient_line_is_a_claim_or_a_syntax_error(args: bytes) -> None:
    try:
        claim = claims.from_xclient(args)
    except ClaimSyntax:
        return
    assert claim is None or (claim.ip and (claim.port is None or 0 < claim.port < 65536))


def test_id_parameters_name_the_client_and_bad_values_are_ignored() -> None:
    params = ((b"X-Originating-IP", b"192.0.2.7"), (b"x-originating-port", b"51234"))
    assert claims.from_id(params) == AddressClaim("192.0.2.7", 51234)
    assert claims.from_id(((b"x-originating-ip", b"nonsense"),)) is None
    assert claims.from_id(((b"x-originating-ip", b"192.0.2.7"), (b"x-originating-port", b"0"))) == (
        AddressClaim("192.0.2.7")
    )
    assert claims.from_id(((b"name", b"webmail"),)) is None
    assert claims.from_id(None) is None


# --- IMAP ID ----------------------------------------------------------------------------------

IMAP_ID = b'a1 ID ("name" "webmail" "x-originating-ip" "192.0.2.7" "x-originating-port" "4711")\r\n'


def test_imap_id_from_a_trusted_peer_names_the_client_of_the_login() -> None:
    core = ImapCore(TRUSTED, "<1@h>")
    events = run(core, IMAP_ID + b"a2 LOGIN alice pw\r\n")
    assert b"a1 OK ID completed" in sent(events)
    assert any(isinstance(e, Authenticate) for e in events)
    assert core.claim == AddressClaim("192.0.2.7", 4711)
    assert not core.claim_ignored


def test_imap_id_from_elsewhere_claims_nothing_and_is_noted() -> None:
    core = ImapCore(POLICY, "<1@h>")
    events = run(core, IMAP_ID + b"a2 LOGIN alice pw\r\n")
    assert b"a1 OK ID completed" in sent(events)  # the client sees no difference
    assert core.claim is None
    assert core.claim_ignored


def test_an_id_without_the_keys_is_not_a_claim() -> None:
    core = ImapCore(POLICY, "<1@h>")
    run(core, b'a1 ID ("name" "Thunderbird")\r\n')
    assert core.claim is None and not core.claim_ignored


# --- POP3 XCLIENT -----------------------------------------------------------------------------


def test_pop3_xclient_from_a_trusted_peer_is_offered_and_taken() -> None:
    core = Pop3Core(TRUSTED, "<1@h>")
    events = run(core, b"CAPA\r\nXCLIENT ADDR=192.0.2.7 PORT=4711\r\nUSER alice\r\nPASS pw\r\n")
    out = sent(events)
    assert b"\r\nXCLIENT\r\n" in out
    assert b"+OK\r\n+OK\r\n" in out  # XCLIENT, USER
    assert any(isinstance(e, Authenticate) for e in events)
    assert core.claim == AddressClaim("192.0.2.7", 4711)


def test_pop3_xclient_from_elsewhere_is_refused_and_not_offered() -> None:
    core = Pop3Core(POLICY, "<1@h>")
    out = sent(run(core, b"CAPA\r\nXCLIENT ADDR=192.0.2.7\r\n"))
    assert b"XCLIENT" not in out.split(b".\r\n")[0]
    assert out.endswith(b"-ERR You are not from trusted IP\r\n")
    assert core.claim is None and core.claim_ignored


def test_pop3_xclient_with_a_bad_address_is_a_syntax_error() -> None:
    core = Pop3Core(TRUSTED, "<1@h>")
    assert sent(run(core, b"XCLIENT ADDR=nonsense\r\n")).endswith(b"-ERR Syntax error\r\n")
    assert core.claim is None


# --- SMTP XCLIENT -----------------------------------------------------------------------------


def test_smtp_xclient_from_a_trusted_peer_starts_the_session_over() -> None:
    core = SmtpCore(TRUSTED, "<1@h>")
    out = sent(run(core, b"EHLO webmail\r\nXCLIENT ADDR=192.0.2.7 PORT=4711\r\n"))
    assert b"250-XCLIENT ADDR PORT\r\n" in out or b"250 XCLIENT ADDR PORT\r\n" in out
    assert out.endswith(b"220 mail.example.com ESMTP ready\r\n")  # a new greeting
    assert core.claim == AddressClaim("192.0.2.7", 4711)
    # As in Postfix, the client says EHLO again before AUTH.
    assert sent(core.receive(b"AUTH PLAIN AGFsaWNlAHB3\r\n")).startswith(b"503 5.5.1")
    events = core.receive(b"EHLO webmail\r\nAUTH PLAIN AGFsaWNlAHB3\r\n")
    assert any(isinstance(e, Authenticate) for e in events)


def test_smtp_xclient_from_elsewhere_is_refused_and_not_offered() -> None:
    core = SmtpCore(POLICY, "<1@h>")
    out = sent(run(core, b"EHLO client\r\nXCLIENT ADDR=192.0.2.7\r\n"))
    assert b"XCLIENT" not in out.split(b"\r\n550")[0]
    assert out.endswith(b"550 5.7.0 Error: insufficient authorization\r\n")
    assert core.claim is None and core.claim_ignored


def test_smtp_xclient_with_a_bad_attribute_is_a_syntax_error() -> None:
    core = SmtpCore(TRUSTED, "<1@h>")
    assert sent(run(core, b"EHLO w\r\nXCLIENT FOO=1\r\n")).endswith(
        b"501 5.5.4 Bad XCLIENT attribute\r\n"
    )
    assert core.claim is None
