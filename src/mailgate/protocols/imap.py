"""The IMAP server core before login: RFC 9051 / RFC 3501 (CAPABILITY, NOOP, LOGOUT, STARTTLS,
LOGIN, AUTHENTICATE), RFC 7888 LITERAL+, RFC 4959 SASL-IR and RFC 2971 ID.

Sans-I/O: `receive(bytes)` returns events and the driver performs them; the core never sees a
socket or a clock. The grammar lives in `imapwire`; this module holds the states, the command
table and one method per command. Handlers raise `ProtocolError` (or `BadCommand`, which spends
the error budget) and `_error_events` alone turns it into events. No reply repeats anything the
client sent except its tag, so credentials are never echoed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from enum import Enum

from mailgate.protocols import imapwire as wire
from mailgate.protocols.events import (
    Authenticate,
    Close,
    Event,
    LoggedIn,
    LoginOutcome,
    ProtocolError,
    Rejected,
    Send,
    StartTLS,
)
from mailgate.protocols.lines import LineBuffer, LineTooLong
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import MAX_FIELD, Challenge, SaslError, SaslServer, new_server
from mailgate.values import Credentials, Method, Secret


class ImapState(Enum):
    NOT_AUTHENTICATED = "not-authenticated"  # RFC 9051 3.1: reading command lines
    AWAIT_LITERAL = "await-literal"  # inside a command with literals: its bytes, then the line
    AWAIT_SASL = "await-sasl"  # AUTHENTICATE sent "+ challenge", a response line is expected
    TLS_PENDING = "tls-pending"  # "OK Begin TLS" sent, the driver is doing the handshake
    AUTHENTICATING = "authenticating"  # Authenticate emitted, waiting for finish_login
    LOGGED_IN = "logged-in"  # the relay takes over; `trailing` holds pipelined bytes
    CLOSED = "closed"


# --- legal commands ----------------------------------------------------------------------------

# The not-authenticated state (RFC 9051 6.1 and 6.2, RFC 2971 ID). Only NOT_AUTHENTICATED reads
# commands; the other states read literal bytes, SASL lines, or nothing (see _STEPS below).
PRE_AUTH_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "ID", "LOGIN", "AUTHENTICATE"}
)
# The only commands with string arguments before login; a literal elsewhere is a syntax error.
LITERAL_COMMANDS = frozenset({"LOGIN", "ID"})
# Real IMAP commands of the later states (RFC 9051 6.3, 6.4 and common extensions): a BAD, but
# not the sign of a peer that does not speak IMAP at all.
POST_AUTH_COMMANDS = frozenset(
    {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB"}
    | {"NAMESPACE", "STATUS", "APPEND", "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH"}
    | {"FETCH", "STORE", "COPY", "MOVE", "UID", "ENABLE", "UNAUTHENTICATE", "XLIST", "GETQUOTA"}
    | {"GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL", "DELETEACL", "MYRIGHTS", "LISTRIGHTS"}
    | {"GETMETADATA", "SETMETADATA", "SORT", "THREAD", "COMPRESS", "NOTIFY", "LANGUAGE", "REPLACE"}
)
# Config names of the SASL mechanisms and their wire names. "login" enables both the LOGIN
# command and AUTHENTICATE LOGIN (nginx advertises AUTH=LOGIN for it).
_SASL_NAMES = {"plain": "PLAIN", "login": "LOGIN", "cram-md5": "CRAM-MD5"}
# Capabilities the core decides itself; a policy capability that names one is dropped.
_CORE_CAPS = frozenset(
    {"IMAP4REV1", "LITERAL+", "LITERAL-", "SASL-IR", "ID", "STARTTLS", "LOGINDISABLED"}
)

# --- limits ------------------------------------------------------------------------------------

# Longest authenticator message shown after "NO [AUTHENTICATIONFAILED] ": far beyond any sane
# message, and a reply line stays well inside a client's 8 KiB line limit (RFC 7162 4).
MAX_REASON = 200
# A whole command with its literals may be one line plus two maximal literals: LOGIN, the
# largest pre-auth command, has two strings.
_LITERALS_PER_COMMAND = 2

# --- replies -----------------------------------------------------------------------------------

CRLF = b"\r\n"
CONTINUE = b"+ OK\r\n"
BAD_TAG = b"* BAD Invalid tag\r\n"
EMPTY = b"* BAD Empty command line\r\n"
# A lone word is what a SASL response sent without waiting for "+" looks like: its "tag" may be
# a credential, so it is not echoed (RFC 9051 7.1.3 allows an untagged BAD).
MISSING = b"* BAD Missing command\r\n"
NOT_IMAP = b"* BYE Not an IMAP client\r\n"  # cross-protocol defence: HTTP, SMTP, TLS bytes
LINE_TOO_LONG = b"* BYE Line too long\r\n"
LITERAL_FATAL = b"* BYE Literal too large\r\n"
NONSYNC_FATAL = b"* BYE Syntax error after a non-synchronising literal\r\n"
TOO_MANY = b"* BYE Too many invalid commands\r\n"
TOO_MANY_FAILURES = b"* BYE Too many failed logins\r\n"
FLOODED = b"* BYE Too much input while logging in\r\n"
LOGOUT_BYE = b"* BYE Logging out\r\n"
ID_REPLY = b"* ID NIL\r\n"
# Tagged replies: the client's tag goes before each.
UNKNOWN = b" BAD Unknown command\r\n"
NOT_ALLOWED = b" BAD Command not allowed before login\r\n"
SYNTAX = b" BAD Syntax error\r\n"
LITERAL_TOO_LARGE = b" BAD Literal too large\r\n"
BAD_CREDENTIALS = b" BAD Invalid characters or length in user name or password\r\n"
BAD_SASL = b" BAD Malformed authentication response\r\n"
CANCELLED = b" BAD Authentication cancelled\r\n"
TLS_ACTIVE = b" BAD TLS is already active\r\n"
NO_STARTTLS = b" BAD STARTTLS is not available\r\n"
PRIVACY = b" NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connection\r\n"
LOGIN_DISABLED = b" NO [CANNOT] LOGIN is disabled\r\n"
BAD_MECH = b" NO [CANNOT] Unsupported authentication mechanism\r\n"
AUTH_FAILED = b" NO [AUTHENTICATIONFAILED] "
TEMP_FAIL = b" NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
DEFAULT_REASON = "Authentication failed."

# For the log line: why a fatal reply closed the session (looked up by its last line).
_CLOSE_REASONS = {
    NOT_IMAP: "not imap",
    LINE_TOO_LONG: "line too long",
    LITERAL_FATAL: "literal too large",
    NONSYNC_FATAL: "syntax error after non-synchronising literal",
    TOO_MANY: "too many invalid commands",
    FLOODED: "pipelining overflow",
}


class BadCommand(ProtocolError):
    """A BAD reply: the command could not be parsed or is not known. Spends the error budget."""


class ImapCore:
    __slots__ = (
        "_args_at",
        "_attempts",
        "_buf",
        "_command",
        "_errors",
        "_failures",
        "_nonsync",
        "_policy",
        "_salt",
        "_sasl",
        "_seen_command",
        "_tag",
        "_tls",
        "_trailing",
        "_verb",
        "state",
    )

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        self._policy = policy
        self._salt = salt  # the CRAM-MD5 challenge, "<...@host>"
        self._buf = LineBuffer(policy.max_line)
        self._tls = policy.tls_active
        self._seen_command = False  # the first command decides whether this is IMAP at all
        self._errors = 0  # BAD commands so far, against policy.max_errors
        self._attempts = 0  # Authenticate events so far: the attempt number nginx sends
        self._failures = 0  # rejected logins, against policy.max_auth_attempts
        self._tag = b""  # tag of the command in progress (its literals, SASL, login)
        self._verb = ""
        self._args_at = 0  # where the arguments start in the command's first line
        max_command = policy.max_line + _LITERALS_PER_COMMAND * policy.max_literal
        self._command = wire.CommandAssembler(policy.max_literal, max_command)
        self._nonsync = False  # the command announced a {n+} literal: its errors are fatal
        self._sasl: SaslServer | None = None
        self._trailing = b""
        self.state = ImapState.NOT_AUTHENTICATED

    # --- the driver's surface ------------------------------------------------------------------

    @property
    def trailing(self) -> bytes:
        """Bytes the client pipelined behind its successful login command, for the relay."""
        return self._trailing

    def greet(self) -> list[Event]:
        caps = _capabilities(self._policy, self._tls)
        text = wire.text(self._policy.greeting, len(self._policy.greeting)) or b"IMAP4rev1 ready"
        return [Send(b"* OK [CAPABILITY " + caps + b"] " + text + CRLF)]

    def receive(self, data: bytes) -> list[Event]:
        if self.state is ImapState.CLOSED:
            return []
        if not data:
            self._close()
            return [Close("eof")]
        if self.state is ImapState.TLS_PENDING:
            return []  # plaintext behind STARTTLS is never parsed (CVE-2011-0411)
        if self.state is ImapState.LOGGED_IN:
            self._trailing += data  # the driver should relay instead; keep the bytes, bounded
            return self._fatal(FLOODED) if len(self._trailing) > self._hold_limit() else []
        self._buf.feed(data)
        if self.state is ImapState.AUTHENTICATING:  # held, unread, until finish_login
            return self._fatal(FLOODED) if len(self._buf) > self._hold_limit() else []
        return self._run()

    def tls_started(self) -> list[Event]:
        if self.state is not ImapState.TLS_PENDING:
            raise RuntimeError("tls_started() outside TLS_PENDING")
        self._buf.clear()  # RFC 9051 6.2.1: forget everything learnt before the handshake
        self._tls = True
        self.state = ImapState.NOT_AUTHENTICATED
        return []  # no new greeting: the client asks CAPABILITY again

    def finish_login(self, outcome: LoginOutcome) -> list[Event]:
        if self.state is ImapState.CLOSED:
            return []  # the client left while the authenticator was busy
        if self.state is not ImapState.AUTHENTICATING:
            raise RuntimeError("finish_login() outside AUTHENTICATING")
        tag = self._tag
        if isinstance(outcome, LoggedIn):
            self.state = ImapState.LOGGED_IN
            self._trailing = self._buf.take_all()
            return [Send(tag + b" " + outcome.backend_reply.rstrip(b"\r\n") + CRLF)]
        self.state = ImapState.NOT_AUTHENTICATED
        if not isinstance(outcome, Rejected):  # Unavailable: an outage is not a bad password
            return [Send(tag + TEMP_FAIL), *self._run()]
        self._failures += 1
        text = wire.text(outcome.message, MAX_REASON) or DEFAULT_REASON.encode("ascii")
        reply = tag + AUTH_FAILED + text + CRLF
        if self._failures >= self._policy.max_auth_attempts:
            self._close()
            return [Send(reply + TOO_MANY_FAILURES), Close("too many failed logins")]
        return [Send(reply), *self._run()]

    # --- reading -------------------------------------------------------------------------------

    def _run(self) -> list[Event]:
        """Handle buffered input for as long as the current state reads and bytes suffice."""
        out: list[Event] = []
        while (step := _STEPS.get(self.state)) is not None:
            try:
                if not step(self, out):
                    break
            except LineTooLong:
                out += self._error_events(ProtocolError(LINE_TOO_LONG, close=True))
            except ProtocolError as exc:
                out += self._error_events(exc)
        return out

    def _error_events(self, exc: ProtocolError) -> list[Event]:
        """The one place a ProtocolError becomes wire text, a spent error and perhaps a close."""
        nonsync = self._nonsync
        self._reset()
        reply, close = exc.reply, exc.close
        if isinstance(exc, BadCommand) and not close:
            self._errors += 1
            if self._errors >= self._policy.max_errors:
                reply, close = reply + TOO_MANY, True
            elif nonsync:  # the client sends the literal anyway: we no longer know where we are
                reply, close = reply + NONSYNC_FATAL, True
        if not close:
            return [Send(reply)]
        self._close()
        reason = next((why for bye, why in _CLOSE_REASONS.items() if reply.endswith(bye)), None)
        return [Send(reply), Close(reason or "protocol error")]

    def _fatal(self, reply: bytes) -> list[Event]:
        return self._error_events(ProtocolError(reply, close=True))

    def _reset(self) -> None:
        """Back to reading commands: no command, literal or SASL exchange in progress."""
        self._command.clear()
        self._nonsync = False
        self._sasl = None
        self.state = ImapState.NOT_AUTHENTICATED

    def _close(self) -> None:
        self._reset()
        self._buf.clear()
        self.state = ImapState.CLOSED

    def _hold_limit(self) -> int:
        # What a client may pipeline behind its login: one more command with one literal.
        return self._policy.max_line + self._policy.max_literal

    def _read_command(self, out: list[Event]) -> bool:
        line = self._buf.next_line()
        if line is None:
            return False
        out += self._start(line)
        return True

    def _read_literal(self, out: list[Event]) -> bool:
        command = self._command
        if command.literal is not None:
            chunk = self._buf.take(command.literal)
            if chunk is None:
                return False
            command.add_literal(chunk)
            return True
        line = self._buf.next_line()
        if line is None:
            return False
        try:
            header = command.add_line(line)
        except wire.CommandTooLong:
            raise ProtocolError(LINE_TOO_LONG, close=True) from None
        out += self._dispatch(command.take()) if header is None else self._announce(header)
        return True

    def _read_sasl(self, out: list[Event]) -> bool:
        line = self._buf.next_line()
        if line is None:
            return False
        try:
            response = wire.sasl_response(line)
        except wire.WireError as exc:
            raise BadCommand(self._tag + b" BAD " + exc.text + CRLF) from None
        if isinstance(response, wire.SaslCancel):
            self._reset()
            out.append(Send(self._tag + CANCELLED))
        else:
            out += self._sasl_step(response)
        return True

    def _start(self, line: bytes) -> list[Event]:
        """A new command: check its tag and name before any literal is asked for."""
        self._tag = b""
        if not line:  # a stray CRLF: not worth a BYE, not yet a first command
            raise BadCommand(EMPTY)
        header = wire.literal_header(line)
        self._nonsync = header is not None and not header.sync
        first, self._seen_command = not self._seen_command, True
        reader = wire.Reader(line)
        try:
            self._tag = reader.tag()
            reader.sp()
            verb = reader.atom().decode("ascii").upper()
        except wire.WireError:
            if first:
                raise ProtocolError(NOT_IMAP, close=True) from None
            raise BadCommand(MISSING if self._tag else BAD_TAG) from None
        if verb not in PRE_AUTH_COMMANDS:
            if verb in POST_AUTH_COMMANDS:
                raise BadCommand(self._tag + NOT_ALLOWED)
            if first:
                raise ProtocolError(NOT_IMAP, close=True)
            raise BadCommand(self._tag + UNKNOWN)
        self._verb, self._args_at = verb, reader.pos
        if header is None:
            return self._dispatch(line)
        if verb not in LITERAL_COMMANDS:
            raise BadCommand(self._tag + SYNTAX)
        if header.sync and verb == "LOGIN":
            self._check_login()  # refuse before the client sends its password
        self._command.start(line)
        return self._announce(header)

    def _announce(self, header: wire.LiteralHeader) -> list[Event]:
        """Accept a literal only if it fits, before a single byte of it is buffered."""
        try:
            self._command.announce(header)
        except wire.LiteralTooLarge:
            if header.sync:  # the client waits for "+" and sends nothing more of this command
                raise BadCommand(self._tag + LITERAL_TOO_LARGE) from None
            raise ProtocolError(LITERAL_FATAL, close=True) from None  # it sends them regardless
        self._nonsync = self._nonsync or not header.sync
        self.state = ImapState.AWAIT_LITERAL
        return [Send(CONTINUE)] if header.sync else []

    def _dispatch(self, command: bytes) -> list[Event]:
        reader = wire.Reader(command, self._args_at)
        self.state = ImapState.NOT_AUTHENTICATED
        try:
            return _COMMANDS[self._verb](self, self._tag, reader)
        except wire.WireError as exc:
            raise BadCommand(self._tag + b" BAD " + exc.text + CRLF) from None

    # --- commands ------------------------------------------------------------------------------

    def _capability(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.end()
        caps = _capabilities(self._policy, self._tls)
        return [Send(b"* CAPABILITY " + caps + CRLF + tag + b" OK CAPABILITY completed\r\n")]

    def _noop(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.end()
        return [Send(tag + b" OK NOOP completed\r\n")]

    def _logout(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.end()
        self._close()
        return [Send(LOGOUT_BYE + tag + b" OK LOGOUT completed\r\n"), Close("logout")]

    def _starttls(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.end()
        if self._tls:
            raise BadCommand(tag + TLS_ACTIVE)
        if not self._policy.starttls:
            raise BadCommand(tag + NO_STARTTLS)
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = ImapState.TLS_PENDING
        return [Send(tag + b" OK Begin TLS negotiation now\r\n"), StartTLS()]

    def _id(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.sp()
        args.id_params_list()  # parsed for its syntax only: nothing the client says is kept
        args.end()
        return [Send(ID_REPLY + tag + b" OK ID completed\r\n")]

    def _login(self, tag: bytes, args: wire.Reader) -> list[Event]:
        self._check_login()
        args.sp()
        user = args.astring()
        args.sp()
        password = args.astring()
        args.end()
        if not user:
            raise BadCommand(tag + BAD_CREDENTIALS)
        secret = Secret(self._field(password))
        return self._authenticate(Credentials(Method.PLAIN, self._field(user), secret))

    def _authenticate_cmd(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.sp()
        mechanism = args.auth_type()
        if self._cleartext_refused():
            raise ProtocolError(tag + PRIVACY)
        if mechanism not in _sasl_mechanisms(self._policy):
            raise ProtocolError(tag + BAD_MECH)
        response = None
        if not args.at_end():
            args.sp()
            response = args.initial_response()
        args.end()
        self._sasl = new_server(mechanism, self._salt)
        return self._sasl_step(response)

    # --- helpers -------------------------------------------------------------------------------

    def _cleartext_refused(self) -> bool:
        return self._policy.starttls_only and not self._tls

    def _check_login(self) -> None:
        if self._cleartext_refused():
            raise ProtocolError(self._tag + PRIVACY)
        if "login" not in self._policy.mechanisms:
            raise ProtocolError(self._tag + LOGIN_DISABLED)

    def _field(self, raw: bytes) -> str:
        """A user name or password, held to the limits sasl.py applies to its fields."""
        if len(raw) > MAX_FIELD or b"\0" in raw or b"\r" in raw or b"\n" in raw:
            raise BadCommand(self._tag + BAD_CREDENTIALS)
        # surrogateescape keeps non-UTF-8 passwords byte-exact for the backend, as sasl.py does.
        return raw.decode("utf-8", "surrogateescape")

    def _sasl_step(self, response: bytes | None) -> list[Event]:
        server = self._sasl
        if server is None:  # unreachable: AWAIT_SASL is only entered with a server
            raise BadCommand(self._tag + BAD_SASL)
        try:
            result = server.step(response)
        except SaslError:
            raise BadCommand(self._tag + BAD_SASL) from None
        if isinstance(result, Challenge):
            self.state = ImapState.AWAIT_SASL
            return [Send(wire.continue_req(result.data))]
        self._sasl = None
        return self._authenticate(result)

    def _authenticate(self, creds: Credentials) -> list[Event]:
        """A complete login: hold everything else until the driver reports the outcome."""
        self._attempts += 1
        self.state = ImapState.AUTHENTICATING
        return [Authenticate(dataclasses.replace(creds, attempt=self._attempts))]


_COMMANDS: dict[str, Callable[[ImapCore, bytes, wire.Reader], list[Event]]] = {
    "CAPABILITY": ImapCore._capability,
    "NOOP": ImapCore._noop,
    "LOGOUT": ImapCore._logout,
    "STARTTLS": ImapCore._starttls,
    "ID": ImapCore._id,
    "LOGIN": ImapCore._login,
    "AUTHENTICATE": ImapCore._authenticate_cmd,
}

# What each reading state consumes; the others hold (AUTHENTICATING), drop (TLS_PENDING, CLOSED)
# or hand over (LOGGED_IN) what arrives.
_STEPS: dict[ImapState, Callable[[ImapCore, list[Event]], bool]] = {
    ImapState.NOT_AUTHENTICATED: ImapCore._read_command,
    ImapState.AWAIT_LITERAL: ImapCore._read_literal,
    ImapState.AWAIT_SASL: ImapCore._read_sasl,
}


@functools.lru_cache(maxsize=64)  # a few listeners x (TLS active or not)
def _capabilities(policy: PreAuthPolicy, tls: bool) -> bytes:
    caps = ["IMAP4rev1"]
    seen = {cap.upper() for cap in caps}
    for cap in policy.capabilities:
        upper = cap.upper()
        if upper in seen or upper in _CORE_CAPS or upper.startswith("AUTH="):
            continue  # the core decides these from the policy's switches
        if cap.isascii() and wire.is_atom(cap.encode("ascii")):
            caps.append(cap)
            seen.add(upper)
    caps += ["LITERAL+", "SASL-IR", "ID"]
    cleartext_refused = policy.starttls_only and not tls
    if policy.starttls and not tls:
        caps.append("STARTTLS")
    if cleartext_refused or "login" not in policy.mechanisms:
        caps.append("LOGINDISABLED")  # RFC 9051 6.2.3: LOGIN would fail
    if not cleartext_refused:
        caps += ["AUTH=" + name for name in _sasl_mechanisms(policy)]
    return " ".join(caps).encode("ascii")


@functools.lru_cache(maxsize=64)
def _sasl_mechanisms(policy: PreAuthPolicy) -> tuple[str, ...]:
    """Enabled SASL mechanisms, wire names, in the policy's order."""
    return tuple(_SASL_NAMES[m] for m in policy.mechanisms if m in _SASL_NAMES)
