"""The POP3 server core before login: RFC 1939 (USER/PASS, APOP, QUIT), RFC 2449 (CAPA and
response codes), RFC 5034 (AUTH), RFC 2595 (STLS) and RFC 3206 ([AUTH], [SYS/TEMP]).

Built on the skeleton in `core.py` (the read loop, the error budget, SASL, the login and TLS
rules); this module holds POP3's words and one method per command. No reply repeats anything
the client sent, so credentials are never echoed.
"""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable

from mailgate.protocols import claims
from mailgate.protocols.core import PreAuthCore, State
from mailgate.protocols.events import (
    BadCommand,
    Close,
    Event,
    LoggedIn,
    Rejected,
    Send,
    StartTLS,
)
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import MAX_FIELD
from mailgate.values import CloseReason, Credentials, Method, Secret

# --- legal commands ------------------------------------------------------------------------------

# POP3 commands that are real but not allowed here (RFC 1939 TRANSACTION state, RFC 6856
# UTF8/LANG): refused with a reply that says why rather than "unknown".
KNOWN_ELSEWHERE = frozenset(
    {"NOOP", "STAT", "LIST", "RETR", "DELE", "RSET", "TOP", "UIDL", "LAST", "UTF8", "LANG"}
)
# Config names of the SASL mechanisms, in the order CAPA and AUTH list them.
_SASL_NAMES = {
    "plain": "PLAIN",
    "login": "LOGIN",
    "cram-md5": "CRAM-MD5",
    "xoauth2": "XOAUTH2",
    "oauthbearer": "OAUTHBEARER",
}
# CAPA lines the core owns; a policy capability with the same name is not repeated.
_CORE_CAPS = frozenset({"USER", "SASL", "STLS", "IMPLEMENTATION", "XCLIENT"})

# --- limits ------------------------------------------------------------------------------------

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
FOREIGN = b"-ERR This is a POP3 server\r\n"  # to HTTP, SMTP or TLS bytes (ALPACA)
LINE_TOO_LONG = b"-ERR Line too long\r\n"
FLOODED = b"-ERR Too much pipelined input\r\n"
TEMP_FAIL = b"-ERR [SYS/TEMP] Service temporarily unavailable, try again later\r\n"
LIMITED = b"-ERR [IN-USE] Too many sessions, try again later\r\n"  # RFC 3206
NOT_TRUSTED = b"-ERR You are not from trusted IP\r\n"  # Dovecot's words for XCLIENT
AUTH_FAIL_PREFIX = b"-ERR [AUTH] "
DEFAULT_REASON = "Authentication failed"


class Pop3Core(PreAuthCore):
    __slots__ = ("_user",)

    LINE_TOO_LONG = LINE_TOO_LONG
    FLOODED = FLOODED
    FOREIGN = FOREIGN

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        super().__init__(policy, salt)
        self._user: str | None = None  # USER given, PASS expected

    def greet(self) -> list[Event]:
        text = self._policy.greeting
        if "apop" in self._policy.mechanisms:
            text += " " + self._salt  # RFC 1939 section 7: the timestamp ends the greeting
        return [Send(b"+OK " + text.encode("ascii", "replace") + CRLF)]

    # --- the skeleton's hooks ------------------------------------------------------------------

    def _command(self, line: bytes) -> list[Event]:
        head, sep, rest = line.partition(b" ")
        name = head.decode("ascii", "replace").upper()
        handler = _COMMANDS.get(name)
        if handler is not None:
            return handler(self, rest if sep else None)
        raise BadCommand(NOT_NOW if name in KNOWN_ELSEWHERE else UNKNOWN)

    def _too_many_errors(self, reply: bytes) -> bytes:
        return TOO_MANY  # one reply per command: the goodbye takes the place of the error

    def _forget_session(self) -> None:
        self._user = None

    def _login_failed(self) -> None:
        self._user = None  # RFC 1939: the next try starts with USER

    def _challenge(self, data: bytes) -> bytes:
        return b"+ " + base64.b64encode(data) + CRLF

    def _bad_sasl(self) -> BadCommand:
        return BadCommand(BAD_SASL)

    def _cancelled(self) -> BadCommand:
        return BadCommand(CANCELLED)

    def _success_reply(self, outcome: LoggedIn) -> bytes:
        return outcome.backend_reply.rstrip(b"\r\n") + CRLF

    def _rejected_reply(self, outcome: Rejected) -> bytes:
        return AUTH_FAIL_PREFIX + _sanitise(outcome.message) + CRLF

    def _unavailable_reply(self) -> bytes:
        return TEMP_FAIL

    def _limited_reply(self) -> bytes:
        return LIMITED

    # --- helpers -------------------------------------------------------------------------------

    def _require(self, mechanism: str) -> None:
        if mechanism not in self._policy.mechanisms:
            raise BadCommand(DISABLED)
        if not self._cleartext_ok():
            raise BadCommand(PLAINTEXT)

    # --- commands ------------------------------------------------------------------------------

    def _capa(self, arg: bytes | None) -> list[Event]:
        if arg is not None:
            raise BadCommand(SYNTAX)
        stls = self._policy.starttls and not self._tls
        return [Send(_capa_reply(self._policy, self._cleartext_ok(), stls))]

    def _stls(self, arg: bytes | None) -> list[Event]:
        self._user = None
        if arg is not None:
            raise BadCommand(SYNTAX)
        if self._tls:
            raise BadCommand(TLS_ACTIVE)
        if not self._policy.starttls:
            raise BadCommand(DISABLED)
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = State.TLS_PENDING
        return [Send(STLS_OK), StartTLS()]

    def _user_cmd(self, arg: bytes | None) -> list[Event]:
        self._user = None
        self._require("user")
        user = _field(arg)
        if not user:
            raise BadCommand(SYNTAX)
        self._user = user
        return [Send(OK)]

    def _pass(self, arg: bytes | None) -> list[Event]:
        user, self._user = self._user, None  # RFC 1939: whatever happens, next comes USER
        if user is None:
            raise BadCommand(NO_USER)
        self._require("user")
        password = _field(arg)
        if not password:
            raise BadCommand(SYNTAX)
        return self._authenticate(Credentials(Method.PLAIN, user, Secret(password)))

    def _apop(self, arg: bytes | None) -> list[Event]:
        self._user = None
        self._require("apop")
        name, _, digest = (arg or b"").rpartition(b" ")
        user = _field(name)
        if not user or not _is_md5_hex(digest):
            raise BadCommand(SYNTAX)
        secret = Secret(digest.decode("ascii").lower())
        return self._authenticate(Credentials(Method.APOP, user, secret, salt=self._salt))

    def _auth(self, arg: bytes | None) -> list[Event]:
        self._user = None
        if not self._cleartext_ok():
            raise BadCommand(PLAINTEXT)
        mechanisms = _sasl_mechanisms(self._policy)
        if arg is None:  # RFC 5034 leaves this out; clients (Outlook) still probe with it
            listing = b"".join(name.encode("ascii") + CRLF for name in mechanisms)
            return [Send(AUTH_HEAD + listing + b".\r\n")]
        mech_raw, sep, initial = arg.partition(b" ")
        mech = mech_raw.decode("ascii", "replace").upper()
        if mech not in mechanisms:
            raise BadCommand(BAD_MECH)
        if b" " in initial:
            raise BadCommand(SYNTAX)
        response = None
        if sep:  # RFC 5034 section 4: "=" is an empty initial response, as is nothing
            response = b"" if initial in (b"", b"=") else self._decode(initial)
        return self._start_sasl(mech, response)

    def _xclient(self, arg: bytes | None) -> list[Event]:
        """A trusted peer names the real client (claims.py), as Dovecot's pop3-login takes it;
        from anywhere else the command is refused, and nothing of it is kept."""
        if not self._policy.trusted:
            self.claim_ignored = True
            raise BadCommand(NOT_TRUSTED)
        try:
            self.claim = claims.from_xclient(arg or b"") or self.claim
        except claims.ClaimSyntax:
            raise BadCommand(SYNTAX) from None
        return [Send(OK)]

    def _quit(self, arg: bytes | None) -> list[Event]:
        # Arguments are ignored: a client that wants to leave may always leave.
        self._close()
        return [Send(BYE), Close(CloseReason.LOGOUT)]


_COMMANDS: dict[str, Callable[[Pop3Core, bytes | None], list[Event]]] = {
    "CAPA": Pop3Core._capa,
    "STLS": Pop3Core._stls,
    "USER": Pop3Core._user_cmd,
    "PASS": Pop3Core._pass,
    "APOP": Pop3Core._apop,
    "AUTH": Pop3Core._auth,
    "QUIT": Pop3Core._quit,
    "XCLIENT": Pop3Core._xclient,
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
    if policy.trusted:
        lines.append("XCLIENT")
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
