"""The hop marker between proxies (Dovecot's IMAP ID "x-proxy-ttl"): read from a proxy in
front, sent to the backend beside the client's address, bytes in and events out."""

from __future__ import annotations

from mailgate.backend.imap import ImapLogin
from mailgate.protocols.events import Authenticate, Send
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.values import ClientInfo, Secret

POLICY = PreAuthPolicy(
    mechanisms=("plain", "login"),
    capabilities=(),
    starttls=False,
    tls_active=False,
    starttls_only=False,
    greeting="ready",
    hostname="mail.example.com",
    max_errors=5,
    max_line=65536,
)


def login_after(id_command: bytes) -> Authenticate:
    core = ImapCore(POLICY, "<1.2@host>")
    core.greet()
    events = core.receive(id_command + b"a2 LOGIN alice pw\r\n")
    found = [e for e in events if isinstance(e, Authenticate)]
    assert len(found) == 1, events
    return found[0]


def test_the_hops_a_proxy_in_front_said_reach_the_credentials() -> None:
    said = login_after(b'a1 ID ("name" "proxy" "X-Proxy-TTL" "3")\r\n')
    assert said.credentials.proxy_ttl == 3


def test_no_marker_or_a_garbled_one_is_none() -> None:
    assert login_after(b"").credentials.proxy_ttl is None
    assert login_after(b'a1 ID ("x-proxy-ttl" "many")\r\n').credentials.proxy_ttl is None
    assert login_after(b'a1 ID ("x-proxy-ttl" "123456")\r\n').credentials.proxy_ttl is None
    assert login_after(b"a1 ID NIL\r\n").credentials.proxy_ttl is None


def test_the_backend_login_sends_the_hops_left_beside_the_client_address() -> None:
    client = ClientInfo("192.0.2.7", 50123, "imap", "198.51.100.1", 143)
    core = ImapLogin("alice", Secret("pw"), forward=client, proxy_ttl=4)
    sent = b"".join(e.data for e in core.receive(b"* OK ready\r\n") if isinstance(e, Send))
    assert b'"x-originating-ip" "192.0.2.7"' in sent
    assert b'"x-proxy-ttl" "4"' in sent


def test_without_forward_client_no_id_is_sent_for_the_marker_alone() -> None:
    core = ImapLogin("alice", Secret("pw"), proxy_ttl=4)
    sent = b"".join(e.data for e in core.receive(b"* OK ready\r\n") if isinstance(e, Send))
    assert b" ID " not in sent
