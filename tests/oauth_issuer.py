"""A real OAuth 2.0 token issuer for tests, shaped like a Keycloak realm.

Keys are generated when it starts (RSA 2048, EC P-256, Ed25519); tokens are signed with
joserfc; the OpenID configuration, the JWKS and an RFC 7662 introspection endpoint (HTTP
Basic client credentials) are served by aiohttp on 127.0.0.1, port 0, in a thread of their
own, so the code under test talks real HTTP to it from its own event loop. Keys can be
rotated, the server can fail on purpose (`mode`), and every request is counted.

    with Issuer() as idp:
        token = idp.token(email="alice@example.com")
        bad = idp.expired(email="alice@example.com")
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import warnings
from collections import Counter
from typing import Any
from urllib.parse import unquote_plus

from aiohttp import web
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OKPKey, RSAKey

REALM = "mail"
AUDIENCE = "mailgate"  # what Keycloak's audience mapper adds in docs/oauth.md
CLIENT_ID = "mailgate-introspect"
CLIENT_SECRET = "s3cr:t/ö+"  # needs RFC 6749's form-urlencoding before HTTP Basic
LIFETIME = 300  # Keycloak's default access token lifespan: 5 minutes

Key = RSAKey | ECKey | OKPKey
ALGS = {"RS256": "RSA", "PS256": "RSA", "ES256": "EC", "EdDSA": "OKP"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json64(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def new_key(kty: str, kid: str) -> Key:
    params = {"kid": kid}
    if kty == "RSA":
        return RSAKey.generate_key(2048, params)
    if kty == "EC":
        return ECKey.generate_key("P-256", params)
    return OKPKey.generate_key("Ed25519", params)


class Issuer:
    """Mode: "ok", "down" (HTTP 503), "garbage" (not JSON), "hang" (no answer until stop())."""

    def __init__(self) -> None:
        self.keys: dict[str, Key] = {}  # published, by kid
        self.current: dict[str, str] = {}  # kty -> kid signing now
        for kty in ("RSA", "EC", "OKP"):
            self.add_key(kty)
        self.opaque: dict[str, dict[str, Any]] = {}  # introspectable tokens -> claims
        self.requests: Counter[str] = Counter()  # by endpoint name
        self.mode = "ok"
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # --- the server -------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def issuer(self) -> str:
        return f"{self.base}/realms/{REALM}"

    @property
    def jwks_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/certs"

    @property
    def introspection_url(self) -> str:
        return f"{self.issuer}/protocol/openid-connect/token/introspect"

    def __enter__(self) -> Issuer:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("the test issuer did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving: later requests are refused (the IdP is down)."""
        if self._thread is None:
            return

        async def shutdown() -> None:
            assert self._runner is not None
            self._released.set()
            await self._runner.cleanup()
            # Handlers of connections a client left open: end them here, not as "Task was
            # destroyed but it is pending" when the interpreter exits.
            pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._thread = None
        self._loop.close()

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._released = asyncio.Event()
        app = web.Application()
        prefix = f"/realms/{REALM}"
        app.router.add_get(f"{prefix}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{prefix}/protocol/openid-connect/certs", self._jwks)
        app.router.add_post(f"{prefix}/protocol/openid-connect/token/introspect", self._introspect)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = self._runner.addresses[0][1]
        ready.set()
        self._loop.run_forever()

    async def _fail(self) -> web.Response | None:
        if self.mode == "down":
            return web.Response(status=503, text="maintenance")
        if self.mode == "garbage":
            return web.Response(text="<html>oops</html>", content_type="text/html")
        if self.mode == "hang":  # until the client gives up, or stop() lets go
            await self._released.wait()
        return None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.requests["discovery"] += 1
        return await self._fail() or web.json_response(
            {
                "issuer": self.issuer,
                "jwks_uri": self.jwks_url,
                "introspection_endpoint": self.introspection_url,
                "id_token_signing_alg_values_supported": list(ALGS),
            }
        )

    async def _jwks(self, request: web.Request) -> web.Response:
        self.requests["jwks"] += 1
        keys = [
            key.as_dict(private=False) | {"kid": kid, "use": "sig"}
            for kid, key in self.keys.items()
        ]
        return await self._fail() or web.json_response({"keys": keys})

    async def _introspect(self, request: web.Request) -> web.Response:
        self.requests["introspection"] += 1
        failed = await self._fail()
        if failed is not None:
            return failed
        if client_of(request.headers.get("Authorization", "")) != (CLIENT_ID, CLIENT_SECRET):
            return web.json_response({"error": "invalid_client"}, status=401)
        form = await request.post()
        claims = self.opaque.get(str(form.get("token", "")))
        if claims is None or claims.get("exp", 0) < time.time():
            return web.json_response({"active": False})
        return web.json_response({"active": True, "token_type": "Bearer"} | claims)

    # --- keys ---------------------------------------------------------------------------------

    def add_key(self, kty: str) -> str:
        kid = f"{kty.lower()}-{secrets.token_hex(4)}"
        self.keys[kid] = new_key(kty, kid)
        self.current[kty] = kid
        return kid

    def rotate(self, kty: str = "RSA", *, drop_old: bool = False) -> str:
        """Publish a new key and sign with it from now on, as an IdP's key rotation does."""
        old = self.current[kty]
        kid = self.add_key(kty)
        if drop_old:
            del self.keys[old]
        return kid

    # --- tokens -------------------------------------------------------------------------------

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": secrets.token_hex(8),
            "azp": "thunderbird",
            "iat": now,
            "exp": now + LIFETIME,
            "email": "alice@example.com",
            "email_verified": True,
            "preferred_username": "alice",
            "scope": "openid email",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        header: dict[str, Any] | None = None,
        **claims: Any,
    ) -> str:
        """A JWT signed with the current key for `alg`; `kid=""` leaves the kid out."""
        signing_kid = self.current[ALGS[alg]]
        named = signing_kid if kid is None else kid
        head = {"alg": alg, "typ": "JWT"} | ({"kid": named} if named else {}) | (header or {})
        key = self.keys[signing_kid]
        with warnings.catch_warnings():  # joserfc prefers RFC 9864's name for EdDSA
            warnings.simplefilter("ignore", SecurityWarning)
            return jwt.encode(head, self.claims(**claims), key, algorithms=[alg])

    def expired(self, **claims: Any) -> str:
        now = int(time.time())
        return self.token(**{"iat": now - 3600, "exp": now - 600} | claims)

    def not_yet_valid(self, **claims: Any) -> str:
        return self.token(**{"nbf": int(time.time()) + 600} | claims)

    def wrong_audience(self, **claims: Any) -> str:
        return self.token(**{"aud": ["account", "another-app"]} | claims)

    def wrong_issuer(self, **claims: Any) -> str:
        return self.token(**{"iss": f"{self.base}/realms/other"} | claims)

    def alg_none(self, **claims: Any) -> str:
        """An unsigned token ("alg": "none"), with a junk signature part or none at all."""
        head = _json64({"alg": "none", "typ": "JWT", "kid": self.current["RSA"]})
        return f"{head}.{_json64(self.claims(**claims))}.x"

    def hmac_with_public_key(self, **claims: Any) -> str:
        """The classic key confusion: HS256 "signed" with the RSA public key's PEM, which
        anyone can read from the JWKS, in the hope the verifier uses it as an HMAC secret."""
        kid = self.current["RSA"]
        pem = self.keys[kid].as_pem(private=False)
        signing_input = f"{_json64({'alg': 'HS256', 'typ': 'JWT', 'kid': kid})}."
        signing_input += _json64(self.claims(**claims))
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64url(mac)}"

    def tampered(self, **claims: Any) -> str:
        """A genuine token whose payload was changed afterwards (another user's email)."""
        head, _, signature = self.token(**claims).split(".")
        forged = _json64(self.claims(**claims) | {"email": "mallory@example.com"})
        return f"{head}.{forged}.{signature}"

    def opaque_token(self, **claims: Any) -> str:
        """A random string the introspection endpoint knows, as Keycloak's with claims."""
        token = secrets.token_urlsafe(32)
        self.opaque[token] = self.claims(
            **{"client_id": "thunderbird", "username": "alice"} | claims
        )
        return token


def client_of(authorization: str) -> tuple[str, str] | None:
    """The client credentials of an HTTP Basic header, decoded as RFC 6749 2.3.1 says
    (form-urlencoded inside the Basic pair), as a strict authorization server does."""
    scheme, _, encoded = authorization.partition(" ")
    if scheme != "Basic":
        return None
    try:
        pair = base64.b64decode(encoded, validate=True).decode("ascii")
    except ValueError:
        return None  # not base64, or not the ASCII that form-urlencoding leaves
    client, sep, secret = pair.partition(":")
    return (unquote_plus(client), unquote_plus(secret)) if sep else None
