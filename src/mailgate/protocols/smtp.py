"""The SMTP server core before login: submission (RFC 6409, AUTH per RFC 4954) and relay with
`auth none`, as nginx's ngx_mail_smtp_module; STARTTLS per RFC 3207, PIPELINING per RFC 2920.

Built on the skeleton in `core.py` (the read loop, the error budget, SASL, the login and TLS
rules); this module holds SMTP's words and one method per command. No reply repeats anything
the client sent. Lines may end in CRLF or a bare LF: RFC 5321 2.3.8 wants CRLF, but refusing a bare
LF before login protects nothing (no message body is ever read here) and nginx accepts it too.

Relay (`"none"` in the mechanisms): MAIL FROM is accepted locally and the first RCPT TO starts
the login, with the whole HELO, MAIL and RCPT lines in the credentials, as nginx sends them to
auth_http; the backend login core replays them from the credentials, and its answer to the
RCPT (LoggedIn's `backend_reply`) becomes our answer to the client's RCPT.
"""

from __future__ import annotations

import base64
import dataclasses
import re
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
from mailgate.values import CloseReason, Credentials, Method, Secret

# --- legal commands --------------------------------------------------------------------------

# Every command in the dispatch dict `_COMMANDS` (after the class) is read in State.COMMAND;
# each handler checks its own sequence (HELO first, MAIL before RCPT).
# Postfix's smtpd_forbidden_commands: an HTTP client or proxy talking to a mail port (a
# cross-protocol attack) gets one reply and a close instead of a budget of errors.
FORBIDDEN = frozenset({b"GET", b"POST", b"PUT", b"HEAD", b"CONNECT"})
# Config names of the SASL mechanisms, in the order EHLO lists them.
_SASL_NAMES = {
    "plain": "PLAIN",
    "login": "LOGIN",
    "cram-md5": "CRAM-MD5",
    "xoauth2": "XOAUTH2",
    "oauthbearer": "OAUTHBEARER",
}
# EHLO keywords the core owns; a policy capability with the same keyword is not repeated.
_CORE_CAPS = frozenset({"STARTTLS", "AUTH", "XCLIENT"})
# What EHLO offers a trusted peer: the attributes that change something here.
XCLIENT_CAP = "XCLIENT ADDR PORT"

# --- limits ----------------------------------------------------------------------------------

# RFC 5321 4.5.3.1.4: a command line is 512 octets with its CRLF; RFC 1869 4.1.2 lets service
# extensions lengthen MAIL and RCPT, and RFC 3461 (DSN) adds up to 500 octets of NOTIFY/ORCPT
# to RCPT: 1012. Postfix accepts 2048 (line_length_limit) and real clients send longer MAIL
# lines than 1024 (many ESMTP parameters), so ours is Postfix's. AUTH lines are exempt:
# RFC 4954 section 4 allows 12288 octets for an initial response; policy.max_line bounds them.
MAX_COMMAND_LINE = 2048
# RFC 5321 4.5.3.1.2: a domain is at most 255 octets; so is the EHLO/HELO argument.
MAX_HELO = 255
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
FOREIGN = b"521 5.5.1 Protocol error\r\n"  # to HTTP or TLS bytes (ALPACA)
TOO_MANY = b"421 4.7.0 Too many errors, closing connection\r\n"
FLOODED = b"421 4.7.0 Too much pipelined input, closing connection\r\n"
TEMP_AUTH = b"454 4.7.0 Temporary authentication failure\r\n"  # RFC 4954 section 6
LIMITED = b"421 4.7.0 Too many sessions, try again later\r\n"
NOT_TRUSTED = b"550 5.7.0 Error: insufficient authorization\r\n"  # Postfix, to XCLIENT
BAD_XCLIENT = b"501 5.5.4 Bad XCLIENT attribute\r\n"
LIMITED_RELAY = b"451 4.7.0 Too many sessions, try again later\r\n"
# RFC 5321 4.3.2 allows no 454 after RCPT: a relay's temporary failure is a 451.
TEMP_RELAY = b"451 4.3.0 Temporary failure, please try again later\r\n"
AUTH_FAIL_CODE = "535 5.7.8"  # RFC 4954 section 6: authentication credentials invalid
RELAY_FAIL_CODE = "550 5.7.1"  # RFC 3463: delivery not authorised
DEFAULT_REASON = "Authentication failed"

# An Auth-Error-Code we pass on: a 4xx/5xx code with an optional RFC 3463 enhanced code.
_ERROR_CODE = re.compile(r"[45][0-9]{2}( [45]\.[0-9]{1,3}\.[0-9]{1,3})?")
# A backend reply line we pass on to the client: code, separator, printable text.
_REPLY_LINE = re.compile(rb"[245][0-9]{2}( [ -~]*)?")


class SmtpCore(PreAuthCore):
    __slots__ = ("_helo", "_mail", "_relay_login")

    LINE_TOO_LONG = LINE_TOO_LONG
    FLOODED = FLOODED
    FOREIGN = FOREIGN
    FOREIGN_VERBS = FORBIDDEN
    LIMIT_CLOSES = True  # 421: the client comes back later rather than AUTH again now

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        super().__init__(policy, salt)
        self._helo: str | None = None  # the client's EHLO/HELO name
        self._mail: bytes | None = None  # the accepted MAIL FROM line (relay only)
        self._relay_login = False  # the pending login came from RCPT TO, not AUTH

    def greet(self) -> list[Event]:
        text = f"220 {self._policy.hostname} ESMTP {self._policy.greeting}".rstrip()
        return [Send(text.encode("ascii", "replace") + CRLF)]

    def early_talker(self) -> list[Event]:
        """The client sent bytes before the (delayed) greeting: a spambot, not a mail client."""
        self._close()
        return [Send(EARLY), Close(CloseReason.EARLY_TALKER)]

    # --- the skeleton's hooks ------------------------------------------------------------------

    def _command(self, line: bytes) -> list[Event]:
        head, _, rest = line.partition(b" ")
        name = head.decode("ascii", "replace").upper()
        handler = _COMMANDS.get(name)
        if handler is None:
            raise BadCommand(UNKNOWN)
        if name != "AUTH" and len(line) + len(CRLF) > MAX_COMMAND_LINE:
            raise BadCommand(LINE_TOO_LONG)
        return handler(self, line, rest.strip(b" "))

    def _too_many_errors(self, reply: bytes) -> bytes:
        return TOO_MANY  # one reply per command: the goodbye takes the place of the error

    def _forget_session(self) -> None:
        # RFC 3207 section 4.2: forget everything learnt before the handshake, EHLO included.
        self._reset_transaction()
        self._helo = None

    def _login_failed(self) -> None:
        pass  # a refused recipient leaves the sender in place (RFC 5321 4.1.1.3)

    def _challenge(self, data: bytes) -> bytes:
        return b"334 " + base64.b64encode(data) + CRLF

    def _bad_sasl(self) -> BadCommand:
        return BadCommand(BAD_SASL)

    def _bad_base64(self) -> BadCommand:
        return BadCommand(BAD_BASE64)

    def _cancelled(self) -> BadCommand:
        return BadCommand(CANCELLED)

    def _success_reply(self, outcome: LoggedIn) -> bytes:
        return _relay_reply(outcome.backend_reply) if self._relay_login else AUTH_OK

    def _rejected_reply(self, outcome: Rejected) -> bytes:
        default = RELAY_FAIL_CODE if self._relay_login else AUTH_FAIL_CODE
        return _rejection(outcome.message, outcome.error_code, default)

    def _unavailable_reply(self) -> bytes:
        return TEMP_RELAY if self._relay_login else TEMP_AUTH

    def _limited_reply(self) -> bytes:
        return LIMITED_RELAY if self._relay_login else LIMITED

    # --- helpers -------------------------------------------------------------------------------

    def _reset_transaction(self) -> None:
        """RFC 5321 4.1.1.5: forget the mail transaction."""
        self._mail = None

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
        if self._policy.trusted:
            keywords.append(XCLIENT_CAP)
        body = [b"250-" + kw.encode("ascii", "replace") + CRLF for kw in keywords]
        body[-1] = b"250 " + body[-1][4:]
        return [Send(b"".join(body))]

    def _helo_cmd(self, line: bytes, arg: bytes) -> list[Event]:
        self._hello(arg)
        return [Send(b"250 " + self._policy.hostname.encode("ascii", "replace") + CRLF)]

    def _hello(self, arg: bytes) -> None:
        """RFC 5321 4.1.4: EHLO and HELO name the client and end any mail transaction."""
        name = _text(arg)  # one domain or address literal, so no spaces
        if not name or len(arg) > MAX_HELO or not all(c.isprintable() and c != " " for c in name):
            raise BadCommand(SYNTAX)
        self._reset_transaction()
        self._helo = name

    def _starttls(self, line: bytes, arg: bytes) -> list[Event]:
        if arg:
            raise BadCommand(SYNTAX)  # RFC 3207 section 4: no parameters
        if self._tls:
            raise BadCommand(TLS_ACTIVE)
        if not self._policy.starttls:
            raise BadCommand(NO_TLS)
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = State.TLS_PENDING
        return [Send(STARTTLS_OK), StartTLS()]

    def _auth(self, line: bytes, arg: bytes) -> list[Event]:
        mechanisms = _sasl_mechanisms(self._policy)
        if not mechanisms:
            raise BadCommand(NO_AUTH)
        if self._helo is None:
            raise BadCommand(HELO_FIRST)  # RFC 4954 section 4: AUTH needs EHLO first
        if self._mail is not None:
            raise BadCommand(IN_TRANSACTION)
        if not self._cleartext_ok():
            raise BadCommand(TLS_FIRST)
        mech_raw, sep, initial = arg.partition(b" ")
        if not mech_raw:
            raise BadCommand(SYNTAX)
        mech = mech_raw.decode("ascii", "replace").upper()
        if mech not in mechanisms:
            raise BadCommand(BAD_MECH)
        if b" " in initial:
            raise BadCommand(SYNTAX)
        response = None
        if sep:  # RFC 4954 section 4: "=" is an empty initial response, as is nothing
            response = b"" if initial in (b"", b"=") else self._decode(initial)
        self._relay_login = False
        return self._start_sasl(mech, response)

    def _authenticate(self, creds: Credentials) -> list[Event]:
        # Every SMTP login carries the client's HELO name, for the backend's XCLIENT.
        return super()._authenticate(dataclasses.replace(creds, smtp_helo=self._helo))

    def _xclient(self, line: bytes, arg: bytes) -> list[Event]:
        """A trusted peer names the real client (claims.py). As in Postfix, the session then
        starts over: a new greeting, and the client says EHLO again."""
        if not self._policy.trusted:
            self.claim_ignored = True
            raise BadCommand(NOT_TRUSTED)
        if self._mail is not None:
            raise BadCommand(NESTED_MAIL)
        try:
            self.claim = claims.from_xclient(arg) or self.claim
        except claims.ClaimSyntax:
            raise BadCommand(BAD_XCLIENT) from None
        self._reset_transaction()
        self._helo = None
        return self.greet()

    def _mail_cmd(self, line: bytes, arg: bytes) -> list[Event]:
        self._check_envelope(arg, b"FROM:")
        if self._mail is not None:
            raise BadCommand(NESTED_MAIL)
        self._mail = line
        return [Send(MAIL_OK)]

    def _rcpt(self, line: bytes, arg: bytes) -> list[Event]:
        self._check_envelope(arg, b"TO:")
        if self._mail is None:
            raise BadCommand(NEED_MAIL)
        creds = Credentials(
            Method.NONE,
            "",
            Secret(""),
            smtp_from=self._mail.decode("utf-8"),
            smtp_to=line.decode("utf-8"),
        )
        self._relay_login = True
        return self._authenticate(creds)

    def _check_envelope(self, arg: bytes, prefix: bytes) -> None:
        """MAIL and RCPT are for relay listeners, after HELO, with a sane whole line."""
        if not self._relay():
            raise BadCommand(AUTH_REQUIRED)
        if not self._cleartext_ok():
            raise BadCommand(TLS_FIRST)
        if self._helo is None:
            raise BadCommand(HELO_FIRST)
        # The whole line goes to auth_http as a header and to the backend as a command:
        # valid UTF-8 (RFC 6531) without control characters, and an address after the colon.
        text = _text(arg)
        if (
            not text
            or not all(c.isprintable() for c in text)
            or arg[: len(prefix)].upper() != prefix
            or not arg[len(prefix) :].strip(b" ")
        ):
            raise BadCommand(SYNTAX)

    def _data(self, line: bytes, arg: bytes) -> list[Event]:
        # Never DATA before login: body lines that follow are read as (bad) commands.
        if not self._relay():
            raise BadCommand(AUTH_REQUIRED)
        raise BadCommand(NEED_MAIL if self._mail is None else NEED_RCPT)

    def _rset(self, line: bytes, arg: bytes) -> list[Event]:
        if arg:
            raise BadCommand(SYNTAX)
        self._reset_transaction()
        return [Send(OK)]

    def _noop(self, line: bytes, arg: bytes) -> list[Event]:
        return [Send(OK)]  # RFC 5321 4.1.1.9: a parameter is allowed and ignored

    def _vrfy(self, line: bytes, arg: bytes) -> list[Event]:
        if not arg:
            raise BadCommand(SYNTAX)
        return [Send(VRFY)]  # RFC 5321 3.5.3: no user lookups before login

    def _help(self, line: bytes, arg: bytes) -> list[Event]:
        return [Send(HELP)]

    def _quit(self, line: bytes, arg: bytes) -> list[Event]:
        self._close()
        return [Send(BYE), Close(CloseReason.LOGOUT)]


_COMMANDS: dict[str, Callable[[SmtpCore, bytes, bytes], list[Event]]] = {
    "EHLO": SmtpCore._ehlo,
    "HELO": SmtpCore._helo_cmd,
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
    "XCLIENT": SmtpCore._xclient,
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
