"""The POP3 server core before login: RFC 1939 (USER/PASS, APOP, QUIT), RFC 2449 (CAPA and
response codes), RFC 5034 (AUTH), RFC 2595 (STLS) and RFC 3206 ([AUTH], [SYS/TEMP]).

Sans-I/O: `receive(bytes)` returns events and the driver performs them. The core never sees a
socket or a clock. Handlers raise `ProtocolError`, and `_error_events` alone turns it into
events. No reply repeats anything the client sent, so credentials are never echoed.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
from collections.abc import Callable
from enum import Enum

from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    LoginOutcome,
    ProtocolError,
    Send,
    StartTLS,
    Unavailable,
)
from mailgate.protocols.lines import LineBuffer, LineTooLong
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import MAX_FIELD, Challenge, SaslError, SaslServer, new_server
from mailgate.values import Credentials, Method, Secret


class Pop3State(Enum):
    AUTHORIZATION = "authorization"  # RFC 1939 AUTHORIZATION state, no USER given
    AWAIT_PASS = "await-pass"  # USER accepted, PASS expected
    AWAIT_SASL = "await-sasl"  # AUTH sent a "+ " challenge, a response line is expected
    TLS_PENDING = "tls-pending"  # "+OK" to STLS sent, the driver is doing the handshake
    AUTHENTICATING = "authenticating"  # Authenticate emitted, waiting for finish_login
    LOGGED_IN = "logged-in"  # the relay takes over; `trailing` holds pipelined bytes
    CLOSED = "closed"


# --- legal commands per state ------------------------------------------------------------------

_AUTHORIZATION = frozenset({"CAPA", "STLS", "USER", "APOP", "AUTH", "QUIT"})
LEGAL: dict[Pop3State, frozenset[str]] = {
    Pop3State.AUTHORIZATION: _AUTHORIZATION,
    Pop3State.AWAIT_PASS: _AUTHORIZATION | {"PASS"},
}
# States in which the core reads lines; in the others bytes wait (AUTHENTICATING), are
# dropped (TLS_PENDING, CLOSED) or belong to the relay (LOGGED_IN).
_READING = frozenset({Pop3State.AUTHORIZATION, Pop3State.AWAIT_PASS, Pop3State.AWAIT_SASL})
# POP3 commands that are real but not allowed here (RFC 1939 TRANSACTION state, RFC 6856
# UTF8/LANG, PASS without USER): a bad command, but not a sign of a non-POP3 peer.
KNOWN_ELSEWHERE = frozenset(
    {"PASS", "NOOP", "STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "LAST", "UTF8", "LANG"}
)
# Config names of the SASL mechanisms, in the order CAPA and AUTH list them.
_SASL_NAMES = {"plain": "PLAIN", "login": "LOGIN", "cram-md5": "CRAM-MD5"}
# CAPA lines the core owns; a policy capability with the same name is not repeated.
_CORE_CAPS = frozenset({"USER", "SASL", "STLS", "IMPLEMENTATION"})

# --- limits ------------------------------------------------------------------------------------

# Bytes a client may pipeline behind its login command while the authenticator decides
# (RFC 2449 PIPELINING). 64 KiB is a full TCP window without window scaling: a client that
# sends more without reading our answer is flooding, not pipelining.
MAX_PIPELINED = 64 * 1024
# Longest authenticator message shown after "-ERR [AUTH] ": RFC 2449 caps a response line at
# 512 octets, and 200 characters leave room while being far beyond any sane message.
MAX_REASON = 200

# --- replies -----------------------------------------------------------------------------------

CRLF = b"\r\n"
OK = b"+OK\r\n"
BYE = b"+OK Bye\r\n"
STLS_OK = b"+OK Begin TLS negotiation\r\n"
CAPA_HEAD = b"+OK Capability list follows\r\n"
AUTH_HEAD = b"+OK Supported mechanisms follow\r\n"
UNKNOWN = b"-ERR Unknown command\r\n"
NOT_NOW = b"-ERR Command not valid in this state\r\n"
NO_USER = b"-ERR No user name given\r\n"
DISABLED = b"-ERR Command not enabled\r\n"
SYNTAX = b"-ERR Syntax error\r\n"
TLS_ACTIVE = b"-ERR Command not permitted when TLS active\r\n"  # RFC 2595 section 4
PLAINTEXT = b"-ERR [AUTH] Plaintext authentication disallowed on non-secure connections\r\n"
BAD_MECH = b"-ERR Unsupported authentication mechanism\r\n"
BAD_SASL = b"-ERR Invalid SASL response\r\n"
CANCELLED = b"-ERR Authentication cancelled\r\n"  # RFC 5034 section 4: "*" gets a -ERR
TOO_MANY = b"-ERR Too many invalid commands\r\n"
LINE_TOO_LONG = b"-ERR Line too long\r\n"
FLOODED = b"-ERR Too much pipelined input\r\n"
TEMP_FAIL = b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"
AUTH_FAIL_PREFIX = b"-ERR [AUTH] "
DEFAULT_REASON = "Authentication failed"

# For the log line: why a fatal ProtocolError closed the session.
_CLOSE_REASONS = {
    UNKNOWN: "not pop3",
    TOO_MANY: "too many invalid commands",
    LINE_TOO_LONG: "line too long",
    FLOODED: "pipelining overflow",
}


class Pop3Core:
    __slots__ = (
        "_attempts",
        "_buf",
        "_errors",
        "_policy",
        "_salt",
        "_sasl",
        "_seen_command",
        "_tls",
        "_user",
        "state",
        "trailing",
    )

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        self._policy = policy
        self._salt = salt  # APOP timestamp and CRAM-MD5 challenge, "<...@host>"
        self._buf = LineBuffer(policy.max_line)
        self._tls = policy.tls_active
        self._user: str | None = None
        self._sasl: SaslServer | None = None
        self._errors = 0  # bad commands so far, against policy.max_errors
        self._attempts = 0  # finished logins that did not succeed
        self._seen_command = False
        self.state = Pop3State.AUTHORIZATION
        self.trailing = b""

    # --- the driver's surface ------------------------------------------------------------------

    def greet(self) -> list[Event]:
        text = self._policy.greeting
        if "apop" in self._policy.mechanisms:
            text += " " + self._salt  # RFC 1939 section 7: the timestamp ends the greeting
        return [Send(b"+OK " + text.encode("ascii", "replace") + CRLF)]

    def receive(self, data: bytes) -> list[Event]:
        if self.state is Pop3State.CLOSED:
            return []
        if not data:
            self.state = Pop3State.CLOSED
            return [Close("eof")]
        if self.state is Pop3State.TLS_PENDING:
            return []  # plaintext behind STLS is never parsed (RFC 2595 injection)
        if self.state is Pop3State.LOGGED_IN:
            self.trailing += data
            if len(self.trailing) > MAX_PIPELINED:
                self.state = Pop3State.CLOSED
                return [Close(_CLOSE_REASONS[FLOODED])]
            return []
        self._buf.feed(data)
        return self._run()

    def tls_started(self) -> list[Event]:
        if self.state is not Pop3State.TLS_PENDING:
            raise RuntimeError("tls_started() outside TLS_PENDING")
        # RFC 2595 section 4: forget everything learnt before the handshake.
        self._buf.clear()
        self._tls = True
        self._user = None
        self.state = Pop3State.AUTHORIZATION
        return []

    def finish_login(self, outcome: LoginOutcome) -> list[Event]:
        if self.state is Pop3State.CLOSED:
            return []  # the client left while the authenticator was busy
        if self.state is not Pop3State.AUTHENTICATING:
            raise RuntimeError("finish_login() outside AUTHENTICATING")
        if isinstance(outcome, LoggedIn):
            self.state = Pop3State.LOGGED_IN
            self.trailing = self._buf.take_all()
            return [Send(outcome.backend_reply + CRLF)]
        self._attempts += 1
        if isinstance(outcome, Unavailable):
            reply = TEMP_FAIL
        else:
            reply = AUTH_FAIL_PREFIX + _sanitise(outcome.message) + CRLF
        if self._attempts >= self._policy.max_auth_attempts:
            self.state = Pop3State.CLOSED
            return [Send(reply), Close("too many failed logins")]
        self.state = Pop3State.AUTHORIZATION
        return [Send(reply), *self._run()]

    # --- line handling -------------------------------------------------------------------------

    def _run(self) -> list[Event]:
        """Handle every complete buffered line the current state reads."""
        events: list[Event] = []
        while self.state in _READING:
            try:
                line = self._next_line()
                if line is None:
                    break
                events += self._line(line)
            except ProtocolError as exc:
                events += self._error_events(exc)
        if self.state is Pop3State.AUTHENTICATING and len(self._buf) > MAX_PIPELINED:
            events += self._error_events(ProtocolError(FLOODED, close=True))
        return events

    def _next_line(self) -> bytes | None:
        try:
            return self._buf.next_line()
        except LineTooLong:
            raise ProtocolError(LINE_TOO_LONG, close=True) from None

    def _error_events(self, exc: ProtocolError) -> list[Event]:
        """The one place a ProtocolError becomes wire text (and a close when fatal)."""
        if not exc.close:
            return [Send(exc.reply)]
        self.state = Pop3State.CLOSED
        return [Send(exc.reply), Close(_CLOSE_REASONS.get(exc.reply, "protocol error"))]

    def _line(self, line: bytes) -> list[Event]:
        if self.state is Pop3State.AWAIT_SASL:
            return self._sasl_response(line)
        first = not self._seen_command
        self._seen_command = True
        head, sep, rest = line.partition(b" ")
        name = head.decode("ascii", "replace").upper()
        arg = rest if sep else None
        if name in LEGAL[self.state]:
            return _COMMANDS[name](self, arg)
        if name in KNOWN_ELSEWHERE:
            raise self._bad(NO_USER if name == "PASS" else NOT_NOW)
        if first:  # an HTTP request, an SMTP client, a port scanner: not worth a second line
            raise ProtocolError(UNKNOWN, close=True)
        raise self._bad(UNKNOWN)

    def _bad(self, reply: bytes) -> ProtocolError:
        """Spend one bad command from the budget (nginx max_errors)."""
        self._errors += 1
        if self._errors >= self._policy.max_errors:
            return ProtocolError(TOO_MANY, close=True)
        return ProtocolError(reply)

    def _cleartext_ok(self) -> bool:
        return self._tls or not self._policy.starttls_only

    def _require(self, mechanism: str) -> None:
        if mechanism not in self._policy.mechanisms:
            raise self._bad(DISABLED)
        if not self._cleartext_ok():
            raise self._bad(PLAINTEXT)

    def _restart(self) -> None:
        """Back to a clean AUTHORIZATION state: no USER, no SASL exchange."""
        self._user = None
        self._sasl = None
        self.state = Pop3State.AUTHORIZATION

    def _login(self, creds: Credentials) -> list[Event]:
        self._restart()
        self.state = Pop3State.AUTHENTICATING
        return [Authenticate(dataclasses.replace(creds, attempt=self._attempts + 1))]

    # --- commands ------------------------------------------------------------------------------

    def _capa(self, arg: bytes | None) -> list[Event]:
        if arg is not None:
            raise self._bad(SYNTAX)
        stls = self._policy.starttls and not self._tls
        return [Send(_capa_reply(self._policy, self._cleartext_ok(), stls))]

    def _stls(self, arg: bytes | None) -> list[Event]:
        if arg is not None:
            raise self._bad(SYNTAX)
        if self._tls:
            raise self._bad(TLS_ACTIVE)
        if not self._policy.starttls:
            raise self._bad(DISABLED)
        self._restart()
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = Pop3State.TLS_PENDING
        return [Send(STLS_OK), StartTLS()]

    def _user_cmd(self, arg: bytes | None) -> list[Event]:
        self._restart()
        self._require("user")
        user = _field(arg)
        if not user:
            raise self._bad(SYNTAX)
        self._user = user
        self.state = Pop3State.AWAIT_PASS
        return [Send(OK)]

    def _pass(self, arg: bytes | None) -> list[Event]:
        user = self._user
        self._restart()  # RFC 1939: whatever happens, the next try starts with USER
        self._require("user")
        password = _field(arg)
        if user is None or not password:
            raise self._bad(SYNTAX)
        return self._login(Credentials(Method.PLAIN, user, Secret(password)))

    def _apop(self, arg: bytes | None) -> list[Event]:
        self._restart()
        self._require("apop")
        name, _, digest = (arg or b"").rpartition(b" ")
        user = _field(name)
        if not user or not _is_md5_hex(digest):
            raise self._bad(SYNTAX)
        secret = Secret(digest.decode("ascii").lower())
        return self._login(Credentials(Method.APOP, user, secret, salt=self._salt))

    def _auth(self, arg: bytes | None) -> list[Event]:
        self._restart()
        if not self._cleartext_ok():
            raise self._bad(PLAINTEXT)
        mechanisms = _sasl_mechanisms(self._policy)
        if arg is None:  # RFC 5034 leaves this out; clients (Outlook) still probe with it
            listing = b"".join(name.encode("ascii") + CRLF for name in mechanisms)
            return [Send(AUTH_HEAD + listing + b".\r\n")]
        mech_raw, sep, initial = arg.partition(b" ")
        mech = mech_raw.decode("ascii", "replace").upper()
        if mech not in mechanisms:
            raise self._bad(BAD_MECH)
        if sep and (not initial or b" " in initial):
            raise self._bad(SYNTAX)
        response = None
        if sep:  # RFC 5034 section 4: "=" is an empty initial response
            response = b"" if initial == b"=" else self._decode(initial)
        self._sasl = new_server(mech, self._salt)
        return self._sasl_step(response)

    def _quit(self, arg: bytes | None) -> list[Event]:
        # Arguments are ignored: a client that wants to leave may always leave.
        self.state = Pop3State.CLOSED
        return [Send(BYE), Close("quit")]

    # --- SASL exchange -------------------------------------------------------------------------

    def _sasl_response(self, line: bytes) -> list[Event]:
        if line == b"*":
            self._restart()
            raise ProtocolError(CANCELLED)
        return self._sasl_step(self._decode(line))

    def _decode(self, data: bytes) -> bytes:
        try:
            return binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            self._restart()
            raise self._bad(BAD_SASL) from None

    def _sasl_step(self, response: bytes | None) -> list[Event]:
        server = self._sasl
        if server is None:  # unreachable: AWAIT_SASL is only entered with a server
            raise ProtocolError(BAD_SASL, close=True)
        try:
            result = server.step(response)
        except SaslError:
            self._restart()
            raise self._bad(BAD_SASL) from None
        if isinstance(result, Challenge):
            self.state = Pop3State.AWAIT_SASL
            return [Send(b"+ " + base64.b64encode(result.data) + CRLF)]
        return self._login(result)


_COMMANDS: dict[str, Callable[[Pop3Core, bytes | None], list[Event]]] = {
    "CAPA": Pop3Core._capa,
    "STLS": Pop3Core._stls,
    "USER": Pop3Core._user_cmd,
    "PASS": Pop3Core._pass,
    "APOP": Pop3Core._apop,
    "AUTH": Pop3Core._auth,
    "QUIT": Pop3Core._quit,
}


# --- helpers -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)  # a few listeners x (cleartext ok, STLS offered)
def _capa_reply(policy: PreAuthPolicy, cleartext_ok: bool, stls: bool) -> bytes:
    lines = [
        cap
        for cap in policy.capabilities
        if cap.isascii() and cap.isprintable() and cap.split(" ")[0].upper() not in _CORE_CAPS
    ]
    if cleartext_ok:
        if "user" in policy.mechanisms:
            lines.append("USER")
        mechanisms = _sasl_mechanisms(policy)
        if mechanisms:
            lines.append("SASL " + " ".join(mechanisms))
    if stls:
        lines.append("STLS")
    return CAPA_HEAD + b"".join(line.encode("ascii") + CRLF for line in lines) + b".\r\n"


@functools.lru_cache(maxsize=64)
def _sasl_mechanisms(policy: PreAuthPolicy) -> tuple[str, ...]:
    return tuple(name for key, name in _SASL_NAMES.items() if key in policy.mechanisms)


def _field(raw: bytes | None) -> str | None:
    """A user name or password from a command line, or None when absent or unacceptable."""
    if not raw or len(raw) > MAX_FIELD or b"\0" in raw or b"\r" in raw:
        return None
    # surrogateescape keeps non-UTF-8 passwords byte-exact for the backend, as sasl.py does.
    return raw.decode("utf-8", "surrogateescape")


def _is_md5_hex(digest: bytes) -> bool:
    return len(digest) == 32 and all(c in b"0123456789abcdefABCDEF" for c in digest)


def _sanitise(message: str) -> bytes:
    """The authenticator's text made safe for one reply line: printable ASCII, bounded."""
    text = "".join(c if " " <= c <= "~" else " " for c in message[:MAX_REASON]).strip()
    return (text or DEFAULT_REASON).encode("ascii")
