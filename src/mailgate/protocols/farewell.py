"""What each protocol says when mailgate, not the client, ends a session, and how to tell a
clean end (LOGOUT, QUIT) from a backend that went away. Used by the driver and the relay, which
format no protocol text of their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Farewell:
    idle: bytes  # the session was idle too long (before or after login)
    shutdown: bytes  # mailgate is stopping
    backend_lost: bytes  # the backend closed without the protocol's goodbye
    unavailable: bytes  # the session cannot go on (internal error): a temporary failure
    busy: bytes  # the worker holds max_sessions already: try again later
    # (last bytes from the client, last bytes from the backend) -> the session ended cleanly
    normal_end: Callable[[bytes, bytes], bool]


def _imap_end(client_tail: bytes, backend_tail: bytes) -> bool:
    # The server sends "* BYE" before it closes on its own accord (RFC 9051 7.1.5); after
    # LOGOUT the BYE may have scrolled out of the tail behind the tagged OK.
    return b"BYE" in backend_tail or b"LOGOUT" in client_tail.upper()


def _pop3_end(client_tail: bytes, backend_tail: bytes) -> bool:
    return client_tail.rstrip().upper().endswith(b"QUIT")


def _smtp_end(client_tail: bytes, backend_tail: bytes) -> bool:
    return backend_tail.startswith((b"221", b"421")) or b"\n221" in backend_tail


FAREWELLS = {
    "imap": Farewell(
        idle=b"* BYE Disconnected for inactivity.\r\n",
        shutdown=b"* BYE Server shutting down.\r\n",
        backend_lost=b"* BYE [UNAVAILABLE] Backend server closed the connection.\r\n",
        unavailable=b"* BYE [UNAVAILABLE] Internal error, try again later.\r\n",
        busy=b"* BYE [UNAVAILABLE] Too many connections, try again later.\r\n",
        normal_end=_imap_end,
    ),
    "pop3": Farewell(
        idle=b"-ERR Disconnected for inactivity.\r\n",
        shutdown=b"-ERR [SYS/TEMP] Server shutting down.\r\n",
        backend_lost=b"-ERR [SYS/TEMP] Backend server closed the connection.\r\n",
        unavailable=b"-ERR [SYS/TEMP] Internal error, try again later.\r\n",
        busy=b"-ERR [SYS/TEMP] Too many connections, try again later.\r\n",
        normal_end=_pop3_end,
    ),
    "smtp": Farewell(
        idle=b"421 4.4.2 Error: timeout exceeded\r\n",
        shutdown=b"421 4.3.2 Server shutting down\r\n",
        backend_lost=b"421 4.4.0 Backend server closed the connection\r\n",
        unavailable=b"421 4.3.0 Internal error, try again later\r\n",
        busy=b"421 4.7.0 Too many connections, try again later\r\n",
        normal_end=_smtp_end,
    ),
}
