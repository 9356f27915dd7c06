"""The backend IMAP login core: backend bytes in, events out.

Each transcript is fed three ways: each backend turn whole, one byte at a time, and whole with
extra bytes after the backend's last line. A transcript is a list of steps:
("S", bytes) the backend sends; ("C", bytes) the core must have sent exactly this since the last
"C"; ("TLS",) the core must have asked for TLS, and the handshake is reported done; ("EOF",)
the backend closes.
"""

from __future__ import annotations

import ast
import base64
import inspect

import backend_script
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailgate.backend import LoginFailure
from mailgate.backend import imap as imap_module
from mailgate.backend.imap import ImapLogin
from mailgate.protocols.events import BackendFailed, BackendReady, Send, StartTLS
from mailgate.values import ClientInfo, Secret

MODES = ["whole", "bytes", "trailing"]
EXTRA = b"* 1 EXISTS\r\n"  # what a backend may send right after the verdict

GREET = b"* OK IMAP server ready\r\n"  # no capabilities: the most conservative backend
GREET_DOVECOT = (
    b"* OK [CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE LITERAL+ STARTTLS "
    b"AUTH=PLAIN] Dovecot ready.\r\n"
)
OK_LOGIN = b"mg3 OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in\r\n"
OK_REPLY = b"OK [CAPABILITY IMAP4rev1 IDLE MOVE] Logged in"


def run(core, script, mode):
    return backend_script.run(core, script, mode, EXTRA)


def ready(core, script, mode, reply=OK_REPLY, trailing=b""):
    final, leftover = run(core, script, mode)
    assert isinstance(final, BackendReady), final
    assert final.reply == reply
    last_is_backend = script[-1][0] == "S"
    assert final.trailing + leftover == trailing + (EXTRA if mode == "trailing" else b"") * (
        last_is_backend
    )
    return final


def failed(core, script, mode, temporary):
    final, _ = run(core, script, mode)
    assert isinstance(final, BackendFailed), final
    assert final.temporary is temporary
    return final


def login(password="secret", user="alice", **kwargs):
    return ImapLogin(user, Secret(password), **kwargs)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


# --- greeting -------------------------------------------------------------------------------


@pytest.mark.parametrize("greeting", [GREET, GREET_DOVECOT, b"* ok\r\n", b"* OK hi\n"])
def test_ok_greeting_then_login(mode, greeting):
    script = [("S", greeting), ("C", b'mg3 LOGIN "alice" "secret"\r\n'), ("S", OK_LOGIN)]
    ready(login(), script, mode)


@pytest.mark.parametrize(
    "greeting",
    [
        b"* PREAUTH [CAPABILITY IMAP4rev1] Logged in as nobody\r\n",
        b"* BYE Too many connections\r\n",
        b"+OK POP3 ready\r\n",
        b"220 smtp.example.com ESMTP\r\n",
        b"\r\n",
        b"mg3 OK forged\r\n",
    ],
)
def test_greeting_that_is_not_ok_is_a_temporary_failure(mode, greeting):
    final = failed(login(), [("S", greeting)], mode, temporary=True)
    assert greeting.strip().decode() in final.detail
    if greeting.startswith(b"* PREAUTH"):
        assert "PREAUTH" in final.detail.split(":")[0]


def test_greeting_is_not_confused_by_braces_at_the_end(mode):
    script = [
        ("S", b"* OK ready {5}\r\n"),
        ("C", b'mg3 LOGIN "alice" "secret"\r\n'),
        ("S", OK_LOGIN),
    ]
    ready(login(), script, mode)


# --- LOGIN quoting and literals -------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "password", "sent"),
    [
        ("alice", 'sa"id', b'"alice" "sa\\"id"'),
        ("alice", "back\\slash", b'"alice" "back\\\\slash"'),
        ("alice", "my little p%ony", b'"alice" "my little p%ony"'),
        ("p%ony@example.com", "", b'"p%ony@example.com" ""'),
        ("a b", "x", b'"a b" "x"'),
    ],
)
def test_login_quotes_printable_ascii(mode, user, password, sent):
    script = [("S", GREET), ("C", b"mg3 LOGIN " + sent + b"\r\n"), ("S", OK_LOGIN)]
    ready(login(password, user), script, mode)


def test_eight_bit_password_waits_for_continuation(mode):
    password = "pässwörd"
    raw = password.encode()
    script = [
        ("S", GREET),
        ("C", b'mg3 LOGIN "alice" {%d}\r\n' % len(raw)),
        ("S", b"+ Ready for literal data\r\n"),
        ("C", raw + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(password), script, mode)


def test_nothing_more_is_sent_before_the_continuation():
    core = login("pässwörd")
    assert core.receive(GREET) == [Send(b'mg3 LOGIN "alice" {10}\r\n')]
    assert core.receive(b"* OK still thinking\r\n") == []
    assert core.receive(b"+") == []
    assert core.receive(b" go\r\n") == [Send("pässwörd".encode() + b"\r\n")]


def test_user_and_password_both_as_literals(mode):
    user, password = "jörg", "line\r\nbreak"
    script = [
        ("S", GREET),
        ("C", b"mg3 LOGIN {5}\r\n"),
        ("S", b"+ OK\r\n"),
        ("C", user.encode() + b" {11}\r\n"),
        ("S", b"+\r\n"),
        ("C", b"line\r\nbreak\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(password, user), script, mode)


def test_control_character_goes_as_literal(mode):
    script = [
        ("S", GREET),
        ("C", b'mg3 LOGIN "alice" {3}\r\n'),
        ("S", b"+ \r\n"),
        ("C", b"a\tb\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login("a\tb"), script, mode)


def test_literal_plus_sends_everything_at_once(mode):
    raw = "pässwörd".encode()
    script = [("S", GREET_DOVECOT), ("C", b'mg3 LOGIN "alice" {10+}\r\n' + raw + b"\r\n")]
    ready(login("pässwörd"), [*script, ("S", OK_LOGIN)], mode)


def test_literal_plus_from_a_capability_response_before_login(mode):
    # Capabilities in the greeting count; one in "* CAPABILITY" after it is too late to matter.
    greeting = b"* OK [CAPABILITY IMAP4rev1 LITERAL+] hi\r\n"
    script = [("S", greeting), ("C", b'mg3 LOGIN "alice" {2+}\r\n\xc3\xa9\r\n'), ("S", OK_LOGIN)]
    ready(login("é"), script, mode)


def test_literal_minus_only_for_small_literals(mode):
    greeting = b"* OK [CAPABILITY IMAP4rev1 LITERAL-] hi\r\n"
    big = "é" * 2049  # 4098 octets: over RFC 7888's 4096
    script = [
        ("S", greeting),
        ("C", b"mg3 LOGIN {2+}\r\n\xc3\xa9 {4098}\r\n"),
        ("S", b"+ go\r\n"),
        ("C", big.encode() + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(big, "é"), script, mode)


def test_nul_in_password_is_refused_without_sending(mode):
    final = failed(login("a\0b"), [("S", GREET)], mode, temporary=False)
    assert "NUL" in final.detail


def test_logindisabled_fails_without_sending_the_password(mode):
    greeting = b"* OK [CAPABILITY IMAP4rev1 LOGINDISABLED STARTTLS] hi\r\n"
    final = failed(login(), [("S", greeting)], mode, temporary=True)
    assert "LOGINDISABLED" in final.detail


# --- AUTHENTICATE PLAIN ---------------------------------------------------------------------

BLOB = base64.b64encode(b"\0alice\0secret")


def test_authenticate_plain_with_sasl_ir(mode):
    script = [
        ("S", GREET_DOVECOT),
        ("C", b"mg3 AUTHENTICATE PLAIN " + BLOB + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(mechanism="plain"), script, mode)


def test_authenticate_plain_without_sasl_ir_waits_for_continuation(mode):
    script = [
        ("S", GREET),
        ("C", b"mg3 AUTHENTICATE PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOB + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(mechanism="plain"), script, mode)


def test_authenticate_plain_utf8_password_is_utf8_in_the_blob(mode):
    blob = base64.b64encode("\0alice\0pässwörd".encode())
    script = [("S", GREET_DOVECOT), ("C", b"mg3 AUTHENTICATE PLAIN " + blob + b"\r\n")]
    ready(login("pässwörd", mechanism="plain"), [*script, ("S", OK_LOGIN)], mode)


def test_second_continuation_is_a_temporary_failure(mode):
    script = [
        ("S", GREET),
        ("C", b"mg3 AUTHENTICATE PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOB + b"\r\n"),
        ("S", b"+ more?\r\n"),
    ]
    failed(login(mechanism="plain"), script, mode, temporary=True)


# --- STARTTLS -------------------------------------------------------------------------------


def test_starttls_discards_plaintext_and_forgets_capabilities(mode):
    script = [
        ("S", GREET_DOVECOT),
        ("C", b"mg1 STARTTLS\r\n"),
        (
            "S",
            b"* CAPABILITY IMAP4rev1 SASL-IR\r\nmg1 OK Begin TLS negotiation now.\r\n"
            b"mg3 OK [CAPABILITY FORGED] injected\r\n",
        ),
        ("TLS",),
        # No SASL-IR after TLS: what was seen in plaintext does not count (RFC 3501 6.2.1).
        ("C", b"mg3 AUTHENTICATE PLAIN\r\n"),
        ("S", b"+ \r\n"),
        ("C", BLOB + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(mechanism="plain", starttls=True), script, mode)


def test_bytes_arriving_while_tls_is_pending_are_ignored():
    core = login(starttls=True)
    assert core.receive(GREET) == [Send(b"mg1 STARTTLS\r\n")]
    assert core.receive(b"mg1 OK go\r\n") == [StartTLS()]
    assert core.receive(b"mg3 OK [CAPABILITY FORGED] injected\r\n") == []
    assert core.tls_started() == [Send(b'mg3 LOGIN "alice" "secret"\r\n')]
    assert core.receive(OK_LOGIN) == [BackendReady(OK_REPLY)]


@pytest.mark.parametrize("reply", [b"mg1 NO not now\r\n", b"mg1 BAD what?\r\n", b"xx OK\r\n"])
def test_starttls_refused_is_temporary(mode, reply):
    script = [("S", GREET), ("C", b"mg1 STARTTLS\r\n"), ("S", reply)]
    failed(login(starttls=True), script, mode, temporary=True)


def test_tls_started_out_of_turn_is_a_programming_error():
    with pytest.raises(RuntimeError):
        login().tls_started()


# --- ID forwarding --------------------------------------------------------------------------

FULL = ClientInfo("1.2.3.4", 1234, "imap", "10.0.0.1", 143)
FULL_ID = (
    b'mg2 ID ("x-originating-ip" "1.2.3.4" "x-originating-port" "1234" '
    b'"x-connected-ip" "10.0.0.1" "x-connected-port" "143")\r\n'
)


@pytest.mark.parametrize(
    "id_result",
    [
        b'* ID ("name" "Dovecot")\r\nmg2 OK ID completed.\r\n',
        b"mg2 NO not from a trusted network\r\n",
        b"mg2 BAD Unknown command\r\n",
        b"* ID NIL\r\nmg2 OK\r\n",
    ],
)
def test_id_is_pipelined_before_login_and_its_result_ignored(mode, id_result):
    script = [
        ("S", GREET),
        ("C", FULL_ID + b'mg3 LOGIN "alice" "secret"\r\n'),
        ("S", id_result + OK_LOGIN),
    ]
    ready(login(forward=FULL), script, mode)


@pytest.mark.parametrize(
    ("forward", "sent"),
    [
        (ClientInfo("::1", 0, "imap"), b'mg2 ID ("x-originating-ip" "::1")\r\n'),
        (
            ClientInfo("1.2.3.4", 5, "imap"),
            b'mg2 ID ("x-originating-ip" "1.2.3.4" "x-originating-port" "5")\r\n',
        ),
        (ClientInfo('q"uote', 0, "imap"), b""),
    ],
)
def test_id_forwards_only_known_clean_fields(mode, forward, sent):
    script = [("S", GREET), ("C", sent + b'mg3 LOGIN "alice" "secret"\r\n'), ("S", OK_LOGIN)]
    ready(login(forward=forward), script, mode)


def test_id_is_sent_after_starttls(mode):
    script = [
        ("S", GREET),
        ("C", b"mg1 STARTTLS\r\n"),
        ("S", b"mg1 OK go\r\n"),
        ("TLS",),
        ("C", FULL_ID + b'mg3 LOGIN "alice" "secret"\r\n'),
        ("S", b"mg2 OK\r\n" + OK_LOGIN),
    ]
    ready(login(forward=FULL, starttls=True), script, mode)


def test_id_reply_with_a_literal_is_skipped_whole(mode):
    # The literal's content looks like our tagged OK: it must be skipped, not obeyed.
    id_reply = b'* ID ("name" {16}\r\nx\r\nmg3 OK fake\r\n "version" {3}\r\n2.3)\r\nmg2 OK done\r\n'
    script = [
        ("S", GREET),
        ("C", FULL_ID + b'mg3 LOGIN "alice" "secret"\r\n'),
        ("S", id_reply + b"mg3 NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"),
    ]
    failed(login(forward=FULL), script, mode, temporary=False)


# --- verdicts -------------------------------------------------------------------------------


def test_ok_passes_capability_code_and_trailing_data(mode):
    script = [
        ("S", GREET),
        ("C", b'mg3 LOGIN "alice" "secret"\r\n'),
        ("S", b"* CAPABILITY IMAP4rev1\r\n" + OK_LOGIN + b"* 3 EXISTS\r\n"),
    ]
    ready(login(), script, mode, trailing=b"* 3 EXISTS\r\n")


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [
        (b"mg3 NO [AUTHENTICATIONFAILED] Authentication failed.", False),
        (b"mg3 NO Login failed", False),
        (b"mg3 no [AUTHORIZATIONFAILED] nope", False),
        (b"mg3 NO [UNAVAILABLE] Backend down", True),
        (b"mg3 NO [SERVERBUG] Internal error", True),
        (b"mg3 NO [INUSE] Mailbox locked", True),
        (b"mg3 BAD Error in IMAP command", True),
        (b"mg3 MAYBE", True),
        (b"zz9 OK not ours", True),
        (b"* BYE Server shutting down", True),
    ],
)
def test_verdict_mapping(mode, reply, temporary):
    script = [("S", GREET), ("C", b'mg3 LOGIN "alice" "secret"\r\n'), ("S", reply + b"\r\n")]
    final = failed(login(), script, mode, temporary)
    assert reply.split(b" ", 1)[1].decode() in final.detail


@pytest.mark.parametrize(
    "script",
    [
        [("EOF",)],
        [("S", b"* OK hi"), ("EOF",)],
        [("S", GREET), ("C", b'mg3 LOGIN "alice" {2}\r\n'), ("EOF",)],
        [("S", GREET), ("C", b"mg1 STARTTLS\r\n"), ("S", b"mg1 OK\r\n"), ("EOF",)],
        [
            ("S", GREET),
            ("C", b'mg3 LOGIN "alice" {2}\r\n'),
            ("S", b"+ go\r\n"),
            ("C", b"\xc3\xa9\r\n"),
            ("S", b"* CAPABILITY X\r\n"),
            ("EOF",),
        ],
    ],
)
def test_eof_before_the_verdict_is_temporary(mode, script):
    starttls = ("C", b"mg1 STARTTLS\r\n") in script
    final = failed(login("é", starttls=starttls), script, mode, temporary=True)
    assert final.detail == "backend closed the connection"


def test_overlong_line_is_temporary(mode):
    failed(login(max_line=64), [("S", b"* OK " + b"x" * 100)], mode, temporary=True)
    failed(login(max_line=64), [("S", b"* OK " + b"x" * 100 + b"\r\n")], mode, temporary=True)


def test_overlong_literal_is_temporary(mode):
    script = [("S", GREET), ("C", b'mg3 LOGIN "alice" "secret"\r\n'), ("S", b"* ID ({999}\r\n")]
    failed(login(max_line=64), script, mode, temporary=True)


def test_nothing_after_the_verdict():
    core = login()
    core.receive(GREET)
    assert core.receive(b"mg3 NO bad\r\n") == [
        BackendFailed(False, "backend refused the login: mg3 NO bad")
    ]
    assert core.receive(OK_LOGIN) == []
    assert core.receive(b"") == []


# --- secrets --------------------------------------------------------------------------------

PASSWORD = 'Sup3r "s3cret" \\ pw'


@pytest.mark.parametrize(
    "echo",
    [
        b'mg3 BAD Error in IMAP command LOGIN: "alice" "Sup3r \\"s3cret\\" \\\\ pw"',
        b'mg3 NO Sup3r "s3cret" \\ pw is wrong',
        b'* BYE you said Sup3r "s3cret" \\ pw',
        b"mg3 BAD " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()),
    ],
)
def test_password_never_in_detail(mode, echo):
    for mechanism in ("login", "plain"):
        core = login(PASSWORD, mechanism=mechanism)
        final, _ = run(
            core, [("S", GREET), ("C", core_sent(mechanism)), ("S", echo + b"\r\n")], mode
        )
        assert isinstance(final, BackendFailed)
        assert "s3cret" not in final.detail
        assert base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode() not in final.detail
        assert "s3cret" not in repr(core)


def core_sent(mechanism):
    if mechanism == "plain":
        return b"mg3 AUTHENTICATE PLAIN\r\n"
    return b'mg3 LOGIN "alice" "Sup3r \\"s3cret\\" \\\\ pw"\r\n'


def test_login_failure_text_never_holds_the_line():
    failure = LoginFailure(True, "backend said BYE", b"* BYE secret")
    assert "secret" not in str(failure) and "secret" not in repr(failure)


def test_unknown_mechanism_is_a_programming_error():
    with pytest.raises(ValueError, match="cram"):
        login(mechanism="cram-md5")


# --- invariants -----------------------------------------------------------------------------


def test_core_imports_no_io():
    tree = ast.parse(inspect.getsource(imap_module))
    modules = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {name.split(".")[0] for name in modules} & {"asyncio", "socket", "ssl", "time"}


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(st.binary(max_size=40), max_size=8),
    starttls=st.booleans(),
    mechanism=st.sampled_from(["login", "plain"]),
)
def test_any_input_gives_events(chunks, starttls, mechanism):
    core = login("pässwörd", starttls=starttls, mechanism=mechanism, forward=FULL, max_line=32)
    events = []
    for chunk in [GREET_DOVECOT[:20], b"\r\n", *chunks, b""]:
        new = core.receive(chunk)
        if any(isinstance(e, StartTLS) for e in new):
            new += core.tls_started()
        events += new
    assert all(isinstance(e, Send | StartTLS | BackendReady | BackendFailed) for e in events)
    verdicts = [e for e in events if isinstance(e, BackendReady | BackendFailed)]
    assert len(verdicts) == 1  # the final b"" ends it if nothing else did
    assert all("pässwörd" not in e.detail for e in verdicts if isinstance(e, BackendFailed))
