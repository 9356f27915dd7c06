"""The values every stage of a session hands to the next: the ground floor of mailgate.

A protocol core produces `Credentials`; an authenticator turns them and `ClientInfo` into a
`Decision`; the driver logs in where a `Route` says and ends the session with a `CloseReason`.
Everything here is plain data (frozen, slotted dataclasses and enums) and this module imports
nothing else of mailgate, so cores, auth, backend logins and the relay all import downward.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from enum import Enum, StrEnum


class Secret:
    """A password, digest or token that must never be printed.

    `repr` and `str` are redacted so a secret cannot leak through a log line, an f-string or
    an exception message by accident; `reveal()` is the one explicit way to get the value.
    Comparison is constant-time and only through `equals`.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def equals(self, other: Secret | str) -> bool:
        theirs = other.reveal() if isinstance(other, Secret) else other
        return hmac.compare_digest(
            self._value.encode("utf-8", "surrogateescape"),
            theirs.encode("utf-8", "surrogateescape"),
        )

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:  # never let a secret be pickled into a dump
        raise TypeError("Secret cannot be pickled")


class Method(StrEnum):
    """How the client proved who it is. Values are what we log."""

    PLAIN = "plain"  # IMAP LOGIN, AUTHENTICATE PLAIN, POP3 USER/PASS, SMTP AUTH PLAIN
    LOGIN = "login"  # SASL LOGIN: nginx reports it as "plain" to auth_http
    CRAM_MD5 = "cram-md5"  # secret is the client's hex digest, salt the challenge
    APOP = "apop"  # secret is the client's hex digest, salt the greeting timestamp
    NONE = "none"  # SMTP relay without AUTH: the envelope decides
    # OAuth 2.0 bearer tokens: secret is the token. XOAUTH2 is Google's SASL mechanism (user
    # from `user=`); OAUTHBEARER is RFC 7628's (user from the GS2 authzid, "" without one).
    # auth_http gets them as "xoauth2" / "oauthbearer": a mailgate extension of nginx's protocol.
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"

    @property
    def auth_http_name(self) -> str:
        """The Auth-Method value nginx sends for this method."""
        return "plain" if self is Method.LOGIN else self.value

    @property
    def is_oauth(self) -> bool:
        """The secret is a bearer token, not a password or a digest of one."""
        return self is Method.XOAUTH2 or self is Method.OAUTHBEARER


@dataclass(frozen=True, slots=True)
class Credentials:
    method: Method
    user: str
    secret: Secret
    salt: str | None = None  # CRAM-MD5 challenge / APOP timestamp, angle brackets included
    attempt: int = 1  # Auth-Login-Attempt: numbered by the protocol core, 1 for the first
    # SMTP: the client's HELO name (every login), and for "auth none" (relay) the whole
    # MAIL FROM and RCPT TO command lines, as nginx sends them and the backend replays them.
    smtp_helo: str | None = None
    smtp_from: str | None = None
    smtp_to: str | None = None
    # IMAP: the hops left that a proxy in front said in its ID ("x-proxy-ttl", Dovecot's
    # loop marker); None when none was said.
    proxy_ttl: int | None = None

    @property
    def envelope(self) -> tuple[bytes, ...]:
        """The relay envelope a backend login replays: MAIL FROM, then RCPT TO."""
        lines = (self.smtp_from, self.smtp_to)
        return tuple(line.encode("utf-8") for line in lines if line)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    protocol: str  # e.g. "TLSv1.3"
    cipher: str  # e.g. "TLS_AES_256_GCM_SHA384"
    # Client certificate facts, sent only when auth_http.pass_client_cert is on.
    client_verify: str = "NONE"  # "SUCCESS" | "FAILED" | "NONE", as nginx's Auth-SSL-Verify
    client_subject: str | None = None
    client_issuer: str | None = None
    client_serial: str | None = None
    client_fingerprint: str | None = None  # SHA-1, hex
    client_cert_pem: str | None = None


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The client's connection: who it is, where it came in, whether it is encrypted."""

    ip: str
    port: int
    protocol: str  # "imap" | "pop3" | "smtp"
    local_ip: str = ""
    local_port: int = 0
    tls: TlsInfo | None = None
    host: str | None = None  # reverse DNS name; None when not resolved
    # The trusted peer (trusted_networks) that named `ip` for the client it logs in for
    # (IMAP ID x-originating-ip, XCLIENT); None when `ip` is the connection's own.
    via: str | None = None


class BackendTLS(StrEnum):
    NONE = "none"
    STARTTLS = "starttls"
    IMPLICIT = "implicit"


class BackendAuth(StrEnum):
    """How the backend login proves who the user is, i.e. what `Route.secret` holds."""

    PASSWORD = "password"  # the user's own password: LOGIN, USER/PASS, AUTH PLAIN
    # A master user: `Route.user` is already "user*master" and the secret the master password;
    # on the wire the same as PASSWORD, kept apart for the log line.
    MASTER = "master"
    # The client's OAuth bearer token, passed on for the backend to validate (Dovecot's
    # oauth2 passdb) with this SASL mechanism, initial response included.
    XOAUTH2 = "xoauth2"
    OAUTHBEARER = "oauthbearer"

    @property
    def is_token(self) -> bool:
        return self is BackendAuth.XOAUTH2 or self is BackendAuth.OAUTHBEARER


@dataclass(frozen=True, slots=True)
class Route:
    """Log in to `host:port` as `user` with `secret` (already in master-user form if any)."""

    host: str
    port: int
    user: str
    secret: Secret
    tls: BackendTLS | None = None  # None: use the [backend] setting
    mailstore: str | None = None  # a name for logs and metrics
    smtp_mode: str | None = None  # "xclient" | "auth"; None: use the [backend] setting
    # The user the authenticator matched, as it stores the name (normalised): what counters
    # key on (a database may match "Victim@Example.com " to "victim@example.com").
    # Metadata, not part of the decision's value: it never reaches the client or the backend.
    identity: str | None = field(default=None, compare=False)
    # A [[pool]] that chooses the member (a directory mailstore's `pool`); None: host:port
    # (which may still be a pool member, or a pool's name).
    pool: str | None = None
    backend_auth: BackendAuth = BackendAuth.PASSWORD
    # Which of the user's credentials matched, for the log line (`app_password=<label>`):
    # the label of an app password, never the secret; None for the main password or a token.
    credential_label: str | None = None

    def with_secret(self, secret: Secret) -> Route:
        """This route with another secret (the route cache keeps none): dataclasses.replace,
        by hand, because a cache hit does it on every login and replace() costs a getattr
        per field. tests/unit/test_values.py checks that it keeps every field."""
        return Route(
            self.host,
            self.port,
            self.user,
            secret,
            self.tls,
            self.mailstore,
            self.smtp_mode,
            self.identity,
            self.pool,
            self.backend_auth,
            self.credential_label,
        )


@dataclass(frozen=True, slots=True)
class TokenChallenge:
    """What the error challenge to a refused OAuth token names (RFC 7628 3.2.2): the scope a
    token needs and the issuer's OpenID configuration URL, both optional. The protocol core
    sends it (protocols/sasl.py `error_challenge` writes the JSON)."""

    scope: str | None = None
    openid_configuration: str | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    """Wrong credentials (or a policy refusal). The client may try again after `wait` seconds."""

    message: str = "Authentication failed."
    wait: float = 0.0
    error_code: str | None = None  # SMTP Auth-Error-Code, e.g. "535 5.7.8"
    # As Route.identity: the stored user a wrong password (or a disabled user) was checked
    # against; None for an unknown user or a refused name. Never shown to the client.
    identity: str | None = field(default=None, compare=False)
    # For an XOAUTH2 / OAUTHBEARER login: what its error challenge says ([oauth] scope and
    # issuer); None: a bare one. Metadata as `identity`: a refusal is a refusal.
    token_challenge: TokenChallenge | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class TempFail:
    """The answer could not be had (outage, timeout, garbage). Never shown as a bad password."""

    reason: str  # for the log only, never for the client
    wait: float = 0.0


Decision = Route | Reject | TempFail


class CloseReason(Enum):
    """Why a session ended: the `outcome` of its log line and of the sessions metric."""

    # The client ended it.
    EOF = "eof"  # closed before logging in
    LOGOUT = "logout"  # LOGOUT / QUIT before logging in
    CLIENT_CLOSED = "client closed"  # after logging in
    CONNECTION_ERROR = "connection error"  # reset, or a broken TLS record
    # mailgate ended it before login.
    TIMEOUT = "timeout"  # a read, a write or the whole login phase took too long
    TOO_MANY_ERRORS = "too many invalid commands"
    TOO_MANY_FAILURES = "too many failed logins"
    LINE_TOO_LONG = "line too long"
    LITERAL_TOO_LARGE = "literal too large"
    NONSYNC_ERROR = "syntax error after non-synchronising literal"
    FLOODED = "pipelining overflow"
    EARLY_TALKER = "talked before the greeting"
    # Input that is plainly another protocol (the ALPACA class): closed at once.
    FOREIGN_HTTP = "not mail: http request"
    FOREIGN_SMTP = "not mail: smtp client"
    FOREIGN_TLS = "not mail: tls on a plaintext port"
    # Limits at accept or before login.
    BUSY = "max_sessions reached"
    HANDSHAKE_LIMIT = "too many tls handshakes"
    HANDSHAKE_FAILED = "tls handshake failed"
    SESSION_LIMIT = "session limit"  # per_user, per_user_ip or per_ip (SMTP's 421)
    # After login.
    BACKEND_CLOSED = "backend closed"  # the backend said goodbye (LOGOUT, QUIT, 221)
    BACKEND_LOST = "backend lost"  # the backend went away without the protocol's goodbye
    IDLE_TIMEOUT = "idle timeout"
    KICKED = "kicked"  # an operator ended it (mailgate kick, a user move)
    # mailgate itself.
    SHUTDOWN = "shutdown"
    INTERNAL_ERROR = "internal error"


@dataclass(frozen=True, slots=True)
class Goodbyes:
    """What a protocol says when mailgate, not the client, ends a session (`* BYE ...`,
    `-ERR ...`, `421 ...`), one line each with its CRLF."""

    idle: bytes  # the session was idle too long (before or after login)
    shutdown: bytes  # mailgate is stopping
    backend_lost: bytes  # the backend closed without the protocol's goodbye
    unavailable: bytes  # the session cannot go on (internal error): a temporary failure
    busy: bytes  # a limit refuses the session at accept: try again later
    kicked: bytes  # an operator ended the session (mailgate kick, a user move)
