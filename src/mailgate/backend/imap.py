"""Backend IMAP login core: log in to a mailstore on the user's behalf (sans-I/O client side).

What nginx's ngx_mail_proxy_module does for IMAP, plus STARTTLS to the backend and Dovecot's ID
forwarding of the client's address:

    greeting  ->  [STARTTLS, TLS]  ->  [ID (...)] + LOGIN | AUTHENTICATE PLAIN  ->  tagged OK

A token route logs in with AUTHENTICATE XOAUTH2 or OAUTHBEARER (the initial response on the
command line when the backend advertises SASL-IR, else after its "+"); a refused token gets
the backend's error challenge "+ <base64>", our dummy response, then the tagged NO.

The backend speaks first, so there is no `start()`: the driver feeds bytes to `receive` and
performs the events it gets back until `BackendReady` or `BackendFailed`. ID is pipelined with
the login command (RFC 3501 section 5.5 lets a client pipeline) and its result is ignored.
The password is revealed only while the command bytes are built and is never kept as bytes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import Enum, auto
from typing import ClassVar

from mailgate.backend import LoginFailure, forwardable
from mailgate.backend.core import DEFAULT_MAX_LINE, TOKEN_MECHANISMS, LoginCore
from mailgate.protocols.events import BackendEvent, BackendReady, Send, StartTLS
from mailgate.values import ClientInfo, Secret

# RFC 7888 LITERAL-: non-synchronising literals are allowed up to this many octets.
LITERAL_MINUS_MAX = 4096

# Our tags. The client never sees them; they only have to differ from one another.
TAG_STARTTLS = b"mg1"
TAG_ID = b"mg2"
TAG_LOGIN = b"mg3"

MECHANISMS = frozenset({"login", "plain", *TOKEN_MECHANISMS})

# RFC 5530 codes on a tagged NO that mean "try again later", not "wrong credentials".
TEMPORARY_CODES = frozenset({b"UNAVAILABLE", b"SERVERBUG", b"INUSE", b"LIMIT"})

# Untagged responses whose text is free text: "{5}" at their end is not a literal.
STATUS_RESPONSES = frozenset({b"OK", b"NO", b"BAD", b"BYE", b"PREAUTH"})

# The order in which Dovecot's imap-login reads the proxy's ID fields (RFC 2971 keys).
ID_FIELDS = (
    "x-originating-ip",
    "x-originating-port",
    "x-connected-ip",
    "x-connected-port",
)


class ImapState(Enum):
    GREETING = auto()  # waiting for "* OK"
    STARTTLS = auto()  # sent STARTTLS, waiting for its tagged reply
    TLS_PENDING = auto()  # asked the driver for TLS, waiting for tls_started()
    LOGIN = auto()  # sent [ID and] the login command, waiting for its tagged reply
    DONE = auto()  # BackendReady or BackendFailed was returned

    # Members are singletons: hash them by identity, in C (Enum's own __hash__ is Python
    # code, and states are dict keys and set members on every byte the cores read).
    __hash__ = object.__hash__


_QUOTABLE = re.compile(rb"[\x20-\x7e]*")


def _quotable(arg: bytes) -> bool:
    """RFC 3501 quoted: 7-bit text without CR/LF. Controls go as literals to be safe."""
    return _QUOTABLE.fullmatch(arg) is not None


def _quote(arg: bytes) -> bytes:
    return b'"' + arg.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _trailing_literal(line: bytes) -> int | None:
    """The size n if the line ends with a server literal announcement "{n}", else None."""
    if not line.endswith(b"}"):
        return None
    start = line.rfind(b"{")
    digits = line[start + 1 : -1]
    if start < 0 or not digits.isdigit() or len(digits) > 10:
        return None
    return int(digits)


def _data_response(line: bytes) -> bool:
    """An untagged response that may carry literals (status responses carry only text)."""
    words = line.split(b" ", 2)
    return words[0] == b"*" and len(words) > 1 and words[1].upper() not in STATUS_RESPONSES


def _capabilities(line: bytes) -> frozenset[bytes] | None:
    """Capabilities from "* CAPABILITY ..." or "* OK [CAPABILITY ...] ...", else None."""
    words = line.split(b" ", 2)
    if len(words) < 2 or words[0] != b"*":
        return None
    if words[1].upper() == b"CAPABILITY":
        return frozenset(line.upper().split()[2:])
    rest = words[2] if len(words) == 3 else b""
    if words[1].upper() == b"OK" and rest[:12].upper() == b"[CAPABILITY ":
        return frozenset(rest[12:].split(b"]", 1)[0].upper().split())
    return None


def _code(text: bytes) -> bytes:
    """The response code atom of a resp-text ("[UNAVAILABLE] ..." -> b"UNAVAILABLE")."""
    if not text.startswith(b"["):
        return b""
    return text[1:].split(b"]", 1)[0].split(b" ", 1)[0].upper()


def _tagged(line: bytes) -> tuple[bytes, bytes, bytes]:
    """Split a tagged line into (tag, STATUS, text); status is upper-cased."""
    tag, _, rest = line.partition(b" ")
    status, _, text = rest.partition(b" ")
    return tag, status.upper(), text


class ImapLogin(LoginCore):
    """Log in to an IMAP backend as `user` with `secret`. See the module docstring."""

    __slots__ = (
        "_caps",
        "_challenge",
        "_continued",
        "_forward",
        "_mechanism",
        "_proxy_ttl",
        "_sent_chunks",
        "_skip",
        "_starttls",
    )

    DONE = ImapState.DONE
    TLS_PENDING = ImapState.TLS_PENDING

    def __init__(
        self,
        user: str,
        secret: Secret,
        *,
        starttls: bool = False,
        mechanism: str = "login",
        forward: ClientInfo | None = None,
        max_line: int = DEFAULT_MAX_LINE,
        proxy_ttl: int | None = None,
    ) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown IMAP backend mechanism {mechanism!r}")
        token = mechanism if mechanism in TOKEN_MECHANISMS else None
        super().__init__(user, secret, ImapState.GREETING, max_line, token)
        self._starttls = starttls
        self._mechanism = mechanism
        self._forward = forward
        self._proxy_ttl = proxy_ttl  # sent in the ID beside the client's address, if any
        self._caps: frozenset[bytes] = frozenset()
        self._sent_chunks = 0  # pieces of the login command sent so far (literals split it)
        self._skip = 0  # literal bytes of an untagged response still to be discarded
        self._continued = False  # the next line continues an untagged response after a literal
        self._challenge: bytes | None = None  # a token route's error challenge, base64

    def _after_tls(self) -> list[BackendEvent]:
        self._caps = frozenset()  # RFC 3501 6.2.1: capabilities seen before TLS are void
        return self._begin_login()

    # --- reading ------------------------------------------------------------------------

    def _next_unit(self) -> bytes | None:
        """The next response line, skipping literals and continuations of untagged responses."""
        while True:
            if self._skip:
                self._skip -= len(self._buf.take(min(self._skip, len(self._buf))) or b"")
                if self._skip:
                    return None
            line = self._buf.next_line()
            if line is None:
                return None
            continuation = self._continued
            size = _trailing_literal(line) if continuation or _data_response(line) else None
            if size is not None and size > self._buf.max_line:
                raise LoginFailure(True, "backend literal too long")
            self._skip = size or 0
            self._continued = size is not None
            if not continuation:
                return line

    # --- handlers, one per state ---------------------------------------------------------

    def _on_greeting(self, line: bytes) -> list[BackendEvent]:
        status = line.split(b" ", 2)[1].upper() if line.startswith(b"* ") else b""
        if status == b"BYE":
            raise LoginFailure(True, "backend refused the connection", line)
        if status == b"PREAUTH":
            raise LoginFailure(True, "backend greeted with PREAUTH", line)
        if status != b"OK":
            raise LoginFailure(True, "malformed backend greeting", line)
        self._caps = _capabilities(line) or frozenset()
        if self._starttls:
            self._state = ImapState.STARTTLS
            return [Send(TAG_STARTTLS + b" STARTTLS\r\n")]
        return self._begin_login()

    def _on_starttls(self, line: bytes) -> list[BackendEvent]:
        if line.startswith(b"* "):
            return self._untagged(line)
        tag, status, _ = _tagged(line)
        if tag != TAG_STARTTLS:
            raise LoginFailure(True, "unexpected backend reply to STARTTLS", line)
        if status != b"OK":
            raise LoginFailure(True, "backend refused STARTTLS", line)
        self._buf.clear()  # bytes after the OK came in plaintext: drop them
        self._skip = 0
        self._continued = False
        self._state = ImapState.TLS_PENDING
        return [StartTLS()]

    def _on_login(self, line: bytes) -> list[BackendEvent]:
        if line.startswith(b"* "):
            return self._untagged(line)
        if line == b"+" or line.startswith(b"+ "):
            return self._continue_login(line)
        tag, status, text = _tagged(line)
        if tag == TAG_ID and status in (b"OK", b"NO", b"BAD"):
            return []  # forwarding is best effort: a backend without ID still logs us in
        if tag != TAG_LOGIN:
            raise LoginFailure(True, "unexpected backend reply", line)
        if status == b"OK":
            self._state = ImapState.DONE
            return [BackendReady(reply=line[len(tag) + 1 :], trailing=self._buf.take_all())]
        if status == b"NO":
            temporary = _code(text) in TEMPORARY_CODES
            refusal = None
            if self._token_mechanism is not None and not temporary:  # its verdict on the token
                refusal = self._token_refusal(self._challenge or b"")
            raise LoginFailure(temporary, "backend refused the login", line, refusal)
        if status == b"BAD":
            raise LoginFailure(True, "backend rejected the login command", line)
        raise LoginFailure(True, "malformed backend reply", line)

    # The state table: which handler reads the next backend line in each state.
    _handlers: ClassVar[dict[ImapState, Callable[[ImapLogin, bytes], list[BackendEvent]]]] = {
        ImapState.GREETING: _on_greeting,
        ImapState.STARTTLS: _on_starttls,
        ImapState.LOGIN: _on_login,
    }

    # --- helpers ---------------------------------------------------------------------------

    def _untagged(self, line: bytes) -> list[BackendEvent]:
        """Untagged data between commands is skipped, except a BYE: the backend is leaving."""
        if line[2:6].upper() in (b"BYE", b"BYE "):
            raise LoginFailure(True, "backend said BYE", line)
        return []

    def _begin_login(self) -> list[BackendEvent]:
        if self._mechanism == "login" and b"LOGINDISABLED" in self._caps:
            raise LoginFailure(True, "backend advertises LOGINDISABLED")
        # A backend that lists its mechanisms without ours would refuse the token as if it
        # were bad: a configuration problem, so temporary. One that lists none may yet take it.
        wanted = b"AUTH=" + self._mechanism.upper().encode()
        listed = any(cap.startswith(b"AUTH=") for cap in self._caps)
        if self._token_mechanism and listed and wanted not in self._caps:
            raise LoginFailure(True, f"backend does not advertise {wanted.decode()}")
        chunks = self._login_chunks()
        self._state = ImapState.LOGIN
        self._sent_chunks = 1
        return [Send(self._id_command() + chunks[0])]

    def _continue_login(self, line: bytes) -> list[BackendEvent]:
        chunks = self._login_chunks()
        if self._sent_chunks >= len(chunks):
            if self._token_mechanism is not None and self._challenge is None:
                # RFC 7628 3.2.2: the token is refused; the tagged NO follows our dummy.
                self._challenge = line[2:]
                return [Send(self._dummy_response())]
            raise LoginFailure(True, "unexpected continuation from backend", line)
        self._sent_chunks += 1
        return [Send(chunks[self._sent_chunks - 1])]

    def _id_command(self) -> bytes:
        fwd = self._forward
        if fwd is None:
            return b""
        port, local_port = str(fwd.port or ""), str(fwd.local_port or "")
        values = (fwd.ip, port, fwd.local_ip, local_port)
        pairs = [
            _quote(key.encode()) + b" " + _quote(value.encode())
            for key, value in zip(ID_FIELDS, values, strict=True)
            if forwardable(value)
        ]
        if pairs and self._proxy_ttl is not None:
            pairs.append(b'"x-proxy-ttl" "%d"' % self._proxy_ttl)
        if not pairs:
            return b""
        return TAG_ID + b" ID (" + b" ".join(pairs) + b")\r\n"

    def _login_chunks(self) -> list[bytes]:
        """The login command, split where a synchronising literal must wait for "+"."""
        if self._token_mechanism is not None:
            verb = TAG_LOGIN + b" AUTHENTICATE " + self._mechanism.upper().encode()
            if b"SASL-IR" in self._caps:
                return [verb + b" " + self._token_blob() + b"\r\n"]
            return [verb + b"\r\n", self._token_blob() + b"\r\n"]
        user, password = self._credentials()
        if self._mechanism == "plain":
            blob = self._plain_blob()
            if b"SASL-IR" in self._caps:
                return [TAG_LOGIN + b" AUTHENTICATE PLAIN " + blob + b"\r\n"]
            return [TAG_LOGIN + b" AUTHENTICATE PLAIN\r\n", blob + b"\r\n"]
        chunks: list[bytes] = []
        current = TAG_LOGIN + b" LOGIN "
        for arg, after in ((user, b" "), (password, b"\r\n")):
            if _quotable(arg):
                current += _quote(arg)
            elif self._nonsync(len(arg)):
                current += b"{%d+}\r\n" % len(arg) + arg
            else:  # nginx's way: announce, wait for "+", then send the bytes
                chunks.append(current + b"{%d}\r\n" % len(arg))
                current = arg
            current += after
        chunks.append(current)
        return chunks

    def _nonsync(self, size: int) -> bool:
        return b"LITERAL+" in self._caps or (
            b"LITERAL-" in self._caps and size <= LITERAL_MINUS_MAX
        )
