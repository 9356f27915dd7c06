"""The backend POP3 login core: backend bytes in, events out.

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

from mailgate.backend import pop3 as pop3_module
from mailgate.backend.pop3 import Pop3Login
from mailgate.protocols.events import BackendFailed, BackendReady, Send, StartTLS
from mailgate.values import ClientInfo, Secret

MODES = ["whole", "bytes", "trailing"]
EXTRA = b"+OK 2 messages\r\n"  # what a backend may send right after the verdict (a pipelined STAT)

GREET = b"+OK Dovecot ready.\r\n"
OK_LOGIN = b"+OK Logged in.\r\n"
USER_PASS = [("C", b"USER alice\r\n"), ("S", b"+OK\r\n"), ("C", b"PASS secret\r\n")]


def run(core, script, mode):
    return backend_script.run(core, script, mode, EXTRA)


def ready(core, script, mode, reply=b"+OK Logged in.", trailing=b""):
    final, leftover = run(core, script, mode)
    assert isinstance(final, BackendReady), final
    assert final.reply == reply
    extra = EXTRA if mode == "trailing" and script[-1][0] == "S" else b""
    assert final.trailing + leftover == trailing + extra
    return final


def failed(core, script, mode, temporary):
    final, _ = run(core, script, mode)
    assert isinstance(final, BackendFailed), final
    assert final.temporary is temporary
    return final


def login(password="secret", user="alice", **kwargs):
    return Pop3Login(user, Secret(password), **kwargs)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


# --- greeting and USER/PASS -----------------------------------------------------------------


@pytest.mark.parametrize("greeting", [GREET, b"+OK\r\n", b"+ok <1.2@host>\n"])
def test_user_pass(mode, greeting):
    ready(login(), [("S", greeting), *USER_PASS, ("S", OK_LOGIN)], mode)


@pytest.mark.parametrize(
    "greeting", [b"-ERR [SYS/TEMP] go away\r\n", b"* OK IMAP\r\n", b"220 smtp\r\n", b"+ \r\n"]
)
def test_greeting_that_is_not_ok_is_temporary(mode, greeting):
    final = failed(login(), [("S", greeting)], mode, temporary=True)
    assert greeting.strip().decode() in final.detail


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", 'my little p%ony "quoted" \\'), ("jörg@example.com", "pässwörd")],
)
def test_user_and_password_are_sent_raw(mode, user, password):
    script = [
        ("S", GREET),
        ("C", b"USER " + user.encode() + b"\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"PASS " + password.encode() + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(password, user), script, mode)


@pytest.mark.parametrize(
    ("user", "password"),
    [("alice", "a\r\nDELE 1"), ("alice", "a\nb"), ("alice", "a\0b"), ("al\rice", "x")],
)
def test_line_breaks_and_nul_are_refused_without_sending(mode, user, password):
    final = failed(login(password, user), [("S", GREET)], mode, temporary=False)
    assert "not sent" in final.detail


def test_ok_with_trailing_data(mode):
    script = [("S", GREET), *USER_PASS, ("S", OK_LOGIN + b"+OK 0 0\r\n")]
    ready(login(), script, mode, trailing=b"+OK 0 0\r\n")


def test_nothing_more_is_sent_before_each_reply():
    core = login()
    assert core.receive(GREET) == [Send(b"USER alice\r\n")]
    assert core.receive(b"+O") == []
    assert core.receive(b"K\r\n") == [Send(b"PASS secret\r\n")]
    assert core.receive(OK_LOGIN) == [BackendReady(b"+OK Logged in.")]
    assert core.receive(OK_LOGIN) == []


# --- -ERR mapping ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [
        (b"-ERR [AUTH] Authentication failed.", False),
        (b"-ERR Authentication failed.", False),
        (b"-err invalid password", False),
        (b"-ERR [SYS/PERM] Account disabled", False),
        (b"-ERR [SYS/TEMP] Temporary authentication failure.", True),
        (b"-ERR [IN-USE] Mailbox locked by another session", True),
        (b"-ERR [LOGIN-DELAY] Wait a little", True),
        (b"* OK nonsense", True),
        (b"+ more?", True),
    ],
)
def test_pass_verdict_mapping(mode, reply, temporary):
    script = [("S", GREET), *USER_PASS, ("S", reply + b"\r\n")]
    final = failed(login(), script, mode, temporary)
    assert reply.decode() in final.detail


@pytest.mark.parametrize(
    ("reply", "temporary"), [(b"-ERR [AUTH] No such user", False), (b"-ERR [SYS/TEMP] x", True)]
)
def test_err_to_user_maps_the_same_and_keeps_the_password(mode, reply, temporary):
    script = [("S", GREET), ("C", b"USER alice\r\n"), ("S", reply + b"\r\n")]
    failed(login(), script, mode, temporary)


# --- AUTH PLAIN -----------------------------------------------------------------------------

BLOB = base64.b64encode(b"\0alice\0secret")


def test_auth_plain_with_initial_response(mode):
    script = [("S", GREET), ("C", b"AUTH PLAIN " + BLOB + b"\r\n"), ("S", OK_LOGIN)]
    ready(login(mechanism="plain"), script, mode)


def test_auth_plain_allows_line_breaks_in_the_password(mode):
    blob = base64.b64encode(b"\0alice\0a\r\nb")
    script = [("S", GREET), ("C", b"AUTH PLAIN " + blob + b"\r\n"), ("S", OK_LOGIN)]
    ready(login("a\r\nb", mechanism="plain"), script, mode)


@pytest.mark.parametrize("continuation", [b"+ \r\n", b"+\r\n", b"+ go ahead\r\n"])
def test_long_auth_plain_waits_for_continuation(mode, continuation):
    password = "p" * 300  # "AUTH PLAIN <base64>" would exceed RFC 2449's 255 octets
    blob = base64.b64encode(b"\0alice\0" + password.encode())
    script = [
        ("S", GREET),
        ("C", b"AUTH PLAIN\r\n"),
        ("S", continuation),
        ("C", blob + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(login(password, mechanism="plain"), script, mode)


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [(b"-ERR [AUTH] Unsupported mechanism", False), (b"+OK too soon", True)],
)
def test_auth_plain_refused_before_the_response(mode, reply, temporary):
    script = [("S", GREET), ("C", b"AUTH PLAIN\r\n"), ("S", reply + b"\r\n")]
    failed(login("p" * 300, mechanism="plain"), script, mode, temporary)


def test_auth_plain_refuses_nul(mode):
    failed(login("a\0b", mechanism="plain"), [("S", GREET)], mode, temporary=False)


@pytest.mark.parametrize(
    ("reply", "temporary"),
    [(b"-ERR [AUTH] Authentication failed.", False), (b"-ERR [SYS/TEMP] down", True)],
)
def test_auth_plain_verdict(mode, reply, temporary):
    script = [("S", GREET), ("C", b"AUTH PLAIN " + BLOB + b"\r\n"), ("S", reply + b"\r\n")]
    failed(login(mechanism="plain"), script, mode, temporary)


# --- STLS -----------------------------------------------------------------------------------


def test_stls_discards_plaintext(mode):
    script = [
        ("S", GREET),
        ("C", b"STLS\r\n"),
        ("S", b"+OK Begin TLS negotiation now.\r\n+OK forged\r\n"),
        ("TLS",),
        *USER_PASS,
        ("S", OK_LOGIN),
    ]
    ready(login(starttls=True), script, mode)


def test_bytes_arriving_while_tls_is_pending_are_ignored():
    core = login(starttls=True, mechanism="plain")
    assert core.receive(GREET) == [Send(b"STLS\r\n")]
    assert core.receive(b"+OK\r\n") == [StartTLS()]
    assert core.receive(b"+OK forged\r\n") == []
    assert core.tls_started() == [Send(b"AUTH PLAIN " + BLOB + b"\r\n")]
    assert core.receive(OK_LOGIN) == [BackendReady(b"+OK Logged in.")]


@pytest.mark.parametrize("reply", [b"-ERR no TLS here\r\n", b"HTTP/1.1 400\r\n"])
def test_stls_refused_is_temporary(mode, reply):
    script = [("S", GREET), ("C", b"STLS\r\n"), ("S", reply)]
    failed(login(starttls=True), script, mode, temporary=True)


def test_tls_started_out_of_turn_is_a_programming_error():
    with pytest.raises(RuntimeError):
        login().tls_started()


# --- XCLIENT --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply", [b"+OK Updated\r\n", b"-ERR You are not from trusted IP\r\n", b"-ERR Unknown\r\n"]
)
def test_xclient_before_login_and_its_result_ignored(mode, reply):
    forward = ClientInfo("1.2.3.4", 1234, "pop3", "10.0.0.1", 110)
    script = [
        ("S", GREET),
        ("C", b"XCLIENT ADDR=1.2.3.4 PORT=1234\r\n"),
        ("S", reply),
        *USER_PASS,
        ("S", OK_LOGIN),
    ]
    ready(login(forward=forward), script, mode)


@pytest.mark.parametrize(
    ("forward", "sent"),
    [
        (ClientInfo("2001:db8::1", 0, "pop3"), b"XCLIENT ADDR=2001:db8::1\r\n"),
        (ClientInfo("1.2.3.4", 99, "pop3"), b"XCLIENT ADDR=1.2.3.4 PORT=99\r\n"),
    ],
)
def test_xclient_forwards_only_known_clean_fields(mode, forward, sent):
    script = [("S", GREET), ("C", sent), ("S", b"+OK\r\n"), *USER_PASS, ("S", OK_LOGIN)]
    ready(login(forward=forward), script, mode)


def test_no_xclient_without_anything_to_forward(mode):
    forward = ClientInfo("bad addr", 0, "pop3")
    ready(login(forward=forward), [("S", GREET), *USER_PASS, ("S", OK_LOGIN)], mode)


def test_xclient_after_stls(mode):
    script = [
        ("S", GREET),
        ("C", b"STLS\r\n"),
        ("S", b"+OK\r\n"),
        ("TLS",),
        ("C", b"XCLIENT ADDR=1.2.3.4 PORT=5\r\n"),
        ("S", b"+OK\r\n"),
        ("C", b"AUTH PLAIN " + BLOB + b"\r\n"),
        ("S", OK_LOGIN),
    ]
    ready(
        login(starttls=True, mechanism="plain", forward=ClientInfo("1.2.3.4", 5, "pop3")),
        script,
        mode,
    )


def test_malformed_xclient_reply_is_temporary(mode):
    script = [("S", GREET), ("C", b"XCLIENT ADDR=1.2.3.4\r\n"), ("S", b"what\r\n")]
    failed(login(forward=ClientInfo("1.2.3.4", 0, "pop3")), script, mode, temporary=True)


# --- EOF, limits ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [
        [("EOF",)],
        [("S", b"+OK hi"), ("EOF",)],
        [("S", GREET), ("C", b"USER alice\r\n"), ("EOF",)],
        [("S", GREET), *USER_PASS, ("EOF",)],
        [("S", GREET), ("C", b"STLS\r\n"), ("S", b"+OK\r\n"), ("EOF",)],
    ],
)
def test_eof_before_the_verdict_is_temporary(mode, script):
    starttls = any(step == ("C", b"STLS\r\n") for step in script)
    final = failed(login(starttls=starttls), script, mode, temporary=True)
    assert final.detail == "backend closed the connection"


def test_overlong_line_is_temporary(mode):
    failed(login(max_line=64), [("S", b"+OK " + b"x" * 100)], mode, temporary=True)
    failed(login(max_line=64), [("S", b"+OK " + b"x" * 100 + b"\r\n")], mode, temporary=True)


# --- secrets --------------------------------------------------------------------------------

PASSWORD = "Sup3r s3cret pw"


@pytest.mark.parametrize(
    "echo",
    [
        b"-ERR Unknown command: PASS Sup3r s3cret pw",
        b"-ERR [AUTH] bad: " + base64.b64encode(b"\0alice\0" + PASSWORD.encode()),
        b"hmm Sup3r s3cret pw",
    ],
)
def test_password_never_in_detail(mode, echo):
    for mechanism, sent in (
        ("user", [("C", b"USER alice\r\n"), ("S", b"+OK\r\n"), ("C", b"PASS Sup3r s3cret pw\r\n")]),
        (
            "plain",
            [("C", b"AUTH PLAIN " + base64.b64encode(b"\0alice\0Sup3r s3cret pw") + b"\r\n")],
        ),
    ):
        core = login(PASSWORD, mechanism=mechanism)
        final, _ = run(core, [("S", GREET), *sent, ("S", echo + b"\r\n")], mode)
        assert isinstance(final, BackendFailed)
        assert "s3cret" not in final.detail
        assert base64.b64encode(b"\0alice\0" + PASSWORD.encode()).decode() not in final.detail
        assert "s3cret" not in repr(core)


def test_unknown_mechanism_is_a_programming_error():
    with pytest.raises(ValueError, match="apop"):
        login(mechanism="apop")


# --- invariants -----------------------------------------------------------------------------


def test_core_imports_no_io():
    tree = ast.parse(inspect.getsource(pop3_module))
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
    mechanism=st.sampled_from(["user", "plain"]),
)
def test_any_input_gives_events(chunks, starttls, mechanism):
    forward = ClientInfo("1.2.3.4", 5, "pop3")
    core = login("pässwörd", starttls=starttls, mechanism=mechanism, forward=forward, max_line=32)
    events = []
    for chunk in [b"+OK\r\n", *chunks, b""]:
        new = core.receive(chunk)
        if any(isinstance(e, StartTLS) for e in new):
            new += core.tls_started()
        events += new
    assert all(isinstance(e, Send | StartTLS | BackendReady | BackendFailed) for e in events)
    verdicts = [e for e in events if isinstance(e, BackendReady | BackendFailed)]
    assert len(verdicts) == 1  # the final b"" ends it if nothing else did
    assert all("pässwörd" not in e.detail for e in verdicts if isinstance(e, BackendFailed))
