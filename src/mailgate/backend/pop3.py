"""Backend POP3 login core: log in to a mailstore on the user's behalf (sans-I/O client side).

What nginx's ngx_mail_proxy_module does for POP3, plus STLS to the backend and Dovecot's XCLIENT
forwarding of the client's address:

    greeting  ->  [STLS, TLS]  ->  [XCLIENT]  ->  USER + PASS | AUTH PLAIN  ->  +OK

A token route logs in with AUTH XOAUTH2 or OAUTHBEARER (RFC 5034; the response after the "+",
since a token does not fit a 255-octet command); a refused token gets the backend's error
challenge "+ <base64>", our dummy response, then -ERR.

The backend speaks first, so there is no `start()`. Each command waits for its reply: POP3 only
allows pipelining when the server advertises PIPELINING (RFC 2449), and we never ask for CAPA.
The password is revealed only while the command bytes are built and is never kept as bytes.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto
from typing import ClassVar

from mailgate.backend import LoginFailure, forwardable
from mailgate.backend.core import DEFAULT_MAX_LINE, TOKEN_MECHANISMS, LoginCore
from mailgate.protocols.events import BackendEvent, BackendReady, Send, StartTLS
from mailgate.values import ClientInfo, Secret

# RFC 2449 section 4: a command line is at most 255 octets. A longer AUTH with an initial
# response (RFC 5034) is sent as "AUTH PLAIN" and the response after the "+" instead.
MAX_COMMAND = 255

MECHANISMS = frozenset({"user", "plain", *TOKEN_MECHANISMS})

# RFC 2449/3206 response codes on -ERR that mean "try again later". [AUTH], [SYS/PERM] and an
# -ERR without a code mean the login itself was refused: many servers answer a wrong password
# with a bare -ERR, and calling that an outage would hide bad passwords behind "try later".
TEMPORARY_CODES = frozenset({b"SYS/TEMP", b"IN-USE", b"LOGIN-DELAY"})


class Pop3State(Enum):
    GREETING = auto()  # waiting for "+OK"
    STLS = auto()  # sent STLS, waiting for its reply
    TLS_PENDING = auto()  # asked the driver for TLS, waiting for tls_started()
    XCLIENT = auto()  # sent XCLIENT, waiting for a reply we ignore
    USER = auto()  # sent USER, waiting for +OK to send PASS
    PASS = auto()  # sent PASS, waiting for the verdict
    AUTH_CHALLENGE = auto()  # sent "AUTH PLAIN", waiting for "+ " to send the response
    AUTH = auto()  # sent the PLAIN response, waiting for the verdict
    TOKEN = auto()  # sent the token, waiting for the verdict or an error challenge
    TOKEN_REFUSED = auto()  # answered the error challenge, waiting for the -ERR
    DONE = auto()  # BackendReady or BackendFailed was returned

    # Members are singletons: hash them by identity, in C (Enum's own __hash__ is Python
    # code, and states are dict keys and set members on every byte the cores read).
    __hash__ = object.__hash__


def _status(line: bytes) -> bytes:
    """b"+OK", b"-ERR", b"+" (a SASL continuation) or b"" for anything else."""
    head = line.split(b" ", 1)[0].upper()
    if head in (b"+OK", b"-ERR", b"+"):
        return head
    return b""


def _code(line: bytes) -> bytes:
    """The response code of an -ERR line ("-ERR [SYS/TEMP] ..." -> b"SYS/TEMP")."""
    text = line.partition(b" ")[2]
    if not text.startswith(b"["):
        return b""
    return text[1:].split(b"]", 1)[0].upper()


class Pop3Login(LoginCore):
    """Log in to a POP3 backend as `user` with `secret`. See the module docstring."""

    __slots__ = ("_challenge", "_forward", "_mechanism", "_starttls")

    DONE = Pop3State.DONE
    TLS_PENDING = Pop3State.TLS_PENDING

    def __init__(
        self,
        user: str,
        secret: Secret,
        *,
        starttls: bool = False,
        mechanism: str = "user",
        forward: ClientInfo | None = None,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown POP3 backend mechanism {mechanism!r}")
        token = mechanism if mechanism in TOKEN_MECHANISMS else None
        super().__init__(user, secret, Pop3State.GREETING, max_line, token)
        self._starttls = starttls
        self._mechanism = mechanism
        self._forward = forward
        self._challenge = b""  # a token route's error challenge, base64

    # --- handlers, one per state ---------------------------------------------------------

    def _on_greeting(self, line: bytes) -> list[BackendEvent]:
        status = _status(line)
        if status == b"-ERR":
            raise LoginFailure(True, "backend refused the connection", line)
        if status != b"+OK":
            raise LoginFailure(True, "malformed backend greeting", line)
        if self._starttls:
            self._state = Pop3State.STLS
            return [Send(b"STLS\r\n")]
        return self._after_tls()

    def _on_stls(self, line: bytes) -> list[BackendEvent]:
        status = _status(line)
        if status == b"-ERR":
            raise LoginFailure(True, "backend refused STLS", line)
        if status != b"+OK":
            raise LoginFailure(True, "malformed backend reply to STLS", line)
        self._buf.clear()  # bytes after the +OK came in plaintext: drop them
        self._state = Pop3State.TLS_PENDING
        return [StartTLS()]

    def _on_xclient(self, line: bytes) -> list[BackendEvent]:
        if _status(line) not in (b"+OK", b"-ERR"):  # either is fine: forwarding is best effort
            raise LoginFailure(True, "malformed backend reply to XCLIENT", line)
        return self._send_login()

    def _on_user(self, line: bytes) -> list[BackendEvent]:
        self._verdict(line)  # raises unless +OK
        password = self._secret.reveal().encode("utf-8", "surrogateescape")
        self._state = Pop3State.PASS
        return [Send(b"PASS " + password + b"\r\n")]

    def _on_challenge(self, line: bytes) -> list[BackendEvent]:
        if _status(line) != b"+":
            self._verdict(line)  # -ERR raises; a +OK before the response is nonsense
            raise LoginFailure(True, "backend accepted AUTH without a response", line)
        if self._token_mechanism is not None:
            self._state = Pop3State.TOKEN
            return [Send(self._token_blob() + b"\r\n")]
        self._state = Pop3State.AUTH
        return [Send(self._plain_blob() + b"\r\n")]

    def _on_token(self, line: bytes) -> list[BackendEvent]:
        if _status(line) == b"+":  # RFC 7628 3.2.2: refused; the -ERR follows our dummy
            self._challenge = line[2:]
            self._state = Pop3State.TOKEN_REFUSED
            return [Send(self._dummy_response())]
        return self._on_verdict(line)

    def _on_token_refused(self, line: bytes) -> list[BackendEvent]:
        if _status(line) == b"+OK":  # a backend that logs in after refusing: not to be trusted
            raise LoginFailure(True, "backend accepted a token it had refused", line)
        return self._on_verdict(line)

    def _on_verdict(self, line: bytes) -> list[BackendEvent]:
        self._verdict(line)
        self._state = Pop3State.DONE
        return [BackendReady(reply=line, trailing=self._buf.take_all())]

    # The state table: which handler reads the next backend line in each state.
    _handlers: ClassVar[dict[Pop3State, Callable[[Pop3Login, bytes], list[BackendEvent]]]] = {
        Pop3State.GREETING: _on_greeting,
        Pop3State.STLS: _on_stls,
        Pop3State.XCLIENT: _on_xclient,
        Pop3State.USER: _on_user,
        Pop3State.PASS: _on_verdict,
        Pop3State.AUTH_CHALLENGE: _on_challenge,
        Pop3State.AUTH: _on_verdict,
        Pop3State.TOKEN: _on_token,
        Pop3State.TOKEN_REFUSED: _on_token_refused,
    }

    # --- helpers ---------------------------------------------------------------------------

    def _verdict(self, line: bytes) -> None:
        """Return if the line is +OK; otherwise raise the failure it stands for."""
        status = _status(line)
        if status == b"+OK":
            return
        if status == b"-ERR":
            temporary = _code(line) in TEMPORARY_CODES
            refusal = None
            if self._token_mechanism is not None and not temporary:  # its verdict on the token
                refusal = self._token_refusal(self._challenge)
            raise LoginFailure(temporary, "backend refused the login", line, refusal)
        raise LoginFailure(True, "malformed backend reply", line)

    def _after_tls(self) -> list[BackendEvent]:
        xclient = self._xclient_command()
        if not xclient:
            return self._send_login()
        self._state = Pop3State.XCLIENT
        return [Send(xclient)]

    def _xclient_command(self) -> bytes:
        fwd = self._forward
        if fwd is None:
            return b""
        attrs = (("ADDR", fwd.ip), ("PORT", str(fwd.port or "")))
        pairs = [f"{name}={value}" for name, value in attrs if forwardable(value)]
        if not pairs:
            return b""
        return b"XCLIENT " + " ".join(pairs).encode("ascii") + b"\r\n"

    def _send_login(self) -> list[BackendEvent]:
        user = self._user.encode("utf-8", "surrogateescape")
        if self._token_mechanism is not None:
            self._token_blob()  # refuses a token it cannot send before anything is sent
            self._state = Pop3State.AUTH_CHALLENGE
            return [Send(b"AUTH " + self._mechanism.upper().encode() + b"\r\n")]
        if self._mechanism == "plain":
            blob = self._plain_blob()
            command = b"AUTH PLAIN " + blob + b"\r\n"
            if len(command) <= MAX_COMMAND:
                self._state = Pop3State.AUTH
                return [Send(command)]
            self._state = Pop3State.AUTH_CHALLENGE
            return [Send(b"AUTH PLAIN\r\n")]
        password = self._secret.reveal().encode("utf-8", "surrogateescape")
        if any(bad in field for field in (user, password) for bad in (b"\r", b"\n", b"\0")):
            raise LoginFailure(False, "user name or password contains CR, LF or NUL; not sent")
        self._state = Pop3State.USER
        return [Send(b"USER " + user + b"\r\n")]
