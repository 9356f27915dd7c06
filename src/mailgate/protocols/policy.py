"""What a listener allows before login: the static, per-listener input of every client core."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PreAuthPolicy:
    # Enabled login methods in the protocol's own config names, lower case:
    # imap: "login" (the LOGIN command), "plain", "cram-md5" (AUTHENTICATE ...)
    # pop3: "user" (USER/PASS), "apop", "plain", "cram-md5" (AUTH ...)
    # smtp: "plain", "login", "cram-md5", "none"
    mechanisms: tuple[str, ...]
    # Extra capabilities to advertise before login (IMAP CAPABILITY atoms, POP3 CAPA lines,
    # SMTP EHLO keywords). The core adds the ones it implements itself (STARTTLS, AUTH=...).
    capabilities: tuple[str, ...]
    starttls: bool  # the listener offers STARTTLS/STLS (tls = "starttls")
    tls_active: bool  # the connection is already TLS (tls = "implicit")
    starttls_only: bool  # refuse cleartext logins until TLS is active
    greeting: str  # text after "* OK " / "+OK " / "220 "
    hostname: str = "localhost"  # for SMTP replies and salts
    max_errors: int = 5  # bad or unknown commands before the session is closed (nginx: 5)
    # RFC 7162 section 4 asks clients to keep lines under 8192 octets; a pre-auth line is far
    # shorter in practice (tag, command, two credentials).
    max_line: int = 8192
    # An IMAP literal before login can only carry a user name or password.
    max_literal: int = 4096
    max_auth_attempts: int = 3  # failed logins before the session is closed
