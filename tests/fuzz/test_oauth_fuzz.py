"""Invariants of the three client cores on the long-token paths (design rule 10).

The cores get XOAUTH2 and OAUTHBEARER enabled, input mixing protocol words with client
messages whose tokens run from a few bytes to past `max_token`, split anywhere, and outcomes
that include refusals with an error challenge (RFC 7628). Whatever arrives, the core returns
events (never raises), every reply is whole CRLF-terminated lines, one command's output stays
small, nothing follows a Close, and no reply carries the token.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailgate.protocols.core import PreAuthCore, State
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
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import error_challenge
from mailgate.protocols.spec import SPECS
from mailgate.values import Method

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# A CAPABILITY / CAPA / EHLO reply, or a challenge and a failure: small, whatever the input.
MAX_STEP_OUTPUT = 2048
CHALLENGE = error_challenge(Method.OAUTHBEARER, scope="mail", openid_configuration="https://i/")
SECRET_PART = "SeCrEtToKeN"  # in every token, so a reply that echoes one is caught

VERBS = {
    "imap": [b"a AUTHENTICATE XOAUTH2 ", b"a AUTHENTICATE OAUTHBEARER ", b"a CAPABILITY"],
    "pop3": [b"AUTH XOAUTH2 ", b"AUTH OAUTHBEARER ", b"CAPA", b"AUTH XOAUTH2"],
    "smtp": [b"EHLO c\r\n", b"AUTH XOAUTH2 ", b"AUTH OAUTHBEARER ", b"AUTH XOAUTH2"],
}
OTHER = [b"\r\n", b"*\r\n", b"=\r\n", b"AQ==\r\n", b" ", b"\x01", b"STARTTLS\r\n", b"QUIT\r\n"]


@st.composite
def client_message(draw: st.DrawFn) -> bytes:
    """A base64 XOAUTH2 or OAUTHBEARER message, sometimes malformed, token of any length."""
    size = draw(st.sampled_from([0, 1, 100, 1500, 4000, 8000, 17000]))
    token = (SECRET_PART + "x" * size)[: max(size, len(SECRET_PART))]
    user = draw(st.sampled_from(["alice@example.com", "", "a,b=c", "\x01"]))
    kind = draw(st.sampled_from(["xoauth2", "oauthbearer", "no-auth", "no-end", "basic"]))
    raw = {
        "xoauth2": f"user={user}\x01auth=Bearer {token}\x01\x01",
        "oauthbearer": f"n,a={user},\x01host=mx\x01auth=Bearer {token}\x01\x01",
        "no-auth": f"n,,\x01host=mx\x01\x01{token}",
        "no-end": f"user={user}\x01auth=Bearer {token}",
        "basic": f"user={user}\x01auth=Basic {token}\x01\x01",
    }[kind]
    encoded = base64.b64encode(raw.encode("utf-8", "surrogateescape"))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(encoded)))
        encoded = encoded[:cut] + draw(st.sampled_from([b"", b"!", b"\x00", b"="])) + encoded[cut:]
    return encoded + b"\r\n"


def script(protocol: str) -> st.SearchStrategy[bytes]:
    piece = st.one_of(
        st.sampled_from(VERBS[protocol]),
        st.sampled_from(OTHER),
        client_message(),
        st.binary(max_size=4),
    )
    return st.lists(piece, max_size=12).map(b"".join)


outcomes = st.lists(
    st.one_of(
        st.just(Unavailable()),
        st.just(LoggedIn(b"OK Logged in")),
        st.just(Rejected("Authentication failed.", challenge=CHALLENGE)),
        st.just(Rejected("Authentication failed.")),
    ),
    max_size=5,
)


def split(data: bytes, cuts: list[int]) -> Iterator[bytes]:
    start = 0
    for cut in sorted({c % (len(data) + 1) for c in cuts}):
        yield data[start:cut]
        start = cut
    yield data[start:]


def drive(
    core: PreAuthCore, data: bytes, cuts: list[int], answers: list[LoginOutcome]
) -> list[Event]:
    events: list[Event] = []
    pending = list(answers)

    def perform(new: list[Event]) -> None:
        for i, event in enumerate(new):
            events.append(event)
            if isinstance(event, StartTLS):
                assert i == len(new) - 1
                perform(core.tls_started())
            elif isinstance(event, Authenticate):
                assert i == len(new) - 1
                assert core.state is State.AUTHENTICATING
                perform(core.finish_login(pending.pop(0) if pending else Rejected("no")))

    def pump() -> None:
        while step := core.next_events():
            assert sum(len(e.data) for e in step if isinstance(e, Send)) <= MAX_STEP_OUTPUT
            perform(step)

    perform(core.greet())
    for chunk in split(data, cuts):
        if chunk and core.state is not State.LOGGED_IN:
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
            assert b"\n" not in event.data.replace(b"\r\n", b""), "a bare LF in a reply"
            assert SECRET_PART.encode() not in event.data, "a reply carries the token"
            assert base64.b64encode(SECRET_PART.encode())[:8] not in event.data
        if isinstance(event, Close):
            assert i == len(events) - 1, "events after a Close"


def policies(protocol: str) -> st.SearchStrategy[PreAuthPolicy]:
    return st.builds(
        PreAuthPolicy,
        mechanisms=st.sampled_from(
            [("xoauth2", "oauthbearer"), ("oauthbearer",), ("plain", "xoauth2")]
        ),
        capabilities=st.just(()),
        starttls=st.booleans(),
        tls_active=st.booleans(),
        starttls_only=st.booleans(),
        greeting=st.just("ready"),
        max_errors=st.integers(1, 5),
        max_line=st.sampled_from([1024, 16384]),
        max_auth_attempts=st.integers(1, 3),
        max_token=st.sampled_from([1024, 16384]),
    )


def _fuzz(protocol: str) -> None:
    @FUZZ
    @given(
        policies(protocol),
        script(protocol),
        st.lists(st.integers(0, 40000), max_size=6),
        outcomes,
    )
    def run(
        policy: PreAuthPolicy, data: bytes, cuts: list[int], answers: list[LoginOutcome]
    ) -> None:
        core = SPECS[protocol].core(policy, "<1.2@fuzz>")
        check(drive(core, data, cuts, answers))
        assert core.state in (State.CLOSED, State.LOGGED_IN)

    run()


def test_imap_long_tokens() -> None:
    _fuzz("imap")


def test_pop3_long_tokens() -> None:
    _fuzz("pop3")


def test_smtp_long_tokens() -> None:
    _fuzz("smtp")
