"""SASL server mechanisms PLAIN (RFC 4616), LOGIN (draft-murchison-sasl-login) and CRAM-MD5
(RFC 2195), shared by the IMAP, POP3 and SMTP cores.

Each mechanism is a tiny state machine: `step(response)` takes the client's decoded response
(None when the client sent no initial response) and returns the next `Challenge` or the final
`Credentials`. Base64, cancellation (`*`) and the wire framing belong to the protocol cores;
this module sees raw bytes only.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailgate.values import Credentials, Method, Secret

# Longest user name or password we accept: far above any real one (Dovecot caps SASL input at
# 8 KiB as a whole), and it keeps an auth_http header comfortably under any server's limit.
MAX_FIELD = 1024


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


SaslServer = PlainServer | LoginServer | CramMd5Server

MECHANISMS = ("PLAIN", "LOGIN", "CRAM-MD5")


def new_server(mechanism: str, salt: str) -> SaslServer:
    """A server for `mechanism` (upper case). `salt` is the CRAM-MD5 challenge, "<...@host>"."""
    if mechanism == "PLAIN":
        return PlainServer()
    if mechanism == "LOGIN":
        return LoginServer()
    if mechanism == "CRAM-MD5":
        return CramMd5Server(salt)
    raise SaslError(f"unknown mechanism {mechanism!r}")
