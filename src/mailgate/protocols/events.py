"""The vocabulary shared by every protocol core, client side and backend side.

A core takes bytes and returns a list of events; the driver performs them in order and reports
outcomes back. Cores raise `ProtocolError` internally and turn it into events at their edge, so
a driver only ever sees events.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.values import CloseReason, Credentials

# --- events a core asks the driver to perform -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Write these bytes to the peer."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StartTLS:
    """Upgrade the connection to TLS now, then call `core.tls_started()`."""


@dataclass(frozen=True, slots=True)
class Authenticate:
    """Ask the authenticator about these credentials, then call `core.finish_login(outcome)`."""

    credentials: Credentials


@dataclass(frozen=True, slots=True)
class Close:
    """Close the connection after the preceding sends are flushed."""

    reason: CloseReason


@dataclass(frozen=True, slots=True)
class BackendReady:
    """Backend side: the login succeeded.

    `reply` is the backend's success line without tag and CRLF (b"OK [CAPABILITY ...] Logged in",
    b"+OK Logged in.", b"235 2.7.0 ..."); `trailing` holds bytes the backend sent after it.
    """

    reply: bytes
    trailing: bytes = b""


@dataclass(frozen=True, slots=True)
class BackendFailed:
    """Backend side: the login failed. `detail` is the backend's text, for the log only.

    `temporary` says whose fault it is: True when the backend is in trouble (unreachable, a
    timeout, a BYE, [UNAVAILABLE]), which counts against its health; False when it refused the
    credentials it was given. The client gets the protocol's temporary failure either way,
    unless `client_reply` is set: the backend's own answer has the last word (an SMTP backend
    refusing a relayed recipient: its code and text).
    """

    temporary: bool
    detail: str
    client_reply: Rejected | None = None


Event = Send | StartTLS | Authenticate | Close
BackendEvent = Send | StartTLS | BackendReady | BackendFailed


# --- outcomes the driver reports back to a client core ----------------------------------------


@dataclass(frozen=True, slots=True)
class LoggedIn:
    """The backend accepted the login; `backend_reply` is its success line (see BackendReady)."""

    backend_reply: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """The authenticator said no. `message` is shown to the client (after sanitising)."""

    message: str
    error_code: str | None = None  # SMTP only: e.g. "535 5.7.8"
    # An OAuth login's error challenge (RFC 7628 3.2.2, the JSON before base64): sent first,
    # the client's one dummy response read, and only then the failure reply.
    challenge: bytes | None = None


@dataclass(frozen=True, slots=True)
class Unavailable:
    """Auth service or backend could not be reached or answered garbage: a temporary failure."""


@dataclass(frozen=True, slots=True)
class Limited:
    """A session limit (per user, per user and address, per address) refuses the login: a
    temporary failure that says so (RFC 5530 [LIMIT], RFC 3206 [IN-USE])."""


LoginOutcome = LoggedIn | Rejected | Unavailable | Limited


class ProtocolError(Exception):
    """Raised inside a core; carries the exact reply. Turned into events in one place.

    `close` is set when the session must end after the reply. The reply never contains
    exception text or anything the client sent before authentication beyond what the protocol
    requires (the IMAP tag).
    """

    def __init__(self, reply: bytes, *, close: CloseReason | None = None) -> None:
        super().__init__(reply.decode("ascii", "replace").rstrip())
        self.reply = reply
        self.close = close


class BadCommand(ProtocolError):
    """An error reply to a command the client should not have sent: spends the error budget
    (nginx's max_errors). Every refused command is one, in every protocol."""
