"""Talking to the identity provider: discovery, the JWKS, RFC 7662 introspection.

Every request is bounded in time ([oauth] timeout, connect included) and in size (the
MAX_* constants), follows no redirect, and any failure of the IdP (down, slow, HTTP error,
not JSON) raises `IdpUnavailable`: the login is then a temporary failure, never a wrong
password. The keys are cached for `jwks_cache` seconds and fetched again early when a token
names a key we do not know, at most once per REFETCH_INTERVAL, so a flood of tokens with
random `kid`s costs the IdP one request per interval, not one per token. Positive
introspection answers are cached under an HMAC of the token with a key made at start, so
neither the token nor an unkeyed hash of it is ever held.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote, urlsplit

import aiohttp
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, JWKRegistry, OKPKey, RSAKey

from mailgate.config import OAuthSettings
from mailgate.values import Secret

log = logging.getLogger("mailgate.auth.oauth")

Clock = Callable[[], float]
V = TypeVar("V")
PublicKey = RSAKey | ECKey | OKPKey

# Google's JWKS is ~2 KiB, Keycloak's ~3 KiB, Microsoft's with x5c certificate chains ~20 KiB.
MAX_JWKS = 256 * 1024
MAX_KEYS = 64  # more than any IdP publishes at once (old + current + next per algorithm)
# Keycloak's OpenID configuration is the largest common one, ~8 KiB.
MAX_DISCOVERY = 64 * 1024
# An introspection answer repeats the token's claims; it is never much larger than the token.
MIN_INTROSPECTION = 64 * 1024
# A token with an unknown kid makes us fetch the keys again at most this often: an IdP
# publishes a new key before it signs with it, so one fetch finds it; a flood of made-up
# kids costs the IdP one request per 10 s per process.
REFETCH_INTERVAL = 10.0
# Positive introspection answers remembered at once (LRU); ~200 bytes each.
MAX_CACHED_TOKENS = 10_000
# RSA keys shorter than this are refused (NIST SP 800-131A has disallowed 1024-bit since 2013).
MIN_RSA_BITS = 2048
# What a key may be used for when its JWK says ("use" is optional, RFC 7517 4.2).
_SIGNING_USE = (None, "sig")
_KEY_TYPES = frozenset({"RSA", "EC", "OKP"})  # never "oct": a shared secret is no public key


class IdpUnavailable(Exception):
    """The identity provider could not give an answer we can use; safe to log."""


# --- HTTP -------------------------------------------------------------------------------------


class IdpHttp:
    """One aiohttp session for every request to the IdP, made in the loop that uses it."""

    def __init__(self, settings: OAuthSettings) -> None:
        self._timeout = settings.timeout
        self._ssl: ssl.SSLContext | bool = True
        if settings.ca_file is not None:
            self._ssl = ssl.create_default_context(cafile=str(settings.ca_file))
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def get_json(self, url: str, limit: int, what: str) -> dict[str, Any]:
        return await self._request("GET", url, limit, what)

    async def post_form(
        self, url: str, form: Mapping[str, str], auth: str, limit: int, what: str
    ) -> dict[str, Any]:
        return await self._request("POST", url, limit, what, form=form, auth=auth)

    async def _request(
        self,
        method: str,
        url: str,
        limit: int,
        what: str,
        *,
        form: Mapping[str, str] | None = None,
        auth: str | None = None,
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        try:
            async with asyncio.timeout(self._timeout):
                async with self._current().request(
                    method, url, data=form, headers=headers, allow_redirects=False, ssl=self._ssl
                ) as answer:
                    if answer.status != 200:
                        raise IdpUnavailable(f"{what}: HTTP {answer.status} from {_where(url)}")
                    body = await _read_bounded(answer, limit, what)
        except IdpUnavailable:
            raise
        except TimeoutError:
            raise IdpUnavailable(f"{what}: no answer in {self._timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as e:
            raise IdpUnavailable(f"{what}: {type(e).__name__} ({_where(url)})") from None
        try:
            document = json.loads(body)
        except ValueError:
            raise IdpUnavailable(f"{what}: the answer is not JSON") from None
        if not isinstance(document, dict):
            raise IdpUnavailable(f"{what}: the answer is not a JSON object")
        return document

    def _current(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._timeout),
                headers={"User-Agent": "mailgate"},
            )
            self._loop = loop
        return self._session

    async def close(self) -> None:
        session, self._session = self._session, None
        if session is not None and self._loop is asyncio.get_running_loop():
            await session.close()


async def _read_bounded(answer: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    if answer.content_length is not None and answer.content_length > limit:
        raise IdpUnavailable(f"{what}: answer of {answer.content_length} bytes (limit {limit})")
    body = bytearray()
    async for chunk in answer.content.iter_chunked(16 * 1024):
        body += chunk
        if len(body) > limit:
            raise IdpUnavailable(f"{what}: answer over {limit} bytes")
    return bytes(body)


def _where(url: str) -> str:
    """Scheme, host and port of a URL: enough for the log, no path or query string."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _https_or_loopback(url: object) -> bool:
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    return parts.scheme == "https" or (
        parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")
    )


# --- keys -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyLookup:
    """The key for a token's (kid, alg), or why there is none (the token is then invalid)."""

    key: PublicKey | None
    problem: str = ""


class JwksStore:
    """The issuer's signing keys by kid, fetched from `jwks_url` or found by discovery."""

    def __init__(
        self, settings: OAuthSettings, http: IdpHttp, monotonic: Clock = time.monotonic
    ) -> None:
        self._settings = settings
        self._http = http
        self._now = monotonic
        self._keys: dict[str | None, PublicKey] = {}
        self._fetched_at: float | None = None  # of the last successful fetch
        self._tried_at: float | None = None  # of the last attempt, successful or not
        self._failure: str | None = None  # why the last attempt failed; None after a success
        self._jwks_uri: str | None = None  # found by discovery, kept while it works
        self._fetching: asyncio.Future[None] | None = None
        self.fetches = 0  # attempts, for tests and metrics

    async def lookup(self, kid: str | None, kty: str) -> KeyLookup:
        """The key for a token, or why there is none. Raises IdpUnavailable when the answer
        depends on keys the IdP could not give us: none known at all, or an unknown kid while
        the IdP is failing (an outage is never a bad token)."""
        if self._stale():
            await self._refresh()
        if not self._keys:
            raise IdpUnavailable(self._failure or "no signing keys yet")
        found = self._find(kid, kty)
        if found.key is None and kid is not None and kid not in self._keys:
            if self._may_refetch():
                await self._refresh()  # rotation: the IdP may have published a new key
                found = self._find(kid, kty)
            if found.key is None and self._failure is not None:
                raise IdpUnavailable(f"unknown kid, and {self._failure}")
        return found

    def _find(self, kid: str | None, kty: str) -> KeyLookup:
        if kid is not None:
            key = self._keys.get(kid)
            if key is None:
                return KeyLookup(None, f"unknown kid {kid[:40]!r}")
            if key.key_type != kty:
                return KeyLookup(None, f"key {kid[:40]!r} is {key.key_type}, the alg needs {kty}")
            return KeyLookup(key)
        candidates = [k for k in self._keys.values() if k.key_type == kty]
        if len(candidates) != 1:
            return KeyLookup(None, f"no kid, and {len(candidates)} {kty} keys to choose from")
        return KeyLookup(candidates[0])

    def _stale(self) -> bool:
        if self._fetched_at is None:
            return self._tried_at is None or self._may_refetch()
        return self._now() - self._fetched_at >= self._settings.jwks_cache and self._may_refetch()

    def _may_refetch(self) -> bool:
        return self._tried_at is None or self._now() - self._tried_at >= REFETCH_INTERVAL

    async def _refresh(self) -> None:
        """Fetch the keys, once for everyone waiting. A failure keeps the keys we have (an
        outage must not break logins whose keys are known) and is remembered in _failure."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.ensure_future(self._fetch())
        try:
            await asyncio.shield(self._fetching)
        except IdpUnavailable as e:
            self._failure = str(e)
            log.warning("oauth: %s; %d keys known", e, len(self._keys))

    async def _fetch(self) -> None:
        self._tried_at = self._now()
        self.fetches += 1
        url = self._settings.jwks_url or self._jwks_uri or await self._discover()
        try:
            document = await self._http.get_json(url, MAX_JWKS, "JWKS")
        except IdpUnavailable:
            self._jwks_uri = None  # discover again next time: it may have moved
            raise
        keys = _import_keys(document.get("keys"))
        if not keys:
            raise IdpUnavailable("JWKS: no usable signing key")
        self._keys, self._fetched_at, self._failure = keys, self._now(), None

    async def _discover(self) -> str:
        issuer = self._settings.issuer
        assert issuer is not None  # config: JWT validation needs it
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._http.get_json(url, MAX_DISCOVERY, "OpenID configuration")
        # OpenID Connect Discovery 4.3: the document must name the issuer it was asked for.
        if document.get("issuer") != issuer:
            raise IdpUnavailable("OpenID configuration: its issuer is not [oauth] issuer")
        jwks_uri = document.get("jwks_uri")
        if not _https_or_loopback(jwks_uri):
            raise IdpUnavailable("OpenID configuration: no https jwks_uri")
        assert isinstance(jwks_uri, str)
        self._jwks_uri = jwks_uri
        return jwks_uri


def _import_keys(raw: object) -> dict[str | None, PublicKey]:
    """The public signing keys of a JWKS; keys we cannot or must not use are left out."""
    if not isinstance(raw, list):
        raise IdpUnavailable("JWKS: no 'keys' list")
    keys: dict[str | None, PublicKey] = {}
    for item in raw[:MAX_KEYS]:
        if not isinstance(item, dict) or item.get("kty") not in _KEY_TYPES:
            continue
        if item.get("use") not in _SIGNING_USE:
            continue
        kid = item.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = JWKRegistry.import_key(item)
            if key.is_private:  # a misconfigured IdP: keep only the public half
                public = key.as_dict(private=False)
                if kid is not None:
                    public["kid"] = kid
                key = JWKRegistry.import_key(public)
        except (JoseError, ValueError, TypeError) as e:
            log.warning("oauth: JWKS key %r left out: %s", str(kid)[:40], type(e).__name__)
            continue
        if isinstance(key, RSAKey) and key.raw_value.key_size < MIN_RSA_BITS:
            log.warning("oauth: JWKS key %r left out: RSA under %d bits", kid, MIN_RSA_BITS)
            continue
        if isinstance(key, RSAKey | ECKey | OKPKey):
            keys[kid] = key
    return keys


# --- introspection ----------------------------------------------------------------------------


class PositiveCache(Generic[V]):
    """Values under HMAC-SHA256(random key, token), for a while: the token itself is not kept,
    nor anything from which it could be tried offline without the key, which never leaves
    this process."""

    def __init__(self, ttl: float, size: int = MAX_CACHED_TOKENS) -> None:
        self._ttl = ttl
        self._size = size
        self._key = secrets.token_bytes(32)
        self._entries: OrderedDict[bytes, tuple[V, float]] = OrderedDict()

    def digest(self, token: Secret) -> bytes:
        data = token.reveal().encode("utf-8", "surrogateescape")
        return hmac.new(self._key, data, hashlib.sha256).digest()

    def get(self, digest: bytes, now: float) -> V | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        value, until = entry
        if until <= now:
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return value

    def put(self, digest: bytes, value: V, now: float, lifetime: float) -> None:
        """Keep `value` for the cache's ttl, or `lifetime` seconds if that is shorter."""
        ttl = min(self._ttl, lifetime)
        if ttl <= 0 or self._size <= 0:
            return
        self._entries[digest] = (value, now + ttl)
        self._entries.move_to_end(digest)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class Introspection:
    """RFC 7662: POST the token to `introspection_url`, authenticated as the configured client
    (HTTP Basic, both parts form-urlencoded first as RFC 6749 2.3.1 says)."""

    def __init__(self, settings: OAuthSettings, http: IdpHttp) -> None:
        url, client_id, secret = (
            settings.introspection_url,
            settings.client_id,
            settings.client_secret,
        )
        assert url is not None and client_id is not None and secret is not None  # config checks
        self._url = url
        pair = f"{quote(client_id, safe='')}:{quote(secret.reveal(), safe='')}"
        self._authorization = Secret("Basic " + base64.b64encode(pair.encode()).decode("ascii"))
        self._http = http
        self._limit = max(MIN_INTROSPECTION, 2 * settings.max_token)
        self.requests = 0  # for tests and metrics

    async def ask(self, token: Secret) -> dict[str, Any]:
        """The IdP's answer about `token`. Raises IdpUnavailable."""
        self.requests += 1
        form = {"token": token.reveal(), "token_type_hint": "access_token"}
        return await self._http.post_form(
            self._url, form, self._authorization.reveal(), self._limit, "introspection"
        )
