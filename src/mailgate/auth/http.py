"""nginx-compatible auth_http client: ask an HTTP service whether a login is valid and where to.

The request is what nginx's ngx_mail_auth_http_module sends (same headers, same order, same
escaping), so services written for nginx work unchanged. Three deliberate differences:
- HTTP/1.1 with keep-alive connection pooling instead of one HTTP/1.0 connection per login:
  cheaper, and every HTTP server nginx's auth_http talks to speaks HTTP/1.1.
- Auth-User, Auth-Pass and Auth-SSL-Cert also escape DEL and bytes >= 0x80 (nginx escapes only
  control bytes, space and "%"). A service has to percent-decode those headers anyway, so it sees
  the same bytes, and the header stays plain ASCII, which no HTTP stack mangles.
- The answer is parsed more strictly: a missing Auth-Status or a malformed header is a temporary
  failure. The HTTP status is read as nginx reads it, which is not at all: many nginx auth
  locations answer 204 (or even 500) with the Auth-* headers, and the headers decide.

OAuth logins (a mailgate extension of nginx's protocol; nginx has no such methods) go the same
way: `Auth-Method: xoauth2` or `oauthbearer`, the bearer token in `Auth-Pass`, escaped as any
secret, `Auth-User` the SASL user ("" for OAUTHBEARER without an authzid). An OK answer with
`Auth-Pass` is a password login as usual (a master user, say); one without passes the token on,
logging in to the backend with the client's mechanism (`Route.backend_auth`).

The two halves are pure functions (`build_request_headers`, `parse_response`) so they can be
tested without sockets; `AuthHttpClient` only moves bytes and maps failures to `TempFail`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Mapping
from functools import lru_cache

from yarl import URL

from mailgate.auth.http11 import HttpPool
from mailgate.config import AuthHttpSettings, OAuthSettings
from mailgate.values import (
    BackendAuth,
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
    TlsInfo,
    TokenChallenge,
)

log = logging.getLogger("mailgate.auth.http")

# nginx's auth_http_timeout defaults to 60 s, which holds a client in silence for a minute
# while the auth service is down. A healthy service answers in milliseconds; 5 s absorbs a
# slow database query and still answers the client well inside any mail client's own timeout.
DEFAULT_TIMEOUT = 5.0
# Connections to the auth service per worker process: logins wait for a free one (inside the
# timeout) rather than opening thousands of sockets when the service slows down.
POOL_LIMIT = 64
# Idle pooled connections are closed after 15 s, well before common
# server keep-alive timeouts (nginx and aiohttp 75 s), so the server rarely closes first.
# When it does, the GET is retried once on a fresh connection (http11.HttpPool).
KEEPALIVE_TIMEOUT = 15.0
# Auth-Wait delays the client's next try. A buggy answer must not hold a session for hours;
# 30 s is ten times the usual value (3 s, as in nginx's documentation example).
MAX_WAIT = 30

UNAVAILABLE = "[UNAVAILABLE]"  # nginx's Client-Host when the name is not resolved
_SALTED = frozenset({Method.CRAM_MD5, Method.APOP})

# ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH): control bytes, space and "%"; plus DEL and 8-bit (above).
_ESCAPED = frozenset(range(0x21)) | {0x25} | frozenset(range(0x7F, 0x100))
_ESCAPE_TABLE = tuple(f"%{b:02X}" if b in _ESCAPED else chr(b) for b in range(256))
# The same set as one character class: the common value has none of them, found in C.
_NEEDS_ESCAPE = re.compile(rb"[\x00-\x20%\x7f-\xff]")
# For the headers nginx sends unescaped, when a value is not valid UTF-8 (see _clean).
_CTL_TABLE = tuple(f"%{b:02X}" if b < 0x20 or b >= 0x7F else chr(b) for b in range(256))
_CTL = re.compile(r"[\x00-\x1f\x7f]")
_PORT = re.compile(r"[0-9]{1,5}")
_WAIT = re.compile(r"[0-9]{1,9}")
_HOST_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?", re.ASCII)
# An SMTP error code the client will see: 4xx/5xx, optionally with an enhanced status code.
_ERROR_CODE = re.compile(r"[45][0-9][0-9](?: [45]\.[0-9]{1,3}\.[0-9]{1,3})?", re.ASCII)


# --- the request -------------------------------------------------------------------------


def escape_mail_auth(value: str) -> str:
    """Percent-escape like nginx's NGX_ESCAPE_MAIL_AUTH (plus DEL and 8-bit, see module doc).

    Values are str decoded with surrogateescape, so non-UTF-8 bytes go out exactly as received.
    """
    raw = value.encode("utf-8", "surrogateescape")
    if _NEEDS_ESCAPE.search(raw) is None:
        return value
    return "".join(_ESCAPE_TABLE[b] for b in raw)


def _clean(value: str) -> str:
    """A header nginx sends unescaped (it cannot hold CR/LF there): escape control bytes only,
    so a stray one can never split the request."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # non-UTF-8 bytes carried as surrogates: escape them too
        return "".join(_CTL_TABLE[b] for b in value.encode("utf-8", "surrogateescape"))
    return _CTL.sub(lambda m: f"%{ord(m.group()):02X}", value)


def parse_url(url: str) -> URL:
    """The auth_http URL; nginx's scheme-less form "host:port/path" means http."""
    parsed = URL(url if "://" in url else f"http://{url}", encoded=True)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"auth_http url must be http://host[:port]/path, got {url!r}")
    return parsed


@lru_cache(maxsize=16)
def _host_header(url: str) -> str:
    # nginx sends the configured host without the port (ngx_mail_auth_http: u.host).
    host = parse_url(url).raw_host or ""
    return f"[{host}]" if ":" in host else host


def _tls_headers(tls: TlsInfo, pass_client_cert: bool) -> list[tuple[str, str]]:
    headers = [("Auth-SSL", "on")]
    if tls.protocol:
        headers.append(("Auth-SSL-Protocol", _clean(tls.protocol)))
    if tls.cipher:
        headers.append(("Auth-SSL-Cipher", _clean(tls.cipher)))
    if not pass_client_cert:
        return headers
    headers.append(("Auth-SSL-Verify", _clean(tls.client_verify)))
    facts = (
        ("Auth-SSL-Subject", tls.client_subject),
        ("Auth-SSL-Issuer", tls.client_issuer),
        ("Auth-SSL-Serial", tls.client_serial),
        ("Auth-SSL-Fingerprint", tls.client_fingerprint),
    )
    headers.extend((name, _clean(value)) for name, value in facts if value)
    if tls.client_cert_pem:
        headers.append(("Auth-SSL-Cert", escape_mail_auth(tls.client_cert_pem)))
    return headers


def build_request_headers(
    creds: Credentials, client: ClientInfo, settings: AuthHttpSettings
) -> list[tuple[str, str]]:
    """The request headers in nginx's order (ngx_mail_auth_http_create_request)."""
    headers = [
        ("Host", _host_header(settings.url)),
        ("Auth-Method", creds.method.auth_http_name),
        ("Auth-User", escape_mail_auth(creds.user)),
        ("Auth-Pass", escape_mail_auth(creds.secret.reveal())),
    ]
    if creds.method in _SALTED and creds.salt:
        headers.append(("Auth-Salt", _clean(creds.salt)))
    headers += [
        ("Auth-Protocol", client.protocol),
        ("Auth-Login-Attempt", str(creds.attempt)),
        ("Client-IP", client.ip),
    ]
    if client.protocol == "smtp":
        headers.append(("Client-Host", _clean(client.host) if client.host else UNAVAILABLE))
    if creds.method is Method.NONE:
        # nginx sends all three whenever the method is "none" (after the first RCPT TO).
        headers += [
            ("Auth-SMTP-Helo", _clean(creds.smtp_helo or "")),
            ("Auth-SMTP-From", _clean(creds.smtp_from or "")),
            ("Auth-SMTP-To", _clean(creds.smtp_to or "")),
        ]
    if client.tls is not None:
        headers += _tls_headers(client.tls, settings.pass_client_cert)
    headers.extend(settings.headers)
    return headers


# --- the answer --------------------------------------------------------------------------


@lru_cache(maxsize=1024)  # a handful of mailstores answer every login: parse each once
def _valid_host(value: str) -> str | None:
    """An IP address or a host name (nginx itself accepts only addresses)."""
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    return value if _HOSTNAME.fullmatch(value) else None


def _wait(value: str | None) -> float:
    # nginx's ngx_atoi: digits only, anything else is ignored.
    if value is None or not _WAIT.fullmatch(value):
        return 0.0
    return float(min(int(value), MAX_WAIT))


def _route(h: Mapping[str, str], creds: Credentials) -> Decision:
    server, port_text = h.get("auth-server"), h.get("auth-port")
    if not server or not port_text:
        return TempFail("auth_http answered OK without Auth-Server and Auth-Port")
    host = _valid_host(server)
    if host is None:
        return TempFail(f"auth_http sent an invalid Auth-Server {server[:80]!r}")
    port = int(port_text) if _PORT.fullmatch(port_text) else 0
    if not 1 <= port <= 65535:
        return TempFail(f"auth_http sent an invalid Auth-Port {port_text[:20]!r}")
    # Auth-User and Auth-Pass are used as given, never percent-decoded (as nginx does).
    given_pass = h.get("auth-pass")
    user = h.get("auth-user") or creds.user
    backend_auth = BackendAuth.PASSWORD
    if given_pass:
        secret = Secret(given_pass)
    elif creds.method in _SALTED:
        # The client sent a digest; the backend needs the clear password (nginx fails too).
        return TempFail(f"auth_http sent no Auth-Pass for {creds.method.value}")
    else:
        secret = creds.secret
        if creds.method.is_oauth:  # the token goes on, for the backend to validate
            backend_auth = BackendAuth(creds.method.value)
    if not user and creds.method.is_oauth:  # OAUTHBEARER without an authzid, nobody named
        return TempFail("auth_http answered OK for a token login without Auth-User")
    return Route(host=host, port=port, user=user, secret=secret, backend_auth=backend_auth)


def parse_response(
    status: int,
    headers: Mapping[str, str],
    creds: Credentials,
    challenge: TokenChallenge | None = None,
) -> Decision:
    """Turn an auth_http answer into a decision. Header names are matched case-insensitively
    and, as in nginx, the last of repeated headers wins; the status code decides nothing.
    `challenge` goes with a refused token login ([oauth] scope and issuer)."""
    h = {name.lower(): value for name, value in headers.items()}
    auth_status = h.get("auth-status")
    if auth_status is None:
        return TempFail(f"auth_http answer (HTTP {status}) has no Auth-Status")
    if auth_status == "OK":
        return _route(h, creds)
    wait = _wait(h.get("auth-wait"))
    if auth_status == "WAIT":  # nginx sleeps Auth-Wait seconds and asks again
        return TempFail("auth_http asked to wait and retry", wait=wait)
    code = h.get("auth-error-code")
    if code is not None and not _ERROR_CODE.fullmatch(code):
        code = None  # it would go on the SMTP wire: a "250" must never turn a refusal into success
    said = challenge if creds.method.is_oauth else None
    if not auth_status:
        return Reject(wait=wait, error_code=code, token_challenge=said)
    return Reject(message=auth_status, wait=wait, error_code=code, token_challenge=said)


# --- the client --------------------------------------------------------------------------


class AuthHttpClient:
    """An `Authenticator` asking an auth_http service over pooled keep-alive connections."""

    __slots__ = ("_challenge", "_closed", "_pool", "_settings", "_url")

    def __init__(self, settings: AuthHttpSettings, oauth: OAuthSettings | None = None) -> None:
        # Validate now (start-up), so a bad url or header fails the config check, not a login.
        self._url = parse_url(settings.url)
        for name, value in settings.headers:
            if _CTL.search(name + value) or not name or ":" in name:
                raise ValueError(f"invalid auth_http header {name!r}")
        if settings.timeout <= 0:
            raise ValueError("auth_http timeout must be positive")
        self._settings = settings
        # What a refused token's error challenge says; the auth service decides the rest.
        self._challenge = (
            TokenChallenge(oauth.scope, oauth.openid_configuration) if oauth is not None else None
        )
        self._pool: HttpPool | None = None  # created in the running loop
        self._closed = False

    def _get_pool(self) -> HttpPool:
        if self._pool is None:
            self._pool = HttpPool(str(self._url), limit=POOL_LIMIT, keepalive=KEEPALIVE_TIMEOUT)
        return self._pool

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        if self._closed:
            return TempFail("auth_http client is closed")
        try:
            decision = await self._ask(creds, client)
        except TimeoutError:
            decision = TempFail(f"auth_http timed out after {self._settings.timeout:g} s")
        except Exception as exc:  # never raise: anything unexpected is an outage, not a "no"
            # Only the class name and the OS error text: a parser's message may quote the
            # answer, and the answer may hold a password.
            detail = getattr(exc, "strerror", None) if isinstance(exc, OSError) else None
            reason = type(exc).__name__ + (f": {detail}" if detail else "")
            decision = TempFail(f"auth_http request failed ({reason})")
        _log_decision(decision, creds, client)
        return decision

    async def _ask(self, creds: Credentials, client: ClientInfo) -> Decision:
        headers = build_request_headers(creds, client, self._settings)
        deadline = asyncio.get_running_loop().time() + self._settings.timeout
        answer = await self._get_pool().get(headers, deadline)
        return parse_response(answer.status, answer.headers, creds, self._challenge)

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _log_decision(decision: Decision, creds: Credentials, client: ClientInfo) -> None:
    # Never the password: neither creds.secret nor an Auth-Pass from the answer.
    if isinstance(decision, TempFail):
        log.warning(
            "auth_http temporary failure for %r from %s (%s): %s",
            creds.user,
            client.ip,
            client.protocol,
            decision.reason,
        )
    elif isinstance(decision, Reject):
        log.info(
            "auth_http refused %r from %s (%s): %s",
            creds.user,
            client.ip,
            client.protocol,
            decision.message,
        )
    else:
        log.debug("auth_http routed %r to %s:%d", creds.user, decision.host, decision.port)
