"""The skeleton of the three backend login cores: what logging in to IMAP, POP3 and SMTP
backends has in common, once.

The backend speaks first, so there is no `start()`: the driver (netio.exchange, through
backend/connect.py) feeds bytes and performs the events until `BackendReady` or
`BackendFailed`. Here live the read loop (one unit at a time: a line, or a whole SMTP reply,
through the protocol's `_next_unit`), the state table dispatch, the TLS rule (plaintext after
the STARTTLS reply is never trusted), the credentials as bytes with their NUL checks, and the
one place a `LoginFailure` becomes `BackendFailed`, with every form of the password masked.

An OAuth route (`token_mechanism` "xoauth2" or "oauthbearer") passes the client's bearer
token on for the backend to validate (Dovecot's oauth2 passdb): the SASL message is built here,
and so is the backend's refusal, which RFC 7628 makes a three-step exchange: an error
challenge, our dummy response, then the NO / -ERR / 535. That refusal is the backend's verdict
on the token, so the client gets the same failure flow (`token_refusal`), not "try later".

Sans-I/O: nothing here touches a socket or a clock.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from enum import Enum
from typing import Any, ClassVar

from mailgate.backend import LoginFailure, describe
from mailgate.protocols.events import BackendEvent, BackendFailed, Rejected
from mailgate.protocols.lines import LineBuffer, LineTooLong
from mailgate.protocols.sasl import KVSEP, error_challenge
from mailgate.values import Method, Secret

# No sane backend sends a longer line before login (Dovecot's imap_max_line_length; far above
# RFC 2449's and RFC 5321's 512 octets).
DEFAULT_MAX_LINE = 65536
# The SASL mechanisms that pass a bearer token on, by BackendAuth value.
TOKEN_MECHANISMS = {"xoauth2": Method.XOAUTH2, "oauthbearer": Method.OAUTHBEARER}
# Our answer to a backend's error challenge: RFC 7628 3.2.3's ^A for OAUTHBEARER, an empty
# response for Google's XOAUTH2 (what Dovecot expects of each), base64.
DUMMY_RESPONSE = {"xoauth2": b"", "oauthbearer": base64.b64encode(KVSEP)}
# A backend's error challenge passed on to the client: a small JSON object (Dovecot's is under
# 200 bytes); anything larger or stranger is replaced by our own.
MAX_ERROR_CHALLENGE = 2048
TOKEN_REFUSED = "Authentication failed."


class LoginCore:
    """Log in to a backend as `user` with `secret`; a protocol supplies its states' handlers."""

    __slots__ = ("_buf", "_events", "_secret", "_state", "_token_mechanism", "_user")

    # The protocol's states that read nothing: finished, and waiting for the TLS handshake.
    DONE: ClassVar[Enum]
    TLS_PENDING: ClassVar[Enum]
    # Which handler reads the next unit (line or reply) in each state.
    _handlers: ClassVar[dict[Any, Callable[[Any, Any], list[BackendEvent]]]]

    def __init__(
        self,
        user: str,
        secret: Secret,
        start: Enum,
        max_line: int,
        token_mechanism: str | None = None,
    ) -> None:
        if token_mechanism is not None and token_mechanism not in TOKEN_MECHANISMS:
            raise ValueError(f"unknown token mechanism {token_mechanism!r}")
        self._user = user
        self._secret = secret  # the password, or the bearer token of a token route
        self._token_mechanism = token_mechanism
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

    def _token_blob(self) -> bytes:
        """The client response of `_token_mechanism` (RFC 7628 3.1, Google's XOAUTH2), base64:
        `user=U ^A auth=Bearer T ^A ^A`, or `n,a=U, ^A auth=Bearer T ^A ^A` with "," and "="
        of U escaped (Dovecot 2.3 refuses OAUTHBEARER without the authzid)."""
        user, token = self._credentials()
        if any(bad in part for part in (user, token) for bad in (KVSEP, b"\r", b"\n")):
            raise LoginFailure(False, "user name or token contains ^A, CR or LF; not sent")
        if b" " in token:
            raise LoginFailure(False, "token contains a space; not sent")
        auth = b"auth=Bearer " + token + KVSEP + KVSEP
        if self._token_mechanism == "xoauth2":
            return base64.b64encode(b"user=" + user + KVSEP + auth)
        authzid = user.replace(b"=", b"=3D").replace(b",", b"=2C")
        return base64.b64encode(b"n,a=" + authzid + b"," + KVSEP + auth)

    def _dummy_response(self) -> bytes:
        """Our answer to the backend's error challenge (its refusal follows it)."""
        return DUMMY_RESPONSE[self._token_mechanism or "xoauth2"] + b"\r\n"

    def _token_refusal(self, challenge: bytes) -> Rejected:
        """The client's outcome when the backend refused the token: the RFC 7628 failure flow,
        with the backend's own error challenge (`challenge`, base64) when it is a small JSON
        object, else ours."""
        method = TOKEN_MECHANISMS[self._token_mechanism or "xoauth2"]
        body = _sane_challenge(challenge) or error_challenge(method)
        return Rejected(TOKEN_REFUSED, challenge=body)

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
        if self._token_mechanism is not None:
            try:
                return (self._token_blob(), blob, quoted, password)
            except LoginFailure:  # never sent, so never echoed
                pass
        return (blob, quoted, password)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(user={self._user!r}, state={self._state.name})"


def _sane_challenge(encoded: bytes) -> bytes | None:
    """A backend's base64 error challenge, decoded, if it is a small JSON object."""
    if len(encoded) > MAX_ERROR_CHALLENGE * 4 // 3 + 4:
        return None
    try:
        decoded = binascii.a2b_base64(encoded, strict_mode=True)
        body = json.loads(decoded)
    except (binascii.Error, ValueError):
        return None
    if not isinstance(body, dict) or not decoded.isascii():
        return None
    return decoded
