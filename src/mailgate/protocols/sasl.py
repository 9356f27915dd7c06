"""SASL server mechanisms PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login), CRAM-MD5
(RFC 2195), OAUTHBEARER (RFC 7628) and Google's XOAUTH2, shared by the IMAP, POP3 and SMTP cores.

Each mechanism is a tiny state machine: `step(response)` takes the client's decoded response
(None when the client sent no initial response) and returns the next `Challenge` or the final
`Credentials`. Base64, cancellation (`*`) and the wire framing belong to the protocol cores;
this module sees raw bytes only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from mailgate.values import Credentials, Method, Secret

# Longest user name or password we accept: far above any real one (Dovecot caps SASL input at
# 8 KiB as a whole), and it keeps an auth_http header comfortably under any server's limit.
MAX_FIELD = 1024
# Longest OAuth bearer token we accept by default ([oauth] max_token): JWTs of 2-8 KiB are
# common (Azure AD with group claims reaches ~6 KiB), twice the largest seen leaves room.
MAX_TOKEN = 16 * 1024
# What an OAuth client response may hold besides the token: the user name (escaped, up to
# three bytes per byte in OAUTHBEARER's authzid), host= and port= (RFC 7628 3.1), framing.
OAUTH_OVERHEAD = 4 * MAX_FIELD


class SaslError(Exception):
    """The client's response does not fit the mechanism."""


@dataclass(frozen=True, slots=True)
class Challenge:
    data: bytes


def _text(raw: bytes) -> str:
    if len(raw) > MAX_FIELD or b"\0" in raw or b"\r" in raw or b"\n" in raw:
        raise SaslError("field too long or with control bytes")
    # surrogateescape keeps non-UTF-8 passwords byte-exact for the backend.
    return raw.decode("utf-8", "surrogateescape")


class PlainServer:
    __slots__ = ("_asked",)

    def __init__(self) -> None:
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if response is None:
            if self._asked:
                raise SaslError("PLAIN expects one response")
            self._asked = True
            return Challenge(b"")
        parts = response.split(b"\0")
        if len(parts) != 3:
            raise SaslError("PLAIN wants authzid NUL authcid NUL passwd")
        # authzid is ignored, as nginx does: we log in as the authenticated identity.
        _authzid, user, password = parts
        if not user:
            raise SaslError("empty authcid")
        return Credentials(Method.PLAIN, _text(user), Secret(_text(password)))


class LoginServer:
    __slots__ = ("_user",)

    USERNAME = b"Username:"
    PASSWORD = b"Password:"

    def __init__(self) -> None:
        self._user: str | None = None

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if response is None:
            return Challenge(self.USERNAME)
        if self._user is None:
            if not response:
                raise SaslError("empty user name")
            self._user = _text(response)
            return Challenge(self.PASSWORD)
        return Credentials(Method.LOGIN, self._user, Secret(_text(response)))


class CramMd5Server:
    __slots__ = ("_asked", "_salt")

    def __init__(self, salt: str) -> None:
        self._salt = salt
        self._asked = False

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if not self._asked:
            if response is not None:
                raise SaslError("CRAM-MD5 takes no initial response")
            self._asked = True
            return Challenge(self._salt.encode("ascii"))
        if response is None:
            raise SaslError("CRAM-MD5 expects a response")
        user, sep, digest = response.rpartition(b" ")
        if not sep or not user or len(digest) != 32:
            raise SaslError("CRAM-MD5 wants 'user hexdigest'")
        try:
            int(digest, 16)
        except ValueError:
            raise SaslError("CRAM-MD5 digest is not hex") from None
        return Credentials(
            Method.CRAM_MD5, _text(user), Secret(digest.decode("ascii").lower()), salt=self._salt
        )


# --- OAuth 2.0 bearer tokens ------------------------------------------------------------------
#
# Both mechanisms are one client message (usually the initial response) carrying a user name
# and "auth=Bearer <token>". A failure is not a plain refusal: the server answers an invalid
# token with a JSON error challenge (`error_challenge`), the client answers that with a dummy
# response (`is_dummy_response`), and only then does the protocol's failure reply follow.
# Running that exchange is the cores' business; these classes only read the client message.

KVSEP = b"\x01"
# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_BEARER = re.compile(rb"bearer +", re.IGNORECASE)  # an HTTP auth-scheme: case-insensitive
# RFC 7628 3.1: key = 1*ALPHA; value = *(VCHAR / SP / HTAB / CR / LF), and UTF-8 beyond it
# for XOAUTH2's user= (an internationalised address); `_text` then refuses CR and LF in names.
_KVPAIR = re.compile(rb"([A-Za-z]+)=([\x21-\x7e\x80-\xff \t\r\n]*)")


def _bearer_token(auth: bytes, max_token: int) -> Secret:
    scheme = _BEARER.match(auth)
    if scheme is None:
        raise SaslError("auth is not 'Bearer <token>'")
    token = auth[scheme.end() :]
    if len(token) > max_token:
        raise SaslError(f"token longer than {max_token} bytes")
    if not _B64TOKEN.fullmatch(token):
        raise SaslError("token is not an RFC 6750 b64token")
    return Secret(token.decode("ascii"))


def _pairs(body: bytes) -> dict[bytes, bytes]:
    """key=value fields separated by ^A; a repeated key is refused (which one would count?)."""
    fields: dict[bytes, bytes] = {}
    for item in body.split(KVSEP):
        pair = _KVPAIR.fullmatch(item)
        if pair is None:
            raise SaslError("malformed key=value field")
        key, value = pair.groups()
        if key in fields:
            raise SaslError("repeated key")
        fields[key] = value
    return fields


def _saslname(raw: bytes) -> str:
    """RFC 5801's saslname: "," and "=" arrive as "=2C" and "=3D"; any other "=" is wrong."""
    if re.search(rb"=(?!2C|3D)", raw):
        raise SaslError("bad escape in authzid")
    return _text(raw.replace(b"=2C", b",").replace(b"=3D", b"="))


class _BearerServer:
    """One client message, asked for with an empty challenge when it was not sent at once."""

    __slots__ = ("_asked", "_max_token")

    def __init__(self, max_token: int = MAX_TOKEN) -> None:
        self._asked = False
        self._max_token = max_token

    def step(self, response: bytes | None) -> Challenge | Credentials:
        if response is None:
            if self._asked:
                raise SaslError("the mechanism expects one response")
            self._asked = True
            return Challenge(b"")
        if len(response) > self._max_token + OAUTH_OVERHEAD:
            raise SaslError("client response too long")
        return self._parse(response)

    def _parse(self, response: bytes) -> Credentials:
        raise NotImplementedError


class OAuthBearerServer(_BearerServer):
    """RFC 7628: `n,a=user,` ^A host=... ^A port=... ^A auth=Bearer <token> ^A ^A.

    host and port are ignored (they name us). The authzid is optional: without one the token
    alone says who the user is, and `Credentials.user` is "". Channel binding is refused.
    """

    __slots__ = ()

    def _parse(self, response: bytes) -> Credentials:
        if response == KVSEP:
            raise SaslError("a dummy response where the client response was due")
        gs2, sep, rest = response.partition(KVSEP)
        if not sep or not rest.endswith(KVSEP + KVSEP):
            raise SaslError("OAUTHBEARER wants gs2-header ^A *(key=value ^A) ^A")
        parts = gs2.split(b",")
        if len(parts) != 3 or parts[2]:
            raise SaslError("malformed GS2 header")
        flag, authzid = parts[0], parts[1]
        if flag.startswith(b"p="):
            raise SaslError("channel binding is not supported")
        if flag not in (b"n", b"y"):
            raise SaslError("malformed GS2 channel binding flag")
        if authzid and not authzid.startswith(b"a="):
            raise SaslError("malformed GS2 authzid")
        user = _saslname(authzid[2:]) if authzid else ""
        auth = _pairs(rest[:-2]).get(b"auth")
        if auth is None:
            raise SaslError("no auth= field")
        token = _bearer_token(auth, self._max_token)
        return Credentials(Method.OAUTHBEARER, user, token)


class XOAuth2Server(_BearerServer):
    """Google's XOAUTH2: `user=<name>` ^A `auth=Bearer <token>` ^A ^A. Both are required;
    other fields are ignored, as Dovecot does."""

    __slots__ = ()

    def _parse(self, response: bytes) -> Credentials:
        if not response.endswith(KVSEP + KVSEP):
            raise SaslError("XOAUTH2 wants user=... ^A auth=Bearer ... ^A ^A")
        fields = _pairs(response[:-2])
        user, auth = fields.get(b"user"), fields.get(b"auth")
        if not user or auth is None:
            raise SaslError("XOAUTH2 needs user= and auth=")
        return Credentials(Method.XOAUTH2, _text(user), _bearer_token(auth, self._max_token))


def error_challenge(
    method: Method, *, scope: str | None = None, openid_configuration: str | None = None
) -> bytes:
    """The JSON a server sends (base64-encoded, as a challenge) when a token is refused.

    OAUTHBEARER: RFC 7628 3.2.2, `{"status":"invalid_token","scope":...,"openid-configuration":...}`
    with the optional members left out when not configured. XOAUTH2: Google's form,
    `{"status":"401","schemes":"bearer","scope":...}`. Compact, in this member order, so the
    bytes are the RFC's and Google's examples.
    """
    body: dict[str, str]
    if method is Method.OAUTHBEARER:
        body = {"status": "invalid_token"}
        if scope:
            body["scope"] = scope
        if openid_configuration:
            body["openid-configuration"] = openid_configuration
    elif method is Method.XOAUTH2:
        body = {"status": "401", "schemes": "bearer"}
        if scope:
            body["scope"] = scope
    else:
        raise ValueError(f"{method.value} has no error challenge")
    return json.dumps(body, separators=(",", ":")).encode("ascii")


def is_dummy_response(method: Method, response: bytes) -> bool:
    """Whether the client answered the error challenge as its mechanism says: ^A for
    OAUTHBEARER (RFC 7628 3.2.3), an empty response for XOAUTH2. The failure reply follows
    either way; this is for the log."""
    return response == (KVSEP if method is Method.OAUTHBEARER else b"")


def max_oauth_response(max_token: int = MAX_TOKEN) -> int:
    """The longest base64 client response line an OAuth mechanism may need: what the line
    buffer of a core must let through in AUTHENTICATE / AUTH (initial response or not)."""
    return 4 * -(-(max_token + OAUTH_OVERHEAD) // 3)


SaslServer = PlainServer | LoginServer | CramMd5Server | OAuthBearerServer | XOAuth2Server

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER")


def new_server(mechanism: str, salt: str, max_token: int = MAX_TOKEN) -> SaslServer:
    """A server for `mechanism` (upper case). `salt` is the CRAM-MD5 challenge, "<...@host>";
    `max_token` the longest bearer token XOAUTH2 and OAUTHBEARER take ([oauth] max_token)."""
    if mechanism == "PLAIN":
        return PlainServer()
    if mechanism == "LOGIN":
        return LoginServer()
    if mechanism == "CRAM-MD5":
        return CramMd5Server(salt)
    if mechanism == "XOAUTH2":
        return XOAuth2Server(max_token)
    if mechanism == "OAUTHBEARER":
        return OAuthBearerServer(max_token)
    raise SaslError(f"unknown mechanism {mechanism!r}")
