"""One record per protocol (nginx's ngx_mail_protocol_s): everything the rest of mailgate needs
to know about IMAP, POP3 and SMTP that is not grammar.

The config reads its defaults here, the session driver its core and goodbyes, the relay its
goodbyes, its response-boundary tracker and its clean-end test. Adding a protocol means adding
a record, not editing five dicts in five modules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mailgate.protocols.boundary import ImapBoundary, Pop3Boundary, SmtpBoundary
from mailgate.protocols.core import PreAuthCore
from mailgate.protocols.imap import ImapCore
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.pop3 import Pop3Core
from mailgate.protocols.smtp import SmtpCore
from mailgate.values import Goodbyes

Boundary = ImapBoundary | Pop3Boundary | SmtpBoundary


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    name: str
    port: int  # the default port of a route that names none (the seed's table)
    core: Callable[[PreAuthPolicy, str], PreAuthCore]
    goodbyes: Goodbyes
    boundary: Callable[[], Boundary]
    # (last bytes from the client, last bytes from the backend) -> the session ended cleanly
    normal_end: Callable[[bytes, bytes], bool]
    # Config: login methods a listener may enable, those on by default, the default
    # capabilities before login and the greeting text.
    auth_methods: tuple[str, ...]
    default_auth: tuple[str, ...]
    default_capabilities: tuple[str, ...]
    default_greeting: str
    default_max_line: int


def _imap_end(client_tail: bytes, backend_tail: bytes) -> bool:
    # The server sends "* BYE" before it closes on its own accord (RFC 9051 7.1.5); after
    # LOGOUT the BYE may have scrolled out of the tail behind the tagged OK.
    return b"BYE" in backend_tail or b"LOGOUT" in client_tail.upper()


def _pop3_end(client_tail: bytes, backend_tail: bytes) -> bool:
    return client_tail.rstrip().upper().endswith(b"QUIT")


def _smtp_end(client_tail: bytes, backend_tail: bytes) -> bool:
    return backend_tail.startswith((b"221", b"421")) or b"\n221" in backend_tail


IMAP = ProtocolSpec(
    name="imap",
    port=143,
    core=ImapCore,
    goodbyes=Goodbyes(
        idle=b"* BYE Disconnected for inactivity.\r\n",
        shutdown=b"* BYE Server shutting down.\r\n",
        backend_lost=b"* BYE [UNAVAILABLE] Backend server closed the connection.\r\n",
        unavailable=b"* BYE [UNAVAILABLE] Internal error, try again later.\r\n",
        busy=b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n",
        kicked=b"* BYE [UNAVAILABLE] Disconnected by the administrator.\r\n",
    ),
    boundary=ImapBoundary,
    normal_end=_imap_end,
    auth_methods=("login", "plain", "cram-md5", "xoauth2", "oauthbearer"),
    default_auth=("login", "plain"),
    # What Dovecot advertises before login; the backend's own list is passed on after login.
    default_capabilities=("IMAP4rev1", "IDLE", "ENABLE"),
    default_greeting="mailgate ready.",
    default_max_line=64 * 1024,  # Dovecot's imap_max_line_length; fits RFC 2971's largest ID
)

POP3 = ProtocolSpec(
    name="pop3",
    port=110,
    core=Pop3Core,
    goodbyes=Goodbyes(
        idle=b"-ERR Disconnected for inactivity.\r\n",
        shutdown=b"-ERR [SYS/TEMP] Server shutting down.\r\n",
        backend_lost=b"-ERR [SYS/TEMP] Backend server closed the connection.\r\n",
        unavailable=b"-ERR [SYS/TEMP] Internal error, try again later.\r\n",
        busy=b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n",
        kicked=b"-ERR [SYS/TEMP] Disconnected by the administrator.\r\n",
    ),
    boundary=Pop3Boundary,
    normal_end=_pop3_end,
    auth_methods=("user", "apop", "plain", "login", "cram-md5", "xoauth2", "oauthbearer"),
    default_auth=("user", "plain"),
    default_capabilities=("TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"),
    default_greeting="mailgate ready.",
    # RFC 2449 keeps commands under 255 octets; AUTH initial responses (RFC 5034) are longer.
    default_max_line=16 * 1024,
)

SMTP = ProtocolSpec(
    name="smtp",
    port=25,
    core=SmtpCore,
    goodbyes=Goodbyes(
        idle=b"421 4.4.2 Error: timeout exceeded\r\n",
        shutdown=b"421 4.3.2 Server shutting down\r\n",
        backend_lost=b"421 4.4.0 Backend server closed the connection\r\n",
        unavailable=b"421 4.3.0 Internal error, try again later\r\n",
        busy=b"421 4.7.0 Too many connections, try again later\r\n",
        kicked=b"421 4.3.0 Disconnected by the administrator\r\n",
    ),
    boundary=SmtpBoundary,
    normal_end=_smtp_end,
    auth_methods=("plain", "login", "cram-md5", "none", "xoauth2", "oauthbearer"),
    default_auth=("plain", "login"),
    # 35882577 is nginx's and Postfix's customary SIZE; an operator sets the backend's own.
    default_capabilities=("SIZE 35882577", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"),
    default_greeting="ready",  # after "220 <hostname> ESMTP "
    # RFC 4954 4: an AUTH line with its initial response may be 12288 octets.
    default_max_line=16 * 1024,
)

SPECS: dict[str, ProtocolSpec] = {spec.name: spec for spec in (IMAP, POP3, SMTP)}
