"""Backend SMTP login core: open the session on the user's behalf (sans-I/O client side).

What nginx's ngx_mail_proxy_module does for SMTP, plus STARTTLS to the backend and AUTH:

    220  ->  EHLO us  ->  [STARTTLS, TLS, EHLO us]  ->  mode
         xclient: XCLIENT ADDR=.. PORT=.. NAME=.. HELO=.. LOGIN=.. PROTO=..  ->  220  ->  EHLO
                  with the client's HELO name
         auth:    AUTH PLAIN <base64>  ->  235
                  (a token route: AUTH XOAUTH2 | OAUTHBEARER  ->  334  ->  <base64>  ->  235;
                  refused: 334 <error challenge>  ->  our dummy response  ->  535)
         none:    nothing (the backend trusts us)
    ->  the client's envelope replayed line by line (relay: MAIL FROM, RCPT TO)  ->  BackendReady

One command at a time, each reply read in full (multi-line replies included) before the next
command: no pipelining, so a reply always belongs to the command just sent. `BackendReady.reply`
is the final line of the last reply: the answer to the last RCPT (the relay client's answer),
else the 235 or the EHLO's 250. A refusal of an envelope line is the backend's verdict on the
sender or recipient: `BackendFailed.client_reply` carries it, code and text, to the client.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import ClassVar

from mailgate.backend import LoginFailure, forwardable
from mailgate.backend.core import DEFAULT_MAX_LINE, LoginCore
from mailgate.protocols.events import BackendEvent, BackendReady, Rejected, Send, StartTLS
from mailgate.values import ClientInfo, Secret

# An EHLO reply has one line per extension, and the IANA SMTP service extension registry has
# fewer than 60 entries: a longer reply is a runaway peer.
MAX_REPLY_LINES = 128
# RFC 5321 4.5.3.1.4: a command line is 512 octets with its CRLF. The Postfix XCLIENT README
# asks proxies to split their attributes over several XCLIENT commands to stay inside it.
MAX_COMMAND_LINE = 512
# RFC 4954 section 4: an AUTH command with its initial response may be 12288 octets; past
# that the initial response goes after a "334" instead.
MAX_AUTH_LINE = 12288

MODES = frozenset({"xclient", "auth", "none"})
# RFC 3463 enhanced status code, as it follows the reply code.
_ENHANCED = re.compile(r"[245]\.[0-9]{1,3}\.[0-9]{1,3}")
# RFC 5321 4.2.1: "-" after the code on every line of a reply but the last.
_SEPARATORS = (b"", b" ", b"-")
CRLF = b"\r\n"
UNAVAILABLE = "[UNAVAILABLE]"  # the XCLIENT value for "unknown"
# Postfix XCLIENT_README: the attributes we forward, in the order we send them. Only those the
# backend names after its XCLIENT keyword are sent.
XCLIENT_ATTRIBUTES = ("ADDR", "PORT", "NAME", "HELO", "LOGIN", "PROTO", "DESTADDR", "DESTPORT")


class SmtpLoginState(Enum):
    GREETING = auto()  # waiting for "220"
    EHLO = auto()  # sent EHLO, waiting for its "250"
    STARTTLS = auto()  # sent STARTTLS, waiting for "220"
    TLS_PENDING = auto()  # asked the driver for TLS, waiting for tls_started()
    XCLIENT = auto()  # sent an XCLIENT command, waiting for "220" (or "250" before Postfix 2.3)
    AUTH = auto()  # sent AUTH, waiting for "235" (or "334": send the response, or refused)
    ENVELOPE = auto()  # sent an envelope line, waiting for its "250"
    DONE = auto()  # BackendReady or BackendFailed was returned

    # Members are singletons: hash them by identity, in C (Enum's own __hash__ is Python
    # code, and states are dict keys and set members on every byte the cores read).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Reply:
    """One whole SMTP reply: its code, the text of each line, and its final line as sent."""

    code: int
    texts: tuple[bytes, ...]
    last: bytes


def xtext(value: str) -> bytes:
    """RFC 3461 section 4 xtext: "!".."~" except "+" and "=" as they are, others as "+XX"."""
    out = bytearray()
    for byte in value.encode("utf-8", "surrogateescape"):
        if 0x21 <= byte <= 0x7E and byte not in b"+=":
            out.append(byte)
        else:
            out += b"+%02X" % byte
    return bytes(out)


def _reply_line(line: bytes) -> tuple[int, bool, bytes]:
    """(code, is the final line, text) of one reply line; LoginFailure if it is not one."""
    code = line[:3]
    sep = line[3:4]
    if len(code) != 3 or not code.isdigit() or code[:1] not in b"2345" or sep not in _SEPARATORS:
        raise LoginFailure(True, "malformed backend reply", line)
    return int(code), sep != b"-", line[4:]


def _capabilities(reply: Reply) -> dict[str, tuple[str, ...]]:
    """EHLO keywords and their parameters (RFC 5321 4.1.1.1), upper case. "AUTH=X" counts too."""
    caps: dict[str, tuple[str, ...]] = {}
    for text in reply.texts[1:]:  # the first line is the server's name and greeting
        words = text.decode("ascii", "replace").upper().split()
        if not words:
            continue
        keyword, _, param = words[0].partition("=")  # old "AUTH=LOGIN PLAIN" style
        params = ((param,) if param else ()) + tuple(words[1:])
        caps[keyword] = caps.get(keyword, ()) + params
    return caps


class SmtpLogin(LoginCore):
    """Open an SMTP session for a client on a backend. See the module docstring."""

    __slots__ = (
        "_caps",
        "_challenge",
        "_client_helo",
        "_envelope",
        "_forward",
        "_helo_name",
        "_lines",
        "_mode",
        "_queue",
        "_sent",
        "_starttls",
        "_tls_done",
        "_xclient_done",
    )

    DONE = SmtpLoginState.DONE
    TLS_PENDING = SmtpLoginState.TLS_PENDING
    _handlers: ClassVar[dict[SmtpLoginState, Callable[[SmtpLogin, Reply], list[BackendEvent]]]]

    def __init__(
        self,
        *,
        helo_name: str,
        user: str,
        secret: Secret,
        mode: str,
        starttls: bool,
        forward: ClientInfo | None,
        client_helo: str | None,
        envelope: tuple[bytes, ...] = (),
        max_line: int = DEFAULT_MAX_LINE,
        token_mechanism: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown SMTP backend mode {mode!r}")
        if token_mechanism is not None and mode != "auth":
            raise ValueError("a token is passed on with AUTH: mode must be 'auth'")
        super().__init__(user, secret, SmtpLoginState.GREETING, max_line, token_mechanism)
        self._helo_name = helo_name
        self._mode = mode
        self._starttls = starttls
        self._forward = forward
        self._client_helo = client_helo
        self._envelope = envelope
        self._lines: list[bytes] = []  # lines of a multi-line reply read so far
        self._caps: dict[str, tuple[str, ...]] = {}
        self._queue: list[bytes] = []  # commands of the current step still to send
        self._sent = 0  # envelope lines sent so far
        self._tls_done = False
        self._xclient_done = False
        self._challenge: bytes | None = None  # a token route's error challenge, base64

    def _after_tls(self) -> list[BackendEvent]:
        """EHLO again (RFC 3207 section 4.2): what the server said before TLS is void."""
        self._lines.clear()
        self._caps = {}
        self._tls_done = True
        return self._ehlo(self._helo_name)

    # --- reading ------------------------------------------------------------------------

    def _next_unit(self) -> Reply | None:
        """The next whole reply, or None until its final line has arrived."""
        while True:
            line = self._buf.next_line()
            if line is None:
                return None
            code, final, _ = _reply_line(line)
            if self._lines and _reply_line(self._lines[0])[0] != code:
                raise LoginFailure(True, "backend changed code within a reply", line)
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                raise LoginFailure(True, "backend reply has too many lines", line)
            if final:
                lines, self._lines = self._lines, []
                return Reply(code, tuple(_reply_line(each)[2] for each in lines), line)

    # --- handlers, one per state ---------------------------------------------------------

    def _on_greeting(self, reply: Reply) -> list[BackendEvent]:
        self._expect(reply, 220, "backend greeting", verdict=True)
        return self._ehlo(self._helo_name)

    def _on_ehlo(self, reply: Reply) -> list[BackendEvent]:
        self._expect(reply, 250, "backend refused EHLO")
        self._caps = _capabilities(reply)
        if self._starttls and not self._tls_done:
            self._require("STARTTLS")
            self._state = SmtpLoginState.STARTTLS
            return [Send(b"STARTTLS" + CRLF)]
        if self._mode == "xclient" and not self._xclient_done:
            self._require("XCLIENT")
            self._queue = self._xclient_commands()
            if self._queue:
                return self._next_xclient()
            self._xclient_done = True  # it names no attribute we could send
        if self._mode == "auth":
            return self._auth()
        return self._next_envelope(reply)

    def _on_starttls(self, reply: Reply) -> list[BackendEvent]:
        self._expect(reply, 220, "backend refused STARTTLS")
        self._buf.clear()  # bytes after the 220 came in plaintext: drop them
        self._state = SmtpLoginState.TLS_PENDING
        return [StartTLS()]

    def _on_xclient(self, reply: Reply) -> list[BackendEvent]:
        # Postfix 2.3 and later answer with a fresh 220 greeting; older ones with 250.
        if reply.code not in (220, 250):
            self._expect(reply, 220, "backend refused XCLIENT")
        return self._next_xclient()

    def _on_auth(self, reply: Reply) -> list[BackendEvent]:
        token = self._token_mechanism is not None
        if reply.code == 334 and self._queue:
            return [Send(self._queue.pop())]  # the response to an empty challenge
        if reply.code == 334 and token and self._challenge is None:
            self._challenge = reply.last[4:]  # RFC 7628 3.2.2: refused; 535 follows our dummy
            return [Send(self._dummy_response())]
        if reply.code == 235 and self._challenge is None:
            return self._next_envelope(reply)
        # 535 is the backend's verdict on the credentials; any other refusal means we (or it)
        # are misconfigured, which is never the user's fault.
        temporary = reply.code != 535
        refusal = self._token_refusal(self._challenge or b"") if token and not temporary else None
        raise LoginFailure(temporary, "backend refused the login", reply.last, refusal)

    def _on_envelope(self, reply: Reply) -> list[BackendEvent]:
        if reply.code // 100 != 2:
            # The backend's verdict on the sender or recipient is the client's answer too.
            temporary = reply.code // 100 != 5
            detail = f"backend refused the envelope ({reply.code // 100}xx)"
            raise LoginFailure(temporary, detail, reply.last, _client_reply(reply.last))
        return self._next_envelope(reply)

    _handlers = {  # noqa: RUF012 - a ClassVar, declared above
        SmtpLoginState.GREETING: _on_greeting,
        SmtpLoginState.EHLO: _on_ehlo,
        SmtpLoginState.STARTTLS: _on_starttls,
        SmtpLoginState.XCLIENT: _on_xclient,
        SmtpLoginState.AUTH: _on_auth,
        SmtpLoginState.ENVELOPE: _on_envelope,
    }

    # --- steps ---------------------------------------------------------------------------

    def _expect(self, reply: Reply, code: int, what: str, *, verdict: bool = False) -> None:
        """Raise unless the reply is `code`. A 5xx is permanent only where it is the backend's
        `verdict` on the client (its greeting); anything else is temporary."""
        if reply.code == code:
            return
        temporary = not (verdict and reply.code // 100 == 5)
        raise LoginFailure(temporary, f"{what} ({reply.code // 100}xx)", reply.last)

    def _require(self, keyword: str) -> None:
        if keyword not in self._caps:
            raise LoginFailure(True, f"backend does not offer {keyword}")

    def _ehlo(self, name: str) -> list[BackendEvent]:
        self._state = SmtpLoginState.EHLO
        return [Send(b"EHLO " + name.encode("ascii", "replace") + CRLF)]

    def _next_xclient(self) -> list[BackendEvent]:
        if self._queue:
            self._state = SmtpLoginState.XCLIENT
            return [Send(self._queue.pop(0))]
        self._xclient_done = True
        # The XCLIENT reply reset the session to its greeting: EHLO again, with the client's
        # own name as nginx does (the server keeps the HELO attribute regardless).
        helo = self._client_helo
        return self._ehlo(helo if helo and forwardable(helo) else self._helo_name)

    def _xclient_commands(self) -> list[bytes]:
        """XCLIENT commands carrying every advertised attribute, each under 512 octets."""
        offered = set(self._caps["XCLIENT"])
        room = MAX_COMMAND_LINE - len(b"XCLIENT" + CRLF)
        commands: list[bytes] = []
        current = b""
        for name in XCLIENT_ATTRIBUTES:
            value = self._xclient_value(name)
            if name not in offered or value is None:
                continue
            attribute = b" " + name.encode() + b"=" + xtext(value)
            if len(attribute) > room:  # a freak HELO or LOGIN: say we do not know it
                attribute = b" " + name.encode() + b"=" + xtext(UNAVAILABLE)
            if len(current) + len(attribute) > room:
                commands.append(b"XCLIENT" + current + CRLF)
                current = b""
            current += attribute
        if current:
            commands.append(b"XCLIENT" + current + CRLF)
        return commands

    def _xclient_value(self, name: str) -> str | None:
        """The value of one attribute, UNAVAILABLE when unknown, None to leave it out."""
        fwd = self._forward
        ip = fwd.ip if fwd and forwardable(fwd.ip) else ""
        local_ip = fwd.local_ip if fwd and forwardable(fwd.local_ip) else ""
        values = {
            "ADDR": ("IPV6:" + ip if ":" in ip else ip) or UNAVAILABLE,
            "PORT": str(fwd.port) if fwd and fwd.port else UNAVAILABLE,
            "NAME": UNAVAILABLE,  # no reverse lookups (nginx without a resolver does the same)
            "HELO": self._client_helo or UNAVAILABLE,
            "LOGIN": self._user or None,  # relay ("auth none") clients have no login
            "PROTO": "ESMTP",
            "DESTADDR": ("IPV6:" + local_ip if ":" in local_ip else local_ip) or None,
            "DESTPORT": str(fwd.local_port) if fwd and fwd.local_port else None,
        }
        return values[name]

    def _auth(self) -> list[BackendEvent]:
        mechanism = (self._token_mechanism or "plain").upper()
        if mechanism not in self._caps.get("AUTH", ()):
            raise LoginFailure(True, f"backend does not offer AUTH {mechanism}")
        if self._token_mechanism is not None:
            # Never on the AUTH line: Dovecot's submission service takes only ~1 KiB there.
            self._queue = [self._token_blob() + CRLF]
            self._state = SmtpLoginState.AUTH
            return [Send(b"AUTH " + mechanism.encode() + CRLF)]
        blob = self._plain_blob()
        self._state = SmtpLoginState.AUTH
        command = b"AUTH PLAIN " + blob + CRLF
        if len(command) <= MAX_AUTH_LINE:
            return [Send(command)]
        self._queue = [blob + CRLF]
        return [Send(b"AUTH PLAIN" + CRLF)]

    def _next_envelope(self, reply: Reply) -> list[BackendEvent]:
        if self._sent < len(self._envelope):
            line = self._envelope[self._sent]
            self._sent += 1
            self._state = SmtpLoginState.ENVELOPE
            return [Send(line + CRLF)]
        self._state = SmtpLoginState.DONE
        return [BackendReady(reply=reply.last, trailing=self._buf.take_all())]

    # --- secrets and failures ---------------------------------------------------------------


def _client_reply(last: bytes) -> Rejected:
    """The backend's refusal of a MAIL or RCPT line as the client core's outcome (its code
    and text reach the client)."""
    code, _, text = last.decode("ascii", "replace").partition(" ")
    enhanced, _, rest = text.partition(" ")
    if _ENHANCED.fullmatch(enhanced):
        return Rejected(rest, f"{code} {enhanced}")
    return Rejected(text, code)
