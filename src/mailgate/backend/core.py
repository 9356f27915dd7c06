"""The skeleton of the three backend login cores: what logging in to IMAP, POP3 and SMTP
backends has in common, once.

The backend speaks first, so there is no `start()`: the driver (netio.exchange, through
backend/connect.py) feeds bytes and performs the events until `BackendReady` or
`BackendFailed`. Here live the read loop (one unit at a time: a line, or a whole SMTP reply,
through the protocol's `_next_unit`), the state table dispatch, the TLS rule (plaintext after
the STARTTLS reply is never trusted), the credentials as bytes with their NUL checks, and the
one place a `LoginFailure` becomes `BackendFailed`, with every form of the password masked.

Sans-I/O: nothing here touches a socket or a clock.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

from mailgate.backend import LoginFailure, describe
from mailgate.protocols.events import BackendEvent, BackendFailed
from mailgate.protocols.lines import LineBuffer, LineTooLong
from mailgate.values import Secret

# No sane backend sends a longer line before login (Dovecot's imap_max_line_length; far above
# RFC 2449's and RFC 5321's 512 octets).
DEFAULT_MAX_LINE = 65536


class LoginCore:
    """Log in to a backend as `user` with `secret`; a protocol supplies its states' handlers."""

    __slots__ = ("_buf", "_events", "_secret", "_state", "_user")

    # The protocol's states that read nothing: finished, and waiting for the TLS handshake.
    DONE: ClassVar[Enum]
    TLS_PENDING: ClassVar[Enum]
    # Which handler reads the next unit (line or reply) in each state.
    _handlers: ClassVar[dict[Any, Callable[[Any, Any], list[BackendEvent]]]]

    def __init__(self, user: str, secret: Secret, start: Enum, max_line: int) -> None:
        self._user = user
        self._secret = secret
        self._buf = LineBuffer(max_line)
        self._state = start
        self._events: list[BackendEvent] = []  # fed but not yet taken by next_events

    @property
    def state(self) -> Enum:
        return self._state

    # --- the driver's surface ---------------------------------------------------------------

    def receive(self, data: bytes) -> list[BackendEvent]:
        """Feed bytes from the backend; b"" means it closed the connection."""
        if self._state is self.DONE:
            return []
        if not data:
            self._state = self.DONE
            return [BackendFailed(temporary=True, detail="backend closed the connection")]
        if self._state is self.TLS_PENDING:
            return []  # plaintext after the STARTTLS reply is never trusted (CVE-2011-0411)
        self._buf.feed(data)
        events: list[BackendEvent] = []
        try:
            while self._state is not self.DONE and self._state is not self.TLS_PENDING:
                try:
                    unit = self._next_unit()
                except LineTooLong:
                    raise LoginFailure(True, "backend line too long") from None
                if unit is None:
                    break
                events += self._handlers[self._state](self, unit)
        except LoginFailure as failure:
            events.append(self._fail(failure))
        return events

    def feed(self, data: bytes) -> None:
        self._events += self.receive(data)

    def next_events(self) -> list[BackendEvent]:
        events, self._events = self._events, []
        return events

    def tls_started(self) -> list[BackendEvent]:
        """The TLS handshake with the backend is done: forget plaintext state and go on."""
        if self._state is not self.TLS_PENDING:
            raise RuntimeError(f"tls_started() in state {self._state.name}")
        self._buf.clear()
        try:
            return self._after_tls()
        except LoginFailure as failure:
            return [self._fail(failure)]

    # --- for the protocols ------------------------------------------------------------------

    def _next_unit(self) -> Any:
        """The next thing a handler reads (a line by default); None until it is complete."""
        return self._buf.next_line()

    def _after_tls(self) -> list[BackendEvent]:
        raise NotImplementedError

    def _credentials(self) -> tuple[bytes, bytes]:
        """User name and password as sent; neither may hold NUL (no protocol can carry it)."""
        user = self._user.encode("utf-8", "surrogateescape")
        password = self._secret.reveal().encode("utf-8", "surrogateescape")
        if b"\0" in user or b"\0" in password:
            raise LoginFailure(False, "user name or password contains NUL; not sent")
        return user, password

    def _plain_blob(self) -> bytes:
        """SASL PLAIN (RFC 4616) without authzid, base64."""
        user, password = self._credentials()
        return base64.b64encode(b"\0" + user + b"\0" + password)

    def _fail(self, failure: LoginFailure) -> BackendFailed:
        self._state = self.DONE
        detail = describe(failure, self._masks())
        return BackendFailed(failure.temporary, detail, failure.client_reply)

    def _masks(self) -> tuple[bytes, ...]:
        """Every form in which the password could come back in a backend's echo."""
        user = self._user.encode("utf-8", "surrogateescape")
        password = self._secret.reveal().encode("utf-8", "surrogateescape")
        if not password:
            return ()
        blob = base64.b64encode(b"\0" + user + b"\0" + password)
        quoted = b'"' + password.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return (blob, quoted, password)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(user={self._user!r}, state={self._state.name})"
