"""OAuth 2.0 bearer tokens for the built-in directory: whose token is it, if anyone's?

`TokenValidator.validate(token)` gives a small value: `TokenValid(user)` with the value of
the configured username claim, `TokenInvalid(reason)` (the login is refused, with RFC 7628's
error challenge) or `TokenUnavailable(reason)` (the IdP could not be asked: a temporary
failure, never "bad password"). It never raises for a bad token or an IdP outage.

- A JWT (three dot-separated parts) is checked here when [oauth] has `issuer` and `audience`:
  the signature against the issuer's published keys (`oauth_idp.JwksStore`), with the header's
  `alg` in the allow-list and fitting the key's type (so neither `alg: none` nor an HMAC
  "signed" with the public key gets through), then `iss`, `aud`, `exp`, `nbf` and `iat`
  with `clock_skew` of tolerance.
- Any other token goes to RFC 7662 introspection when configured: the answer must say
  `active`, and `exp`, `iss`, `aud`/`client_id` are checked as for a JWT. Positive answers
  are cached briefly under a keyed hash of the token.

The reasons are for the log: they never hold the token, only short, quoted pieces of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import BadSignatureError, JoseError, UnsupportedAlgorithmError
from joserfc.jwa import JWSAlgModel
from joserfc.jws import JWSRegistry

from mailgate.auth.oauth_idp import (
    Clock,
    IdpHttp,
    IdpUnavailable,
    Introspection,
    JwksStore,
    PositiveCache,
)
from mailgate.config import OAuthSettings
from mailgate.values import Secret

__all__ = [
    "TokenCheck",
    "TokenInvalid",
    "TokenUnavailable",
    "TokenValid",
    "TokenValidator",
]

# A JWS header is a few dozen bytes (alg, typ, kid; x5t at most); joserfc's own cap of 512
# refuses some real ones with certificate thumbprints and nonces.
MAX_HEADER = 2048
# The key type each algorithm family needs (RFC 7518 3.1, RFC 8037 3.1).
_KEY_TYPE = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}


@dataclass(frozen=True, slots=True)
class TokenValid:
    user: str  # the username claim, as the IdP wrote it (the directory normalises it)
    expires: float | None  # `exp`, seconds since the epoch; None when the IdP gave none
    via: str  # "jwt" | "introspection", for the log


@dataclass(frozen=True, slots=True)
class TokenInvalid:
    reason: str


@dataclass(frozen=True, slots=True)
class TokenUnavailable:
    reason: str


TokenCheck = TokenValid | TokenInvalid | TokenUnavailable


class _Registry(JWSRegistry):
    """joserfc's registry, held to our allow-list, with room for real headers, and without
    the warning joserfc gives for "EdDSA" (superseded in name by RFC 9864's "Ed25519", but
    what IdPs still sign with; it counts only when the operator's allow-list has it)."""

    max_header_length = MAX_HEADER

    def get_alg(self, name: str) -> JWSAlgModel:
        if name not in self.algorithms or not self.allowed or name not in self.allowed:
            raise UnsupportedAlgorithmError(f"algorithm {name[:20]!r} is not allowed")
        return self.algorithms[name]


class _Refused(Exception):
    """The token is not valid; the message is the reason for the log."""


class TokenValidator:
    """Validates bearer tokens as [oauth] says. One per process; safe for concurrent use."""

    def __init__(
        self,
        settings: OAuthSettings,
        *,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._monotonic = monotonic
        self._http = IdpHttp(settings)
        self.keys = JwksStore(settings, self._http, monotonic) if settings.validates_jwt else None
        self.introspection = (
            Introspection(settings, self._http) if settings.introspection_url else None
        )
        self.cache: PositiveCache[TokenValid] = PositiveCache(settings.introspection_cache)
        self._pending: dict[bytes, asyncio.Future[TokenCheck]] = {}
        # Strict about algorithms, lenient about extra header members (Azure sends "nonce").
        self._registry = _Registry(algorithms=list(settings.algorithms), strict_check_header=False)

    async def validate(self, token: Secret) -> TokenCheck:
        raw = token.reveal()
        if not raw or len(raw) > self.settings.max_token:
            return TokenInvalid(f"token of {len(raw)} bytes (limit {self.settings.max_token})")
        looks_like_jwt = raw.count(".") == 2 and all(raw.split("."))
        try:
            if looks_like_jwt and self.keys is not None:
                return await self._jwt(raw)
            if self.introspection is not None:
                return await self._introspect(token)
        except IdpUnavailable as e:
            return TokenUnavailable(f"identity provider unavailable: {e}")
        except _Refused as e:
            return TokenInvalid(str(e))
        return TokenInvalid("not a JWT, and no introspection_url to ask about it")

    async def close(self) -> None:
        await self._http.close()

    # --- JWTs -------------------------------------------------------------------------------

    async def _jwt(self, token: str) -> TokenValid:
        assert self.keys is not None
        header = _header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if not isinstance(alg, str):
            raise _Refused("JWT header has no alg")
        if alg not in self.settings.algorithms:
            raise _Refused(f"JWT alg {alg[:20]!r} is not allowed")
        if kid is not None and not isinstance(kid, str):
            raise _Refused("JWT kid is not a string")
        found = await self.keys.lookup(kid, _KEY_TYPE[alg[:2]])
        if found.key is None:
            raise _Refused(f"no key for the JWT: {found.problem}")
        try:
            verified = jws.deserialize_compact(token, found.key, [alg], self._registry)
        except BadSignatureError:
            raise _Refused("JWT signature does not verify") from None
        except JoseError as e:  # key type or curve does not fit the alg, crit, sizes ...
            raise _Refused(f"JWT refused: {type(e).__name__}") from None
        try:
            claims = json.loads(verified.payload)
        except ValueError:
            raise _Refused("JWT payload is not JSON") from None
        if not isinstance(claims, dict):
            raise _Refused("JWT payload is not a JSON object")
        return self._claims(claims, "jwt", exp_required=True)

    # --- opaque tokens ------------------------------------------------------------------------

    async def _introspect(self, token: Secret) -> TokenCheck:
        digest = self.cache.digest(token)
        hit = self.cache.get(digest, self._monotonic())
        if hit is not None:
            return hit
        # A client opening five connections at once asks the IdP once.
        pending = self._pending.get(digest)
        if pending is None:
            pending = asyncio.ensure_future(self._ask(token))
            self._pending[digest] = pending
            pending.add_done_callback(lambda _: self._pending.pop(digest, None))
        result = await asyncio.shield(pending)
        if isinstance(result, TokenValid):
            lifetime = (result.expires - self._clock()) if result.expires is not None else 1e9
            self.cache.put(digest, result, self._monotonic(), lifetime)
        return result

    async def _ask(self, token: Secret) -> TokenCheck:
        assert self.introspection is not None
        try:
            answer = await self.introspection.ask(token)
            if answer.get("active") is not True:
                raise _Refused("introspection: token is not active")
            return self._claims(answer, "introspection", exp_required=False)
        except IdpUnavailable as e:
            return TokenUnavailable(f"identity provider unavailable: {e}")
        except _Refused as e:
            return TokenInvalid(str(e))

    # --- claims ---------------------------------------------------------------------------

    def _claims(self, claims: Mapping[str, Any], via: str, *, exp_required: bool) -> TokenValid:
        s = self.settings
        now, skew = self._clock(), s.clock_skew
        # A JWT must name the issuer; an introspection answer may leave `iss` out.
        checks_iss = s.issuer is not None and (via == "jwt" or "iss" in claims)
        if checks_iss and claims.get("iss") != s.issuer:
            raise _Refused(f"{via}: iss {_short(claims.get('iss'))} is not the issuer")
        if s.audience is not None and not _for_audience(claims, s.audience, via):
            raise _Refused(f"{via}: not for audience {s.audience!r}")
        exp = _time(claims, "exp", via)
        if exp is None and exp_required:
            raise _Refused(f"{via}: no exp")
        if exp is not None and exp + skew <= now:
            raise _Refused(f"{via}: expired {now - exp:.0f} s ago")
        nbf, iat = _time(claims, "nbf", via), _time(claims, "iat", via)
        if nbf is not None and nbf - skew > now:
            raise _Refused(f"{via}: not valid for another {nbf - now:.0f} s")
        if iat is not None and iat - skew > now:
            raise _Refused(f"{via}: issued {iat - now:.0f} s in the future")
        if exp is not None and iat is not None and exp < iat:
            raise _Refused(f"{via}: expires before it was issued")
        user = claims.get(s.username_claim)
        if not isinstance(user, str) or not user:
            raise _Refused(f"{via}: no {s.username_claim!r} claim naming the user")
        if s.username_claim == "email" and claims.get("email_verified") is False:
            raise _Refused(f"{via}: email {user[:80]!r} is not verified")
        return TokenValid(user, exp, via)


def _header(token: str) -> dict[str, Any]:
    segment = token.partition(".")[0]
    if len(segment) > MAX_HEADER * 4 // 3 + 4:
        raise _Refused("JWT header too long")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):
        raise _Refused("JWT header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise _Refused("JWT header is not a JSON object")
    return header


def _for_audience(claims: Mapping[str, Any], audience: str, via: str) -> bool:
    """`aud` is a string or a list of them (RFC 7519 4.1.3); introspection answers may name
    the client the token was issued to in `client_id` instead (RFC 7662 2.2)."""
    aud = claims.get("aud")
    if aud == audience or (isinstance(aud, list) and audience in aud):
        return True
    return via == "introspection" and claims.get("client_id") == audience


def _time(claims: Mapping[str, Any], name: str, via: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Refused(f"{via}: {name} is not a number")
    return float(value)


def _short(value: object) -> str:
    return repr(value)[:80]
