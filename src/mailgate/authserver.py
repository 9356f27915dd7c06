"""The nginx auth_http endpoint over any Authenticator (`mailgate auth-server`).

nginx's mail proxy asks with one GET per login, headers only (see
shared reference "nginx-auth-http.md"), and reads the answer's headers only: the HTTP status
is ignored, the whole answer must fit in 1024 bytes, and Auth-Server must be an IP address
(nginx does not resolve names there). Every request is answered on any path but /healthz.

OAuth logins come as mailgate's auth_http client sends them (a mailgate extension of the
protocol): `Auth-Method: xoauth2` or `oauthbearer` with the token in `Auth-Pass` (as long as
[oauth] max_token) and `Auth-User` empty for OAUTHBEARER without an authzid. A route that
passes the token on is answered without `Auth-Pass`, which tells the client to log in to the
backend with the client's own token and mechanism (nginx, too, reuses the client's password
when Auth-Pass is absent).

A request without the configured shared-secret headers gets 403. A request that is not from
nginx at all (no Auth-Method or Auth-Protocol, a Client-IP that is no address) gets 400.
Anything the client controls that does not decode (bad escapes, CR/LF/NUL in a user name) gets
the same "Invalid login or password" as a wrong password. No traceback reaches the wire, and no
access log is written: request lines are harmless, but nothing here should ever log headers.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import re
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDictProxy

from mailgate.auth import Authenticator
from mailgate.protocols.sasl import MAX_FIELD, MAX_TOKEN
from mailgate.values import (
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
    TlsInfo,
)

if TYPE_CHECKING:
    from mailgate.config import AuthServerSettings, Settings

log = logging.getLogger("mailgate.authserver")

# Request limits handed to aiohttp's parser. The longest header nginx sends is Auth-SSL-Cert:
# a client certificate's PEM, escaped (~3 KiB for RSA-4096 with extensions); 16 KiB leaves room.
# An OAuth token in Auth-Pass may be as long as [oauth] max_token (b64token characters need no
# escaping): the limit is raised to fit it (`field_limit`).
MAX_FIELD_SIZE = 16 * 1024
FIELD_ROOM = 1024  # beyond the token: the header's name and separator, with room to spare
MAX_LINE_SIZE = 8190  # the request line: aiohttp's own default, nginx sends "GET /auth HTTP/1.0"
MAX_HEADERS = 64  # nginx sends at most 24 (all Auth-SSL-* and Proxy-Protocol-*) plus extras
# nginx opens one HTTP/1.0 connection per login; nothing worth keeping a socket open for.
KEEPALIVE_TIMEOUT = 5.0
# Answer before nginx gives up (auth_http_timeout, 60 s by default) so the client gets a
# "try again later" instead of a dropped connection.
AUTH_TIMEOUT = 30.0
RESOLVE_TIMEOUT = 3.0  # a backend host name; the directory's own query_timeout is 3 s too
# ngx_mail_auth_http_module reads the answer into one 1024-byte buffer; aiohttp adds a status
# line, Date, Server, Content-Type and Content-Length (~140 bytes), we keep 200 for those.
NGINX_ANSWER_MAX = 1024
FRAMEWORK_OVERHEAD = 200
SERVER_NAME = "mailgate"  # instead of aiohttp's longer "Python/3.x aiohttp/3.x"

INVALID = "Invalid login or password"
TEMPORARY = "Temporary server problem, try again later"
SMTP_TEMP_CODE = "451 4.3.0"
UNRESOLVED = ("[UNAVAILABLE]", "[TEMPUNAVAIL]")  # nginx's Client-Host when DNS did not answer

METHODS = {
    "plain": Method.PLAIN,
    "login": Method.LOGIN,
    "cram-md5": Method.CRAM_MD5,
    "apop": Method.APOP,
    "none": Method.NONE,
    "xoauth2": Method.XOAUTH2,
    "oauthbearer": Method.OAUTHBEARER,
}
PROTOCOLS = ("imap", "pop3", "smtp")
_SALTED = (Method.CRAM_MD5, Method.APOP)
_HEX2 = re.compile(rb"[0-9A-Fa-f]{2}")
_BAD_NAME = re.compile(r"[\x00\r\n]")


class _NoDetail(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback whose message quotes the bytes
    it choked on, which may be an Auth-Pass. Keep the line, drop the detail."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:
            kind = record.exc_info[0].__name__ if record.exc_info[0] else "error"
            record.msg = f"auth-server: unusable HTTP request ({kind})"
            record.args = ()
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


# The logger aiohttp's request handler reports parse errors and handler crashes to.
http_log = logging.getLogger("mailgate.authserver.http")
http_log.addFilter(_NoDetail())


class BadInput(Exception):
    """A header the client controls does not decode. The message is for the log only."""


class NotNginx(Exception):
    """The request lacks what nginx always sends. The message is for the log only."""


def unescape(value: str) -> str:
    """Inverse of nginx's ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH): "%XX" -> byte, nothing else.

    "+" stays "+". A "%" without two hex digits never comes from nginx (it escapes "%" itself).
    Bytes that are not UTF-8 are kept as surrogates, as the protocol cores keep them.
    """
    raw = value.encode("utf-8", "surrogateescape")
    if b"%" not in raw:
        return value
    first, *rest = raw.split(b"%")
    out = [first]
    for part in rest:
        if not _HEX2.match(part):
            raise BadInput("malformed percent-escape")
        out.append(bytes((int(part[:2], 16),)))
        out.append(part[2:])
    return b"".join(out).decode("utf-8", "surrogateescape")


def field_limit(max_token: int = MAX_TOKEN) -> int:
    """The longest request header accepted: an escaped certificate, or a whole token."""
    return max(MAX_FIELD_SIZE, max_token + FIELD_ROOM)


def parse_request(
    headers: Mapping[str, str], max_token: int = MAX_TOKEN
) -> tuple[Credentials, ClientInfo]:
    """nginx's request headers -> what an Authenticator takes. Raises NotNginx or BadInput."""
    protocol = _one(headers, "Auth-Protocol")
    method_name = _one(headers, "Auth-Method")
    ip = _one(headers, "Client-IP")
    if protocol is None or method_name is None or ip is None:
        raise NotNginx("Auth-Method, Auth-Protocol or Client-IP missing")
    if protocol not in PROTOCOLS:
        raise NotNginx(f"unknown Auth-Protocol {protocol[:20]!r}")
    try:
        ipaddress.ip_address(ip)
    except ValueError:
        raise NotNginx("Client-IP is not an IP address") from None
    method = METHODS.get(method_name.lower())
    if method is None:
        raise BadInput(f"unsupported Auth-Method {method_name[:20]!r}")
    user = unescape(_one(headers, "Auth-User") or "")
    password = unescape(_one(headers, "Auth-Pass") or "")
    longest = max_token if method.is_oauth else MAX_FIELD
    if _BAD_NAME.search(user) or len(user) > MAX_FIELD or len(password) > longest:
        raise BadInput("user name with CR, LF or NUL, or a field too long")
    if method.is_oauth and (not password or _BAD_NAME.search(password)):
        raise BadInput("token login without a token, or with CR, LF or NUL in it")
    # OAUTHBEARER need not name a user: the token does (RFC 7628 3.1).
    if not user and method not in (Method.NONE, Method.OAUTHBEARER):
        raise BadInput("empty Auth-User")
    salt = _one(headers, "Auth-Salt")
    if method in _SALTED and not salt:
        raise BadInput(f"{method.value} without Auth-Salt")
    attempt_text = _one(headers, "Auth-Login-Attempt") or "1"
    if not attempt_text.isdigit() or not 0 < int(attempt_text) < 1000:
        raise BadInput("bad Auth-Login-Attempt")
    creds = Credentials(
        method,
        user,
        Secret(password),
        salt=salt if method in _SALTED else None,
        attempt=int(attempt_text),
        smtp_helo=_one(headers, "Auth-SMTP-Helo"),
        smtp_from=_one(headers, "Auth-SMTP-From"),
        smtp_to=_one(headers, "Auth-SMTP-To"),
    )
    host = _one(headers, "Client-Host")
    client = ClientInfo(
        ip=ip,
        port=0,  # nginx does not send the client's port
        protocol=protocol,
        tls=_tls(headers),
        host=None if host in UNRESOLVED else host,
    )
    return creds, client


def _one(headers: Mapping[str, str], name: str) -> str | None:
    """The single value of `name`; a repeated header is ambiguous, so refused."""
    if isinstance(headers, CIMultiDictProxy):
        values = headers.getall(name, [])
        if len(values) > 1:
            raise BadInput(f"{name} sent more than once")
        return values[0] if values else None
    return headers.get(name)


def _tls(headers: Mapping[str, str]) -> TlsInfo | None:
    if _one(headers, "Auth-SSL") != "on":
        return None
    cert = _one(headers, "Auth-SSL-Cert")
    return TlsInfo(
        protocol=_one(headers, "Auth-SSL-Protocol") or "",
        cipher=_one(headers, "Auth-SSL-Cipher") or "",
        client_verify=_one(headers, "Auth-SSL-Verify") or "NONE",
        client_subject=_one(headers, "Auth-SSL-Subject"),
        client_issuer=_one(headers, "Auth-SSL-Issuer"),
        client_serial=_one(headers, "Auth-SSL-Serial"),
        client_fingerprint=_one(headers, "Auth-SSL-Fingerprint"),
        client_cert_pem=unescape(cert) if cert else None,
    )


# --- answers ------------------------------------------------------------------------------------


def _wait(seconds: float) -> str:
    # nginx reads whole seconds and closes the client's session when Auth-Wait is absent or 0;
    # at least one second lets the client try again after a typo, as Dovecot's default
    # two-second failure delay does.
    return str(max(1, math.ceil(seconds)))


def _reject_headers(decision: Reject, protocol: str) -> dict[str, str]:
    headers = {
        "Auth-Status": _one_line(decision.message) or INVALID,
        "Auth-Wait": _wait(decision.wait),
    }
    if protocol == "smtp" and decision.error_code:
        headers["Auth-Error-Code"] = _one_line(decision.error_code)
    return headers


def _temp_headers(decision: TempFail, protocol: str) -> dict[str, str]:
    headers = {"Auth-Status": TEMPORARY, "Auth-Wait": _wait(decision.wait)}
    if protocol == "smtp":
        headers["Auth-Error-Code"] = SMTP_TEMP_CODE
    return headers


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def _route_headers(route: Route) -> dict[str, str] | TempFail:
    address = await resolve(route.host)
    if address is None:
        return TempFail(f"cannot resolve backend host {route.host!r}")
    # A token route passes the client's token on: no Auth-Pass says "use the client's own".
    user = route.user
    password = "" if route.backend_auth.is_token else route.secret.reveal()
    for value in (user, password):
        if not value.isprintable() or not _encodable(value):  # CR/LF would split the answer
            return TempFail("backend login or password cannot travel in an HTTP header")
    headers = {
        "Auth-Status": "OK",
        "Auth-Server": address,
        "Auth-Port": str(route.port),
        "Auth-User": user,
    }
    if not route.backend_auth.is_token:
        headers["Auth-Pass"] = password
    size = sum(len(k) + len(v.encode("utf-8")) + 4 for k, v in headers.items())
    if size > NGINX_ANSWER_MAX - FRAMEWORK_OVERHEAD:
        return TempFail("answer would overflow nginx's 1024-byte auth_http buffer")
    return headers


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


async def resolve(host: str) -> str | None:
    """An IP address for `host`: as it is if it is one, else the first DNS answer."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError):
        return None
    return str(infos[0][4][0]) if infos else None


async def _decide(authenticator: Authenticator, creds: Credentials, client: ClientInfo) -> Decision:
    try:
        async with asyncio.timeout(AUTH_TIMEOUT):
            return await authenticator.authenticate(creds, client)
    except TimeoutError:
        return TempFail(f"authenticator gave no answer within {AUTH_TIMEOUT:g} s")
    except Exception as e:  # an authenticator must not raise; if it does, it is an outage
        return TempFail(f"authenticator raised {type(e).__name__}")


# --- the application ------------------------------------------------------------------------


def create_app(
    authenticator: Authenticator, settings: AuthServerSettings, max_token: int = MAX_TOKEN
) -> web.Application:
    """`max_token`: the longest OAuth token a request may carry ([oauth] max_token)."""
    required = tuple((name, value.encode("utf-8")) for name, value in settings.required_headers)

    async def auth(request: web.Request) -> web.Response:
        if not _has_required(request, required):
            log.warning("auth-server: refused %s: required header missing or wrong", request.remote)
            return _answer({}, status=403)
        try:
            creds, client = parse_request(request.headers, max_token)
        except NotNginx as e:
            log.warning("auth-server: bad request from %s: %s", request.remote, e)
            return _answer({}, status=400)
        except BadInput as e:
            client_ip = request.headers.get("Client-IP", "?")
            log.info("auth-server: %r: invalid login (%s)", client_ip[:64], e)
            return _answer({"Auth-Status": INVALID, "Auth-Wait": "0"})
        decision = await _decide(authenticator, creds, client)
        if isinstance(decision, Route):
            routed = await _route_headers(decision)
            if isinstance(routed, dict):
                _log(creds, client, f"ok -> {routed['Auth-Server']}:{decision.port}")
                return _answer(routed)
            decision = routed
        if isinstance(decision, Reject):
            _log(creds, client, "rejected")
            return _answer(_reject_headers(decision, client.protocol))
        _log(creds, client, f"temporary failure: {decision.reason}", logging.WARNING)
        return _answer(_temp_headers(decision, client.protocol))

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(
        client_max_size=1024,  # nginx sends no body
        handler_args={
            "access_log": None,
            "logger": http_log,
            "max_line_size": MAX_LINE_SIZE,
            "max_field_size": field_limit(max_token),
            "max_headers": MAX_HEADERS,
            "keepalive_timeout": KEEPALIVE_TIMEOUT,
        },
    )
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{path:.*}", auth)
    return app


def _has_required(request: web.Request, required: tuple[tuple[str, bytes], ...]) -> bool:
    ok = True
    for name, expected in required:  # check them all: no early exit to time
        got = request.headers.get(name, "").encode("utf-8", "surrogateescape")
        ok &= hmac.compare_digest(got, expected)
    return ok


def _answer(headers: dict[str, str], status: int = 200) -> web.Response:
    response = web.Response(status=status, headers=headers)
    response.headers["Server"] = SERVER_NAME
    return response


def _log(creds: Credentials, client: ClientInfo, outcome: str, level: int = logging.INFO) -> None:
    log.log(
        level,
        "auth-server: %s %s user=%r client=%s attempt=%d: %s",
        client.protocol,
        creds.method.value,
        creds.user,
        client.ip,
        creds.attempt,
        outcome,
    )


async def serve(settings: Settings, authenticator: Authenticator) -> None:
    """Answer nginx on settings.auth_server.listen until cancelled. The caller closes
    `authenticator`."""
    from mailgate.config import parse_address  # config imports the auth package

    host, port = parse_address(settings.auth_server.listen, "auth_server.listen")
    max_token = settings.oauth.max_token if settings.oauth is not None else MAX_TOKEN
    app = create_app(authenticator, settings.auth_server, max_token)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host or None, port, reuse_address=True)
        await site.start()
        log.info("auth-server: listening on %s", settings.auth_server.listen)
        await asyncio.Event().wait()  # until cancelled
    finally:
        await runner.cleanup()
