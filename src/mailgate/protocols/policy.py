"""What a listener allows before login: the static, per-listener input of every client core."""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.protocols.sasl import MAX_TOKEN, max_oauth_response

# Bytes a client may pipeline behind the command that starts a login while the login is being
# decided (RFC 2920, RFC 2449 PIPELINING, RFC 7888). 64 KiB is a full TCP window without window
# scaling and holds an SMTP relay client's 100 RCPT lines (RFC 5321 4.5.3.1.8) with room to
# spare: a client that sends more without reading our answer is flooding, not pipelining.
MAX_PIPELINED = 64 * 1024
# The longest pre-auth line. Dovecot's imap_max_line_length is 64 KiB, and a pre-login ID
# (RFC 2971 3.3: 30 pairs, values up to 1024 octets) needs about 32 KiB, more with escapes.
# The buffer grows only as a line arrives: an ordinary session never holds more than its line.
MAX_LINE = 64 * 1024
# Mechanisms whose client response carries an OAuth bearer token (config names).
OAUTH_MECHANISMS = frozenset({"xoauth2", "oauthbearer"})
# Room on an AUTHENTICATE / AUTH line besides its base64 response: an IMAP tag (clients use
# a few characters; Dovecot allows a few hundred), the verb and the mechanism's name.
AUTH_COMMAND_ROOM = 1024


@dataclass(frozen=True, slots=True)
class PreAuthPolicy:
    # Enabled login methods in the protocol's own config names, lower case:
    # imap: "login" (the LOGIN command), "plain", "cram-md5" (AUTHENTICATE ...)
    # pop3: "user" (USER/PASS), "apop", "plain", "login", "cram-md5" (AUTH ...)
    # smtp: "plain", "login", "cram-md5", "none"
    # all three: "xoauth2", "oauthbearer" (OAuth 2.0 bearer tokens)
    mechanisms: tuple[str, ...]
    # Extra capabilities to advertise before login (IMAP CAPABILITY atoms, POP3 CAPA lines,
    # SMTP EHLO keywords). The core adds the ones it implements itself (STARTTLS, AUTH=...).
    capabilities: tuple[str, ...]
    starttls: bool  # the listener offers STARTTLS/STLS (tls = "starttls")
    tls_active: bool  # the connection is already TLS (tls = "implicit")
    starttls_only: bool  # refuse cleartext logins until TLS is active
    greeting: str  # text after "* OK " / "+OK " / "220 "
    hostname: str = "localhost"  # for SMTP replies and salts
    max_errors: int = 5  # refused commands before the session is closed (nginx: 5)
    max_line: int = MAX_LINE
    # An IMAP literal before login can only carry a user name, a password or an ID value.
    max_literal: int = 4096
    max_auth_attempts: int = 3  # logins that did not succeed before the session is closed
    max_pipelined: int = MAX_PIPELINED
    # The longest bearer token XOAUTH2 and OAUTHBEARER take ([oauth] max_token).
    max_token: int = MAX_TOKEN
    # The connection comes from trusted_networks: its claims of the real client's address
    # (IMAP ID x-originating-ip, XCLIENT) count, and XCLIENT is offered.
    trusted: bool = False

    @property
    def line_limit(self) -> int:
        """The longest pre-auth line: `max_line`, or more when an OAuth mechanism is on, so
        that an AUTHENTICATE / AUTH line or SASL response with a `max_token` token fits."""
        if OAUTH_MECHANISMS.isdisjoint(self.mechanisms):
            return self.max_line
        return max(self.max_line, max_oauth_response(self.max_token) + AUTH_COMMAND_ROOM)
