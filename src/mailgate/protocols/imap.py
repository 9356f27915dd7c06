"""The IMAP server core before login: RFC 9051 / RFC 3501 (CAPABILITY, NOOP, LOGOUT, STARTTLS,
LOGIN, AUTHENTICATE), RFC 7888 LITERAL+, RFC 4959 SASL-IR and RFC 2971 ID.

Built on the skeleton in `core.py` (the read loop, the error budget, SASL, the login and TLS
rules); this module holds IMAP's grammar use (tags, literals), its words and one method per
command. The grammar itself lives in `imapwire`. No reply repeats anything the client sent
except its tag, so credentials are never echoed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

from mailgate.protocols import claims
from mailgate.protocols import imapwire as wire
from mailgate.protocols.core import PreAuthCore, State
from mailgate.protocols.events import (
    BadCommand,
    Close,
    Event,
    LoggedIn,
    ProtocolError,
    Rejected,
    Send,
    StartTLS,
)
from mailgate.protocols.lines import LineTooLong
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import MAX_FIELD
from mailgate.values import CloseReason, Credentials, Method, Secret

# --- legal commands ----------------------------------------------------------------------------

# The not-authenticated state (RFC 9051 6.1 and 6.2, RFC 2971 ID): the commands read in
# State.COMMAND; State.LITERAL reads a command's literal bytes and lines, State.SASL responses.
PRE_AUTH_COMMANDS = frozenset(
    {"CAPABILITY", "NOOP", "LOGOUT", "STARTTLS", "ID", "LOGIN", "AUTHENTICATE"}
)
# The only commands with string arguments before login; a literal elsewhere is a syntax error.
LITERAL_COMMANDS = frozenset({"LOGIN", "ID"})
# Real IMAP commands of the later states (RFC 9051 6.3, 6.4 and common extensions): refused with
# a reply that says why rather than "unknown".
POST_AUTH_COMMANDS = frozenset(
    {"SELECT", "EXAMINE", "CREATE", "DELETE", "RENAME", "SUBSCRIBE", "UNSUBSCRIBE", "LIST", "LSUB"}
    | {"NAMESPACE", "STATUS", "APPEND", "IDLE", "CHECK", "CLOSE", "UNSELECT", "EXPUNGE", "SEARCH"}
    | {"FETCH", "STORE", "COPY", "MOVE", "UID", "ENABLE", "UNAUTHENTICATE", "XLIST", "GETQUOTA"}
    | {"GETQUOTAROOT", "SETQUOTA", "GETACL", "SETACL", "DELETEACL", "MYRIGHTS", "LISTRIGHTS"}
    | {"GETMETADATA", "SETMETADATA", "SORT", "THREAD", "COMPRESS", "NOTIFY", "LANGUAGE", "REPLACE"}
)
# Config names of the SASL mechanisms and their wire names. "login" enables both the LOGIN
# command and AUTHENTICATE LOGIN (nginx advertises AUTH=LOGIN for it).
_SASL_NAMES = {
    "plain": "PLAIN",
    "login": "LOGIN",
    "cram-md5": "CRAM-MD5",
    "xoauth2": "XOAUTH2",
    "oauthbearer": "OAUTHBEARER",
}
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
FOREIGN = b"* BYE This is an IMAP server\r\n"  # to HTTP, SMTP or TLS bytes (ALPACA)
LINE_TOO_LONG = b"* BYE Line too long\r\n"
LITERAL_FATAL = b"* BYE Literal too large\r\n"
NONSYNC_FATAL = b"* BYE Syntax error after a non-synchronising literal\r\n"
TOO_MANY = b"* BYE Too many invalid commands\r\n"
TOO_MANY_FAILURES = b"* BYE Too many failed logins\r\n"
FLOODED = b"* BYE Too much input while logging in\r\n"
LOGOUT_BYE = b"* BYE Logging out\r\n"
ID_REPLY = b"* ID NIL\r\n"
# Dovecot's hop counter in an ID from a proxy in front (login-proxy.c): the hops still left.
PROXY_TTL_KEY = b"x-proxy-ttl"
# Tagged replies: the client's tag goes before each.
UNKNOWN = b" BAD Unknown command\r\n"
BAD_VERB = b" BAD Missing or malformed command\r\n"
NOT_ALLOWED = b" BAD Command not allowed before login\r\n"
SYNTAX = b" BAD Syntax error\r\n"
LITERAL_TOO_LARGE = b" BAD Literal too large\r\n"
BAD_CREDENTIALS = b" BAD Invalid characters or length in user name or password\r\n"
BAD_SASL = b" BAD Malformed authentication response\r\n"
BAD_BASE64 = b" BAD Invalid base64 data\r\n"
CANCELLED = b" BAD Authentication cancelled\r\n"
TLS_ACTIVE = b" BAD TLS is already active\r\n"
NO_STARTTLS = b" BAD STARTTLS is not available\r\n"
PRIVACY = b" NO [PRIVACYREQUIRED] Plaintext authentication disallowed on non-secure connection\r\n"
LOGIN_DISABLED = b" NO [CANNOT] LOGIN is disabled\r\n"
BAD_MECH = b" NO [CANNOT] Unsupported authentication mechanism\r\n"
AUTH_FAILED = b" NO [AUTHENTICATIONFAILED] "
TEMP_FAIL = b" NO [UNAVAILABLE] Service temporarily unavailable, try again later\r\n"
LIMITED = b" NO [LIMIT] Too many sessions, try again later\r\n"  # RFC 5530
DEFAULT_REASON = "Authentication failed."


class ImapCore(PreAuthCore):
    __slots__ = ("_args_at", "_assembler", "_nonsync", "_proxy_ttl", "_tag", "_verb")

    LINE_TOO_LONG = LINE_TOO_LONG
    FLOODED = FLOODED
    FOREIGN = FOREIGN
    TOO_MANY_FAILURES = TOO_MANY_FAILURES

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        super().__init__(policy, salt)
        self._tag = b""  # tag of the command in progress (its literals, SASL, login)
        self._verb = ""
        self._args_at = 0  # where the arguments start in the command's first line
        max_command = policy.max_line + _LITERALS_PER_COMMAND * policy.max_literal
        self._assembler = wire.CommandAssembler(policy.max_literal, max_command)
        self._nonsync = False  # the command announced a {n+} literal: its errors are fatal
        self._proxy_ttl: int | None = None  # a proxy in front said x-proxy-ttl in its ID

    def greet(self) -> list[Event]:
        caps = _capabilities(self._policy, self._tls)
        text = wire.text(self._policy.greeting, len(self._policy.greeting)) or b"IMAP4rev1 ready"
        return [Send(b"* OK [CAPABILITY " + caps + b"] " + text + CRLF)]

    # --- the skeleton's hooks ------------------------------------------------------------------

    def _step(self) -> list[Event] | None:
        while True:
            events = self._read_literal() if self.state is State.LITERAL else super()._step()
            # A non-synchronising literal announced or read says nothing: read on.
            if events is None or events or self.state is not State.LITERAL:
                return events

    def _too_many_errors(self, reply: bytes) -> bytes:
        return reply + TOO_MANY

    def _after_bad_command(self) -> tuple[bytes, CloseReason | None]:
        if self._nonsync:  # the client sends the literal anyway: we no longer know where we are
            return NONSYNC_FATAL, CloseReason.NONSYNC_ERROR
        return b"", None

    def _reset(self) -> None:
        self._assembler.clear()
        self._nonsync = False
        super()._reset()

    def _challenge(self, data: bytes) -> bytes:
        return wire.continue_req(data)

    def _bad_sasl(self) -> BadCommand:
        return BadCommand(self._tag + BAD_SASL)

    def _bad_base64(self) -> BadCommand:
        return BadCommand(self._tag + BAD_BASE64)

    def _cancelled(self) -> BadCommand:
        return BadCommand(self._tag + CANCELLED)

    def _success_reply(self, outcome: LoggedIn) -> bytes:
        return self._tag + b" " + outcome.backend_reply.rstrip(b"\r\n") + CRLF

    def _rejected_reply(self, outcome: Rejected) -> bytes:
        text = wire.text(outcome.message, MAX_REASON) or DEFAULT_REASON.encode("ascii")
        return self._tag + AUTH_FAILED + text + CRLF

    def _unavailable_reply(self) -> bytes:
        return self._tag + TEMP_FAIL

    def _limited_reply(self) -> bytes:
        return self._tag + LIMITED

    # --- reading -------------------------------------------------------------------------------

    def _read_literal(self) -> list[Event] | None:
        command = self._assembler
        if command.literal is not None:
            chunk = self._buf.take(command.literal)
            if chunk is None:
                return None
            command.add_literal(chunk)
            return []
        line = self._buf.next_line()
        if line is None:
            return None
        try:
            header = command.add_line(line)
        except wire.CommandTooLong:
            raise LineTooLong from None
        return self._dispatch(command.take()) if header is None else self._announce(header)

    def _command(self, line: bytes) -> list[Event]:
        """A new command: check its tag and name before any literal is asked for."""
        self._tag = b""
        if not line:  # a stray CRLF
            raise BadCommand(EMPTY)
        header = wire.literal_header(line)
        self._nonsync = header is not None and not header.sync
        reader = wire.Reader(line)
        try:
            tag = reader.tag()
            reader.sp()
        except wire.WireError:
            # No "tag SP": perhaps a SASL response sent without waiting for "+", whose "tag"
            # may be a credential, so it is not echoed.
            raise BadCommand(MISSING if reader.pos else BAD_TAG) from None
        self._tag = tag
        try:
            verb = reader.atom().decode("ascii").upper()
        except wire.WireError:
            raise BadCommand(tag + BAD_VERB) from None
        if verb not in PRE_AUTH_COMMANDS:
            raise BadCommand(self._tag + (NOT_ALLOWED if verb in POST_AUTH_COMMANDS else UNKNOWN))
        self._verb, self._args_at = verb, reader.pos
        if header is None:
            return self._dispatch(line)
        if verb not in LITERAL_COMMANDS:
            raise BadCommand(self._tag + SYNTAX)
        if header.sync and verb == "LOGIN":
            self._check_login()  # refuse before the client sends its password
        self._assembler.start(line)
        return self._announce(header)

    def _announce(self, header: wire.LiteralHeader) -> list[Event]:
        """Accept a literal only if it fits, before a single byte of it is buffered."""
        try:
            self._assembler.announce(header)
        except wire.LiteralTooLarge:
            if header.sync:  # the client waits for "+" and sends nothing more of this command
                raise BadCommand(self._tag + LITERAL_TOO_LARGE) from None
            # It sends the bytes regardless: we can no longer tell where its next command starts.
            raise ProtocolError(LITERAL_FATAL, close=CloseReason.LITERAL_TOO_LARGE) from None
        self._nonsync = self._nonsync or not header.sync
        self.state = State.LITERAL
        return [Send(CONTINUE)] if header.sync else []

    def _dispatch(self, command: bytes) -> list[Event]:
        reader = wire.Reader(command, self._args_at)
        self.state = State.COMMAND
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
        return [Send(LOGOUT_BYE + tag + b" OK LOGOUT completed\r\n"), Close(CloseReason.LOGOUT)]

    def _starttls(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.end()
        if self._tls:
            raise BadCommand(tag + TLS_ACTIVE)
        if not self._policy.starttls:
            raise BadCommand(tag + NO_STARTTLS)
        self._buf.clear()  # pipelined plaintext must not be read as if it came over TLS
        self.state = State.TLS_PENDING
        return [Send(tag + b" OK Begin TLS negotiation now\r\n"), StartTLS()]

    def _id(self, tag: bytes, args: wire.Reader) -> list[Event]:
        args.sp()
        params = args.id_params_list()  # the hop counter and an address claim are used
        args.end()
        ttl = next((v for k, v in params or () if k.lower() == PROXY_TTL_KEY), None)
        if ttl is not None and ttl.isdigit() and len(ttl) <= 3:
            self._proxy_ttl = int(ttl)
        if not self._policy.trusted:
            self.claim_ignored |= claims.names_address(params)
        else:
            self.claim = claims.from_id(params) or self.claim
        return [Send(ID_REPLY + tag + b" OK ID completed\r\n")]

    def _authenticate(self, creds: Credentials) -> list[Event]:
        if self._proxy_ttl is not None:
            creds = dataclasses.replace(creds, proxy_ttl=self._proxy_ttl)
        return super()._authenticate(creds)

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
        if not self._cleartext_ok():
            raise BadCommand(tag + PRIVACY)
        if mechanism not in _sasl_mechanisms(self._policy):
            raise BadCommand(tag + BAD_MECH)
        response = None
        if not args.at_end():
            args.sp()
            response = b"" if args.at_end() else args.initial_response()
        args.end()
        return self._start_sasl(mechanism, response)

    # --- helpers -------------------------------------------------------------------------------

    def _check_login(self) -> None:
        if not self._cleartext_ok():
            raise BadCommand(self._tag + PRIVACY)
        if "login" not in self._policy.mechanisms:
            raise BadCommand(self._tag + LOGIN_DISABLED)

    def _field(self, raw: bytes) -> str:
        """A user name or password, held to the limits sasl.py applies to its fields."""
        if len(raw) > MAX_FIELD or b"\0" in raw or b"\r" in raw or b"\n" in raw:
            raise BadCommand(self._tag + BAD_CREDENTIALS)
        # surrogateescape keeps non-UTF-8 passwords byte-exact for the backend, as sasl.py does.
        return raw.decode("utf-8", "surrogateescape")


_COMMANDS: dict[str, Callable[[ImapCore, bytes, wire.Reader], list[Event]]] = {
    "CAPABILITY": ImapCore._capability,
    "NOOP": ImapCore._noop,
    "LOGOUT": ImapCore._logout,
    "STARTTLS": ImapCore._starttls,
    "ID": ImapCore._id,
    "LOGIN": ImapCore._login,
    "AUTHENTICATE": ImapCore._authenticate_cmd,
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
