"""The skeleton every pre-auth server core is built on: IMAP, POP3 and SMTP differ only in their
grammar, their commands and their words.

What lives here, once (nginx keeps it in ngx_mail_read_command and ngx_mail_auth_*):
- the read loop: `feed` buffers bytes, `next_events` handles at most ONE command, so a driver can
  stop reading while its replies are not yet written (nginx's `s->blocked`);
- the error budget: every refused command spends one error from `max_errors`, and the session
  ends when it is spent; every ProtocolError becomes wire text in one place (`_error_events`);
- input that is plainly another protocol (an HTTP request, a TLS ClientHello on a plaintext
  port, an SMTP greeting exchange on IMAP or POP3: the ALPACA class) ends the session at once;
- the SASL exchange (challenge, response, cancel) for every mechanism, with an empty initial
  response treated as none;
- the login: numbering attempts, holding pipelined input (bounded by `max_pipelined`) while the
  driver decides, counting every failed attempt (temporary ones too) against
  `max_auth_attempts`, and handing over `trailing` bytes at success;
- an OAuth refusal (RFC 7628 3.2.2): the error challenge the outcome carries, the client's one
  dummy response (any line), then the failure reply, counted as one failed login;
- TLS: plaintext behind STARTTLS is never parsed, and the buffer is emptied at the upgrade.

Sans-I/O: nothing here touches a socket or a clock.
"""

from __future__ import annotations

import binascii
import dataclasses
import re
from enum import Enum
from typing import ClassVar

from mailgate.protocols.claims import AddressClaim
from mailgate.protocols.events import (
    Authenticate,
    BadCommand,
    Close,
    Event,
    Limited,
    LoggedIn,
    LoginOutcome,
    ProtocolError,
    Rejected,
    Send,
)
from mailgate.protocols.lines import LineBuffer, LineTooLong
from mailgate.protocols.policy import PreAuthPolicy
from mailgate.protocols.sasl import Challenge, SaslError, SaslServer, new_server
from mailgate.values import CloseReason, Credentials


class State(Enum):
    COMMAND = "command"  # reading command lines
    LITERAL = "literal"  # IMAP: inside a command with literals (their bytes, then the line)
    SASL = "sasl"  # a challenge was sent: a response line is expected
    TLS_PENDING = "tls-pending"  # the STARTTLS reply was sent, the driver does the handshake
    AUTHENTICATING = "authenticating"  # Authenticate was emitted, waiting for finish_login
    LOGGED_IN = "logged-in"  # the relay takes over; `trailing` holds pipelined bytes
    CLOSED = "closed"

    # Members are singletons: hash them by identity, in C (Enum's own __hash__ is Python
    # code, and states are dict keys and set members on every byte the cores read).
    __hash__ = object.__hash__


# States in which buffered input is parsed; in the others it is held (AUTHENTICATING), dropped
# (TLS_PENDING, CLOSED) or handed to the relay (LOGGED_IN).
READING = frozenset({State.COMMAND, State.LITERAL, State.SASL})

# An HTTP request line: what a browser tricked into talking to a mail port sends (ALPACA).
_HTTP = re.compile(rb"(?:GET|POST|PUT|HEAD|DELETE|OPTIONS|CONNECT|PATCH|TRACE) \S+ HTTP/\d")
# A TLS record header, content type handshake: a ClientHello on a plaintext port.
_TLS_HANDSHAKE = 0x16


class PreAuthCore:
    """The common machinery; a protocol supplies its words (class attributes) and commands."""

    __slots__ = (
        "_attempts",
        "_buf",
        "_eof",
        "_errors",
        "_failures",
        "_first_byte",
        "_policy",
        "_refusal",
        "_salt",
        "_sasl",
        "_tls",
        "claim",
        "claim_ignored",
        "state",
        "trailing",
    )

    # --- what each protocol says (set by the subclasses) --------------------------------------

    # Fatal replies; the session ends after them.
    LINE_TOO_LONG: ClassVar[bytes]
    FLOODED: ClassVar[bytes]
    FOREIGN: ClassVar[bytes]  # to input that is another protocol
    # Added to the last failure reply when max_auth_attempts is reached (b"": nothing more).
    TOO_MANY_FAILURES: ClassVar[bytes] = b""
    # A session limit's refusal ends the session (SMTP's 421) rather than inviting a retry.
    LIMIT_CLOSES: ClassVar[bool] = False
    # A line that starts with one of these words is an SMTP client on the wrong port.
    FOREIGN_VERBS: ClassVar[frozenset[bytes]] = frozenset({b"EHLO", b"HELO"})

    def __init__(self, policy: PreAuthPolicy, salt: str) -> None:
        self._policy = policy
        self._salt = salt  # CRAM-MD5 challenge / APOP timestamp, "<...@host>"
        self._buf = LineBuffer(policy.line_limit)  # room for a bearer token when one is on
        self._tls = policy.tls_active
        self._sasl: SaslServer | None = None
        self._refusal: Rejected | None = None  # sent after the dummy response to a challenge
        self._errors = 0  # refused commands so far, against policy.max_errors
        self._attempts = 0  # Authenticate events so far: the attempt number nginx sends
        self._failures = 0  # logins that did not succeed, against policy.max_auth_attempts
        self._eof = False
        self._first_byte: int | None = None
        self.state = State.COMMAND
        self.trailing = b""  # set at login: bytes pipelined behind the login command
        # The real client's address as a trusted peer claims it (claims.py); the driver uses
        # it from the next login on. A claim from elsewhere is dropped and only noted.
        self.claim: AddressClaim | None = None
        self.claim_ignored = False

    # --- the driver's surface --------------------------------------------------------------

    def greet(self) -> list[Event]:
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        """Take bytes from the client; b"" means it closed its side."""
        if self.state is State.CLOSED or self.state is State.LOGGED_IN:
            return  # after login the relay owns the connection
        if not data:
            self._eof = True
            return
        if self._first_byte is None:
            self._first_byte = data[0]
        if self.state is State.TLS_PENDING:
            return  # plaintext behind STARTTLS is never parsed (CVE-2011-0411)
        self._buf.feed(data)

    def next_events(self) -> list[Event]:
        """The events of the next buffered command; [] when more bytes are needed (or none are
        read in this state). One command at a time, so the driver can apply back-pressure."""
        state = self.state
        if state is State.CLOSED:
            return []
        if self._first_byte == _TLS_HANDSHAKE and not self._tls:
            return self._fatal(self.FOREIGN, CloseReason.FOREIGN_TLS)
        if state in READING:
            try:
                events = self._step()
            except LineTooLong:
                return self._fatal(self.LINE_TOO_LONG, CloseReason.LINE_TOO_LONG)
            except ProtocolError as exc:
                return self._error_events(exc)
            if events is not None:
                return events
        elif state is State.AUTHENTICATING and len(self._buf) > self._policy.max_pipelined:
            return self._fatal(self.FLOODED, CloseReason.FLOODED)
        if self._eof and state is not State.LOGGED_IN:
            self._close()
            return [Close(CloseReason.EOF)]
        return []

    def receive(self, data: bytes) -> list[Event]:
        """`feed` and every event that follows (for tests and simple drivers)."""
        self.feed(data)
        return self.drain()

    def drain(self) -> list[Event]:
        """Every event the buffered input gives, command after command."""
        events: list[Event] = []
        while more := self.next_events():
            events += more
        return events

    def tls_started(self) -> list[Event]:
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_started() outside TLS_PENDING")
        self._buf.clear()  # forget everything learnt before the handshake (RFC 2595, 3207)
        self._tls = True
        self.state = State.COMMAND
        self._forget_session()
        return []  # no new greeting: the client asks for capabilities again

    def finish_login(self, outcome: LoginOutcome) -> list[Event]:
        """The reply to the pending login. Pipelined commands come from `next_events`."""
        if self.state is State.CLOSED:
            return []  # the client left while the authenticator was busy
        if self.state is not State.AUTHENTICATING:
            raise RuntimeError("finish_login() outside AUTHENTICATING")
        if isinstance(outcome, LoggedIn):
            self.state = State.LOGGED_IN
            self.trailing = self._buf.take_all()
            return [Send(self._success_reply(outcome))]
        if isinstance(outcome, Rejected) and outcome.challenge is not None:
            # RFC 7628 3.2.2: the error challenge now; the client answers it with a dummy
            # response (`_sasl_line`), and only then comes the failure reply.
            self._refusal = dataclasses.replace(outcome, challenge=None)
            self.state = State.SASL
            return [Send(self._challenge(outcome.challenge))]
        return self._login_refused(outcome)

    def _login_refused(self, outcome: LoginOutcome) -> list[Event]:
        """The failure reply to a login; every failure counts, temporary ones too."""
        self._failures += 1
        if isinstance(outcome, Rejected):
            reply = self._rejected_reply(outcome)
        elif isinstance(outcome, Limited):
            reply = self._limited_reply()
            if self.LIMIT_CLOSES:
                self._close()
                return [Send(reply), Close(CloseReason.SESSION_LIMIT)]
        else:
            reply = self._unavailable_reply()
        self.state = State.COMMAND
        self._login_failed()
        if self._failures >= self._policy.max_auth_attempts:
            self._close()
            return [Send(reply + self.TOO_MANY_FAILURES), Close(CloseReason.TOO_MANY_FAILURES)]
        return [Send(reply)]

    # --- for the protocols -----------------------------------------------------------------

    def _step(self) -> list[Event] | None:
        """Read and handle one command (or SASL response) line; None until one is complete."""
        line = self._buf.next_line()
        if line is None:
            return None
        if self.state is State.SASL:
            return self._sasl_line(line)
        self._check_foreign(line)
        return self._command(line)

    def _command(self, line: bytes) -> list[Event]:
        raise NotImplementedError

    def _check_foreign(self, line: bytes) -> None:
        """End the session at once on input that is plainly another protocol."""
        if _HTTP.match(line):
            raise ProtocolError(self.FOREIGN, close=CloseReason.FOREIGN_HTTP)
        if line.split(b" ", 1)[0].upper() in self.FOREIGN_VERBS:
            raise ProtocolError(self.FOREIGN, close=CloseReason.FOREIGN_SMTP)

    def _error_events(self, exc: ProtocolError) -> list[Event]:
        """The one place a ProtocolError becomes wire text, a spent error and perhaps a close."""
        reply, close = exc.reply, exc.close
        if isinstance(exc, BadCommand) and close is None:
            self._errors += 1
            if self._errors >= self._policy.max_errors:
                reply, close = self._too_many_errors(reply), CloseReason.TOO_MANY_ERRORS
            else:
                extra, close = self._after_bad_command()
                reply += extra
        self._reset()
        if close is None:
            return [Send(reply)]
        self._close()
        return [Send(reply), Close(close)]

    def _fatal(self, reply: bytes, reason: CloseReason) -> list[Event]:
        return self._error_events(ProtocolError(reply, close=reason))

    def _too_many_errors(self, reply: bytes) -> bytes:
        """The reply that spends the last error (the protocol's goodbye after or instead)."""
        raise NotImplementedError

    def _after_bad_command(self) -> tuple[bytes, CloseReason | None]:
        """Whether a refused command still ends the session, and what is said then (IMAP:
        the client sends a non-synchronising literal regardless, so we no longer know where
        its next command starts)."""
        return b"", None

    def _reset(self) -> None:
        """Back to reading commands: no SASL exchange (or literal) in progress."""
        self._sasl = None
        self._refusal = None
        if self.state in READING:
            self.state = State.COMMAND

    def _close(self) -> None:
        self._reset()
        self._buf.clear()
        self.state = State.CLOSED

    def _forget_session(self) -> None:
        """After TLS: forget what the client said before it (EHLO, USER)."""

    def _login_failed(self) -> None:
        """After a failed login: what the protocol keeps or forgets."""

    def _cleartext_ok(self) -> bool:
        return self._tls or not self._policy.starttls_only

    # --- the words of replies ---------------------------------------------------------------

    def _challenge(self, data: bytes) -> bytes:
        raise NotImplementedError

    def _bad_sasl(self) -> BadCommand:
        raise NotImplementedError

    def _bad_base64(self) -> BadCommand:
        """A SASL response that is not base64 (RFC 4954 4 names its own reply for it)."""
        return self._bad_sasl()

    def _cancelled(self) -> BadCommand:
        raise NotImplementedError

    def _success_reply(self, outcome: LoggedIn) -> bytes:
        raise NotImplementedError

    def _rejected_reply(self, outcome: Rejected) -> bytes:
        raise NotImplementedError

    def _unavailable_reply(self) -> bytes:
        raise NotImplementedError

    def _limited_reply(self) -> bytes:
        raise NotImplementedError

    # --- SASL -----------------------------------------------------------------------------

    def _start_sasl(self, mechanism: str, initial: bytes | None) -> list[Event]:
        """AUTHENTICATE / AUTH with `mechanism` (wire name, checked by the caller)."""
        self._sasl = new_server(mechanism, self._salt, self._policy.max_token)
        # An empty initial response ("=" in RFC 4959 and 4954, or nothing after the space, as
        # mutt sends it) gets the mechanism's first challenge, as Dovecot and nginx answer.
        return self._sasl_step(initial or None)

    def _sasl_line(self, line: bytes) -> list[Event]:
        if self._refusal is not None:  # the dummy response to an error challenge: any line
            refusal, self._refusal = self._refusal, None  # ("*" too: the failure follows)
            return self._login_refused(refusal)
        if line == b"*":  # RFC 9051 6.2.2, RFC 5034 4, RFC 4954 4
            raise self._cancelled()
        return self._sasl_step(self._decode(line))

    def _decode(self, data: bytes) -> bytes:
        try:
            return binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            raise self._bad_base64() from None

    def _sasl_step(self, response: bytes | None) -> list[Event]:
        server = self._sasl
        if server is None:  # unreachable: SASL is only entered with a server
            raise self._bad_sasl()
        try:
            result = server.step(response)
        except SaslError:
            raise self._bad_sasl() from None
        if isinstance(result, Challenge):
            self.state = State.SASL
            return [Send(self._challenge(result.data))]
        self._sasl = None
        return self._authenticate(result)

    def _authenticate(self, creds: Credentials) -> list[Event]:
        """A complete login: hold everything else until the driver reports the outcome."""
        self._attempts += 1
        self.state = State.AUTHENTICATING
        if creds.attempt != self._attempts:  # the first attempt is numbered 1 already
            creds = dataclasses.replace(creds, attempt=self._attempts)
        return [Authenticate(creds)]
