"""The SMTP server core before login: submission (RFC 6409, AUTH per RFC 4954) and relay with
`auth none`, as nginx's ngx_mail_smtp_module; STARTTLS per RFC 3207, PIPELINING per RFC 2920.

Sans-I/O: `receive(bytes)` returns events and the driver performs them. Handlers raise
`ProtocolError` and `_error_events` alone turns it into events. No reply repeats anything the
client sent. Lines may end in CRLF or a bare LF: RFC 5321 2.3.8 wants CRLF, but refusing a bare
LF before login protects nothing (no message body is ever read here) and nginx accepts it too.

Relay (`"none"` in the mechanisms): MAIL FROM is accepted locally and the first RCPT TO starts
the login, with the whole HELO, MAIL and RCPT lines in the credentials, as nginx sends them to
auth_http. The backend login core replays `envelope`; its answer to the RCPT (LoggedIn's
`backend_reply`) becomes our answer to the client's RCPT.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
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
from mailgate.protocols.sasl import Challenge, SaslError, SaslServer, new_server
from mailgate.values import Credentials, Method, Secret


class SmtpState(Enum):
    COMMAND = "command"  # reading commands
    AWAIT_SASL = "await-sasl"  # a "334" challenge was sent, a response line is expected
    TLS_PENDING = "tls-pending"  # "220" to STARTTLS sent, the driver is doing the handshake
    AUTHENTICATING = "authenticating"  # Authenticate emitted, waiting for finish_login
    LOGGED_IN = "logged-in"  # the relay takes over; `trailing` holds pipelined bytes
    CLOSED = "closed"


# --- legal commands --------------------------------------------------------------------------

# Commands are read only in COMMAND state, where every one below is legal; each handler checks
# its own sequence (HELO first, MAIL before RCPT) and the dispatch dict `_COMMANDS` sits right
# after the class. In AWAIT_SASL a line is a SASL response; in the other states bytes wait
# (AUTHENTICATING), are dropped (TLS_PENDING, CLOSED) or belong to the relay (LOGGED_IN).
_READING = frozenset({SmtpState.COMMAND, SmtpState.AWAIT_SASL})
# Postfix's smtpd_forbidden_commands: an HTTP client or proxy talking to a mail port (a
# cross-protocol attack) gets one reply and a close instead of a budget of errors.
FORBIDDEN = frozenset({"GET", "POST", "PUT", "HEAD", "CONNECT"})
# Config names of the SASL mechanisms, in the order EHLO lists them.
_SASL_NAMES = {"plain": "PLAIN", "login": "LOGIN", "cram-md5": "CRAM-MD5"}
# EHLO keywords the core owns; a policy capability with the same keyword is not repeated.
_CORE_CAPS = frozenset({"STARTTLS", "AUTH"})

# --- limits ----------------------------------------------------------------------------------

# RFC 5321 4.5.3.1.4: a command line is 512 octets with its CRLF; RFC 1869 4.1.2 lets service
# extensions lengthen MAIL and RCPT, and RFC 3461 (DSN) adds up to 500 octets of NOTIFY/ORCPT
# to RCPT. 512 + 500, rounded up. AUTH lines are exempt: RFC 4954 section 4 allows 12288
# octets for an initial response, and they are bounded by policy.max_line instead.
MAX_COMMAND_LINE = 1024
# RFC 5321 4.5.3.1.2: a domain is at most 255 octets; so is the EHLO/HELO argument.
MAX_HELO = 255
# Bytes a client may pipeline behind the command that starts a login (RFC 2920): a relay
# client sends its other RCPTs (RFC 5321 4.5.3.1.8: at least 100) and DATA before it waits.
# 64 KiB holds 100 full command lines with room to spare.
MAX_PIPELINED = 64 * 1024
# RFC 5321 4.5.3.1.5: a reply line is at most 512 octets with its CRLF.
MAX_REPLY_LINE = 512
# Longest authenticator message shown after the reply code: well inside MAX_REPLY_LINE, and far
# beyond any sane message.
MAX_REASON = 200

# --- replies ---------------------------------------------------------------------------------

CRLF = b"\r\n"
OK = b"250 2.0.0 OK\r\n"
MAIL_OK = b"250 2.1.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"
HELP = b"214 2.0.0 Commands: EHLO HELO STARTTLS AUTH MAIL RCPT RSET NOOP VRFY HELP QUIT\r\n"
VRFY = b"252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery\r\n"
STARTTLS_OK = b"220 2.0.0 Ready to start TLS\r\n"
AUTH_OK = b"235 2.7.0 Authentication successful\r\n"
RELAY_OK = b"250 2.1.5 OK"  # our RCPT reply if the backend's cannot be passed on
EARLY = b"554 5.5.0 Improper use of SMTP command pipelining\r\n"  # talked before the greeting
UNKNOWN = b"500 5.5.2 Command not recognized\r\n"
LINE_TOO_LONG = b"500 5.5.6 Line too long\r\n"
SYNTAX = b"501 5.5.4 Invalid argument\r\n"
BAD_BASE64 = b"501 5.5.2 Cannot decode response\r\n"  # RFC 4954 section 4
BAD_SASL = b"501 5.5.2 Invalid authentication data\r\n"
CANCELLED = b"501 5.7.0 Authentication cancelled\r\n"  # RFC 4954 section 4
HELO_FIRST = b"503 5.5.1 Send HELO/EHLO first\r\n"
NESTED_MAIL = b"503 5.5.1 Sender already specified\r\n"
NEED_MAIL = b"503 5.5.1 Need MAIL command\r\n"
NEED_RCPT = b"503 5.5.1 Need RCPT command\r\n"
IN_TRANSACTION = b"503 5.5.1 AUTH not allowed during a mail transaction\r\n"  # RFC 4954 4
TLS_ACTIVE = b"503 5.5.1 TLS already active\r\n"  # RFC 3207 section 4.2
NO_AUTH = b"502 5.5.1 AUTH not available\r\n"
BAD_MECH = b"504 5.5.4 Unrecognized authentication type\r\n"  # RFC 4954 section 6
NO_TLS = b"454 4.7.0 TLS not available\r\n"  # RFC 3207 section 4
TLS_FIRST = b"530 5.7.0 Must issue a STARTTLS command first\r\n"  # RFC 3207 section 4
AUTH_REQUIRED = b"530 5.7.0 Authentication required\r\n"  # RFC 4954 section 6
NOT_SMTP = b"521 5.5.1 Protocol error\r\n"
TOO_MANY = b"421 4.7.0 Too many errors, closing connection\r\n"
FLOODED = b"421 4.7.0 Too much pipelined input, closing connection\r\n"
TEMP_AUTH = b"454 4.7.0 Temporary authentication failure\r\n"  # RFC 4954 section 6
# RFC 5321 4.3.2 allows no 454 after RCPT: a relay's temporary failure is a 451.
TEMP_RELAY = b"451 4.3.0 Temporary failure, please try again later\r\n"
AUTH_FAIL_CODE = "535 5.7.8"  # RFC 4954 section 6: authentication credentials invalid
RELAY_FAIL_CODE = "550 5.7.1"  # RFC 3463: delivery not authorised
DEFAULT_REASON = "Authentication failed"

# For the log line: why a fatal ProtocolError closed the session.
_CLOSE_REASONS = {
    NOT_SMTP: "not smtp",
    TOO_MANY: "too many invalid commands",
    LINE_TOO_LONG: "line too long",
    FLOODED: "pipelining overflow",
}
# An Auth-Error-Code we pass on: a 4xx/5xx code with an optional RFC 3463 enhanced code.
_ERROR_CODE = re.compile(r"[45][0-9]{2}( [45]\.[0-9]{1,3}\.[0-9]{1,3})?")
# A backend reply line we pass on to the client: code, separator, printable text.
_REPLY_LINE = re.compile(rb"[245][0-9]{2}( [ -~]*)?")


class SmtpCore:
    __slots__ = (
        "_attempts",
        "_buf",
        "_errors",
        "_mail",
        "_policy",
        "_relay_login",
        "_salt",
        "_sasl",
        "_tls",
        "envelope",
        "helo",
        "state",
        "trailing",
    )

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        self._policy = policy
        self._salt = salt  # the CRAM-MD5 challenge, "<...@host>"
        self._buf = LineBuffer(max(policy.max_line, MAX_COMMAND_LINE))
        self._tls = policy.tls_active
        self._sasl: SaslServer | None = None
        self._mail: bytes | None = None  # the accepted MAIL FROM line (relay only)
        self._relay_login = False  # the pending login came from RCPT TO, not AUTH
        self._errors = 0  # refused commands so far, against policy.max_errors
        self._attempts = 0  # finished logins that did not succeed
        self.state = SmtpState.COMMAND
        self.trailing = b""
        self.helo: str | None = None
        self.envelope: tuple[bytes, ...] = ()

    # --- the driver's surface ------------------------------------------------------------------

    def greet(self) -> list[Event]:
        text = f"220 {self._policy.hostname} ESMTP {self._policy.greeting}".rstrip()
        return [Send(text.encode("ascii", "replace") + CRLF)]

    def early_talker(self) -> list[Event]:
        """The client sent bytes before the (delayed) greeting: a spambot, not a mail client."""
        self.state = SmtpState.CLOSED
        return [Send(EARLY), Close("talked before the greeting")]

    def receive(self, data: bytes) -> list[Event]:
        if self.state is SmtpState.CLOSED:
            return []
        if not data:
            self.state = SmtpState.CLOSED
            return [Close("eof")]
        if self.state is SmtpState.TLS_PENDING:
            return []  # plaintext behind STARTTLS is never parsed (CVE-2011-0411)
        if self.state is SmtpState.LOGGED_IN:
            self.trailing += data
            if len(self.trailing) > MAX_PIPELINED:
                self.state = SmtpState.CLOSED
                return [Close(_CLOSE_REASONS[FLOODED])]
            return []
        self._buf.feed(data)
        return self._run()

    def tls_started(self) -> list[Event]:
        if self.state is not SmtpState.TLS_PENDING:
            raise RuntimeError("tls_started() outside TLS_PENDING")
        # RFC 3207 section 4.2: forget everything learnt before the handshake, EHLO included.
        self._buf.clear()
        self._tls = True
        self._reset()
        self.helo = None
        self.state = SmtpState.COMMAND
        return []

    def finish_login(self, outcome: LoginOutcome) -> list[Event]:
        if self.state is SmtpState.CLOSED:
            return []  # the client left while the authenticator was busy
        if self.state is not SmtpState.AUTHENTICATING:
            raise RuntimeError("finish_login() outside AUTHENTICATING")
        relay = self._relay_login
        if isinstance(outcome, LoggedIn):
            self.state = SmtpState.LOGGED_IN
            self.trailing = self._buf.take_all()
            return [Send(_relay_reply(outcome.backend_reply) if relay else AUTH_OK)]
        self._attempts += 1
        if self._mail is not None:
            self.envelope = (self._mail,)  # the recipient was refused; the sender stands
        if isinstance(outcome, Unavailable):
            reply = TEMP_RELAY if relay else TEMP_AUTH
        else:
            default = RELAY_FAIL_CODE if relay else AUTH_FAIL_CODE
            reply = _rejection(outcome.message, outcome.error_code, default)
        if self._attempts >= self._policy.max_auth_attempts:
            self.state = SmtpState.CLOSED
            return [Send(reply), Close("too many failed logins")]
        self.state = SmtpState.COMMAND
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
        if self.state is SmtpState.AUTHENTICATING and len(self._buf) > MAX_PIPELINED:
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
        self.state = SmtpState.CLOSED
        return [Send(exc.reply), Close(_CLOSE_REASONS.get(exc.reply, "protocol error"))]

    def _line(self, line: bytes) -> list[Event]:
        if self.state is SmtpState.AWAIT_SASL:
            return self._sasl_response(line)
        head, _, rest = line.partition(b" ")
        name = head.decode("ascii", "replace").upper()
        handler = _COMMANDS.get(name)
        if handler is None:
            if name in FORBIDDEN:
                raise ProtocolError(NOT_SMTP, close=True)
            raise self._bad(UNKNOWN)
        if name != "AUTH" and len(line) + len(CRLF) > MAX_COMMAND_LINE:
            raise self._bad(LINE_TOO_LONG)
        return handler(self, line, rest.strip(b" "))

    def _bad(self, reply: bytes) -> ProtocolError:
        """Spend one refused command from the budget (nginx max_errors)."""
        self._errors += 1
        if self._errors >= self._policy.max_errors:
            return ProtocolError(TOO_MANY, close=True)
        return ProtocolError(reply)

    def _reset(self) -> None:
        """RFC 5321 4.1.1.5: forget the mail transaction (and any SASL exchange)."""
        self._mail = None
        self._sasl = None
        self.envelope = ()

    def _login(self, creds: Credentials, *, relay: bool) -> list[Event]:
        self._sasl = None
        self._relay_login = relay
        self.state = SmtpState.AUTHENTICATING
        return [Authenticate(dataclasses.replace(creds, attempt=self._attempts + 1))]

    def _cleartext_ok(self) -> bool:
        return self._tls or not self._policy.starttls_only

    def _relay(self) -> bool:
        return "none" in self._policy.mechanisms

    # --- commands ------------------------------------------------------------------------------

    def _ehlo(self, line: bytes, arg: bytes) -> list[Event]:
        self._hello(arg)
        keywords = [self._policy.hostname, *_policy_caps(self._policy)]
        if self._policy.starttls and not self._tls:
            keywords.append("STARTTLS")
        mechanisms = _sasl_mechanisms(self._policy)
        if mechanisms and self._cleartext_ok():
            keywords.append("AUTH " + " ".join(mechanisms))
        body = [b"250-" + kw.encode("ascii", "replace") + CRLF for kw in keywords]
        body[-1] = b"250 " + body[-1][4:]
        return [Send(b"".join(body))]

    def _helo(self, line: bytes, arg: bytes) -> list[Event]:
        self._hello(arg)
        return [Send(b"250 " + self._policy.hostname.encode("ascii", "replace") + CRLF)]

    def _hello(self, arg: bytes) -> None:
        """RFC 5321 4.1.4: EHLO and HELO name the client and end any mail transaction."""
        name = _text(arg)  # one domain or address literal, so no spaces
        if not name or len(arg) > MAX_HELO or not all(c.isprintable() and c != " " for c in name):
            raise self._bad(SYNTAX)
        self._reset()
        self.helo = name

    def _starttls(self, line: bytes, arg: bytes) -> list[Event]:
        if arg:
            raise self._bad(SYNTAX)  # RFC 3207 section 4: no parameters
        if self._tls:
            raise self._bad(TLS_ACTIVE)
        if not self._policy.starttls:
            raise self._bad(NO_TLS)
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = SmtpState.TLS_PENDING
        return [Send(STARTTLS_OK), StartTLS()]

    def _auth(self, line: bytes, arg: bytes) -> list[Event]:
        mechanisms = _sasl_mechanisms(self._policy)
        if not mechanisms:
            raise self._bad(NO_AUTH)
        if self.helo is None:
            raise self._bad(HELO_FIRST)  # RFC 4954 section 4: AUTH needs EHLO first
        if self._mail is not None:
            raise self._bad(IN_TRANSACTION)
        if not self._cleartext_ok():
            raise self._bad(TLS_FIRST)
        mech_raw, sep, initial = arg.partition(b" ")
        if not mech_raw:
            raise self._bad(SYNTAX)
        mech = mech_raw.decode("ascii", "replace").upper()
        if mech not in mechanisms:
            raise self._bad(BAD_MECH)
        if sep and (not initial or b" " in initial):
            raise self._bad(SYNTAX)
        response = None
        if sep:  # RFC 4954 section 4: "=" is an empty initial response
            response = b"" if initial == b"=" else self._decode(initial)
        self._sasl = new_server(mech, self._salt)
        return self._sasl_step(response)

    def _mail_cmd(self, line: bytes, arg: bytes) -> list[Event]:
        self._check_envelope(arg, b"FROM:")
        if self._mail is not None:
            raise self._bad(NESTED_MAIL)
        self._mail = line
        self.envelope = (line,)
        return [Send(MAIL_OK)]

    def _rcpt(self, line: bytes, arg: bytes) -> list[Event]:
        self._check_envelope(arg, b"TO:")
        if self._mail is None:
            raise self._bad(NEED_MAIL)
        self.envelope = (self._mail, line)
        creds = Credentials(
            Method.NONE,
            "",
            Secret(""),
            smtp_helo=self.helo,
            smtp_from=self._mail.decode("utf-8"),
            smtp_to=line.decode("utf-8"),
        )
        return self._login(creds, relay=True)

    def _check_envelope(self, arg: bytes, prefix: bytes) -> None:
        """MAIL and RCPT are for relay listeners, after HELO, with a sane whole line."""
        if not self._relay():
            raise self._bad(AUTH_REQUIRED)
        if not self._cleartext_ok():
            raise self._bad(TLS_FIRST)
        if self.helo is None:
            raise self._bad(HELO_FIRST)
        # The whole line goes to auth_http as a header and to the backend as a command:
        # valid UTF-8 (RFC 6531) without control characters, and an address after the colon.
        text = _text(arg)
        if (
            not text
            or not all(c.isprintable() for c in text)
            or arg[: len(prefix)].upper() != prefix
            or not arg[len(prefix) :].strip(b" ")
        ):
            raise self._bad(SYNTAX)

    def _data(self, line: bytes, arg: bytes) -> list[Event]:
        # Never DATA before login: body lines that follow are read as (bad) commands.
        if not self._relay():
            raise self._bad(AUTH_REQUIRED)
        raise self._bad(NEED_MAIL if self._mail is None else NEED_RCPT)

    def _rset(self, line: bytes, arg: bytes) -> list[Event]:
        if arg:
            raise self._bad(SYNTAX)
        self._reset()
        return [Send(OK)]

    def _noop(self, line: bytes, arg: bytes) -> list[Event]:
        return [Send(OK)]  # RFC 5321 4.1.1.9: a parameter is allowed and ignored

    def _vrfy(self, line: bytes, arg: bytes) -> list[Event]:
        if not arg:
            raise self._bad(SYNTAX)
        return [Send(VRFY)]  # RFC 5321 3.5.3: no user lookups before login

    def _help(self, line: bytes, arg: bytes) -> list[Event]:
        return [Send(HELP)]

    def _quit(self, line: bytes, arg: bytes) -> list[Event]:
        self.state = SmtpState.CLOSED
        return [Send(BYE), Close("quit")]

    # --- SASL exchange -------------------------------------------------------------------------

    def _sasl_response(self, line: bytes) -> list[Event]:
        if line == b"*":
            self._sasl = None
            self.state = SmtpState.COMMAND
            raise self._bad(CANCELLED)
        return self._sasl_step(self._decode(line))

    def _decode(self, data: bytes) -> bytes:
        try:
            return binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            self._sasl = None
            self.state = SmtpState.COMMAND
            raise self._bad(BAD_BASE64) from None

    def _sasl_step(self, response: bytes | None) -> list[Event]:
        server = self._sasl
        if server is None:  # unreachable: AWAIT_SASL is only entered with a server
            raise ProtocolError(BAD_SASL, close=True)
        try:
            result = server.step(response)
        except SaslError:
            self._sasl = None
            self.state = SmtpState.COMMAND
            raise self._bad(BAD_SASL) from None
        if isinstance(result, Challenge):
            self.state = SmtpState.AWAIT_SASL
            return [Send(b"334 " + base64.b64encode(result.data) + CRLF)]
        return self._login(result, relay=False)


_COMMANDS: dict[str, Callable[[SmtpCore, bytes, bytes], list[Event]]] = {
    "EHLO": SmtpCore._ehlo,
    "HELO": SmtpCore._helo,
    "STARTTLS": SmtpCore._starttls,
    "AUTH": SmtpCore._auth,
    "MAIL": SmtpCore._mail_cmd,
    "RCPT": SmtpCore._rcpt,
    "DATA": SmtpCore._data,
    "BDAT": SmtpCore._data,
    "RSET": SmtpCore._rset,
    "NOOP": SmtpCore._noop,
    "VRFY": SmtpCore._vrfy,
    "HELP": SmtpCore._help,
    "QUIT": SmtpCore._quit,
}


# --- helpers -----------------------------------------------------------------------------------


def _sasl_mechanisms(policy: PreAuthPolicy) -> tuple[str, ...]:
    return tuple(name for key, name in _SASL_NAMES.items() if key in policy.mechanisms)


def _policy_caps(policy: PreAuthPolicy) -> list[str]:
    return [
        cap
        for cap in policy.capabilities
        if cap.isascii() and cap.isprintable() and cap.split(" ")[0].upper() not in _CORE_CAPS
    ]


def _text(raw: bytes) -> str:
    """A command argument as text: UTF-8 (RFC 6531), or "" when it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return ""


def _rejection(message: str, error_code: str | None, default: str) -> bytes:
    """The authenticator's refusal as one reply line: its code if sane, printable text."""
    code = error_code.strip() if error_code else ""
    if not _ERROR_CODE.fullmatch(code):
        code = default
    text = "".join(c if " " <= c <= "~" else " " for c in message[:MAX_REASON]).strip()
    return f"{code} {text or DEFAULT_REASON}".encode("ascii") + CRLF


def _relay_reply(reply: bytes) -> bytes:
    """The backend's reply to the replayed RCPT, passed on if it is one sane line."""
    reply = reply.rstrip(b"\r\n")
    if len(reply) + len(CRLF) > MAX_REPLY_LINE or not _REPLY_LINE.fullmatch(reply):
        reply = RELAY_OK
    return reply + CRLF
