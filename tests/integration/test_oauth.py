"""Token validation (auth/oauth.py) against a real issuer over HTTP (tests/oauth_issuer.py).

No clock is mocked for the tokens themselves: the issuer stamps them with the real time. The
monotonic clock of the caches and of the refetch limit is a counter the test moves, so
nothing here waits or measures time.
"""

from __future__ import annotations

import asyncio
import gc
import secrets
import types
from collections.abc import Coroutine, Iterator
from dataclasses import replace
from typing import Any

import pytest

from mailgate.auth.oauth import TokenInvalid, TokenUnavailable, TokenValid, TokenValidator
from mailgate.auth.oauth_idp import REFETCH_INTERVAL
from mailgate.config import OAuthSettings
from mailgate.values import Secret
from oauth_issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, Issuer


class Ticker:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def idp() -> Iterator[Issuer]:
    with Issuer() as issuer:
        yield issuer


def settings(idp: Issuer, **changes: Any) -> OAuthSettings:
    base = OAuthSettings(
        issuer=idp.issuer,
        audience=AUDIENCE,
        introspection_url=idp.introspection_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
        timeout=2.0,
    )
    return replace(base, **changes)


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def check(validator: TokenValidator, *tokens: str) -> list[Any]:
    return [await validator.validate(Secret(t)) for t in tokens]


def valid(result: object) -> TokenValid:
    assert isinstance(result, TokenValid), result
    return result


def invalid(result: object, why: str) -> None:
    assert isinstance(result, TokenInvalid), result
    assert why in result.reason, result.reason


# --- JWTs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256", "EdDSA"])
def test_a_good_jwt_names_its_user(idp: Issuer, alg: str) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp))
        try:
            got = valid(await v.validate(Secret(idp.token(alg=alg, email="Alice@Example.com"))))
            assert (got.user, got.via) == ("Alice@Example.com", "jwt")
            assert got.expires is not None
        finally:
            await v.close()

    run(scenario())
    # Keys found through the OpenID configuration, fetched once for all four.
    assert (idp.requests["discovery"], idp.requests["jwks"]) == (1, 1)


def test_a_configured_jwks_url_skips_discovery(idp: Issuer) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp, jwks_url=idp.jwks_url))
        try:
            valid(await v.validate(Secret(idp.token())))
        finally:
            await v.close()

    run(scenario())
    assert (idp.requests["discovery"], idp.requests["jwks"]) == (0, 1)


def test_bad_jwts_are_invalid_each_for_its_reason(idp: Issuer) -> None:
    cases = {
        "expired": idp.expired(),
        "not valid for another": idp.not_yet_valid(),
        "not for audience": idp.wrong_audience(),
        "is not the issuer": idp.wrong_issuer(),
        "alg 'none' is not allowed": idp.alg_none(),
        "alg 'HS256' is not allowed": idp.hmac_with_public_key(),
        "signature does not verify": idp.tampered(),
        "no exp": idp.token(exp=None),
        "exp is not a number": idp.token(exp="tomorrow"),
        "no 'email' claim": idp.token(email=None),
        "is not verified": idp.token(email_verified=False),
    }

    async def scenario() -> None:
        v = TokenValidator(settings(idp))
        try:
            for why, token in cases.items():
                result = await v.validate(Secret(token))
                assert isinstance(result, TokenInvalid), (why, result)
                assert why in result.reason, (why, result.reason)
                assert token not in result.reason
        finally:
            await v.close()

    run(scenario())


def test_iat_in_the_future_and_exp_before_iat(idp: Issuer) -> None:
    now = int(idp.claims()["iat"])

    async def scenario() -> None:
        v = TokenValidator(settings(idp))
        try:
            future, crossed = await check(
                v,
                idp.token(iat=now + 3600, exp=now + 7200),
                idp.token(iat=now + 30, exp=now + 10),  # both within the skew, but crossed
            )
            invalid(future, "in the future")
            invalid(crossed, "expires before it was issued")
        finally:
            await v.close()

    run(scenario())


def test_clock_skew_tolerates_a_little_drift_only(idp: Issuer) -> None:
    now = int(idp.claims()["iat"])
    just_expired = idp.token(iat=now - 600, exp=now - 30)
    early = idp.token(nbf=now + 30)

    async def scenario() -> None:
        lenient = TokenValidator(settings(idp))  # 60 s
        strict = TokenValidator(settings(idp, clock_skew=0.0))
        try:
            for result in await check(lenient, just_expired, early):
                valid(result)
            a, b = await check(strict, just_expired, early)
            invalid(a, "expired")
            invalid(b, "not valid for another")
        finally:
            await lenient.close()
            await strict.close()

    run(scenario())


def test_the_allow_list_and_the_key_type_decide_which_signatures_count(idp: Issuer) -> None:
    async def scenario() -> None:
        es_only = TokenValidator(settings(idp, algorithms=("ES256",)))
        v = TokenValidator(settings(idp))
        try:
            rs, es = await check(es_only, idp.token(alg="RS256"), idp.token(alg="ES256"))
            invalid(rs, "alg 'RS256' is not allowed")
            valid(es)
            # An ES256 header that names the RSA key: the key's type does not fit the alg.
            (mixed,) = await check(v, idp.token(alg="ES256", kid=idp.current["RSA"]))
            invalid(mixed, "is RSA, the alg needs EC")
        finally:
            await es_only.close()
            await v.close()

    run(scenario())


def test_a_token_without_kid_needs_exactly_one_candidate_key(idp: Issuer) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp))
        try:
            valid(await v.validate(Secret(idp.token(kid=""))))  # one RSA key published
        finally:
            await v.close()
        idp.rotate("RSA")  # now two
        v = TokenValidator(settings(idp))
        try:
            invalid(await v.validate(Secret(idp.token(kid=""))), "2 RSA keys to choose from")
        finally:
            await v.close()

    run(scenario())


def test_username_claim_is_configurable(idp: Issuer) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp, username_claim="preferred_username"))
        try:
            assert valid(await v.validate(Secret(idp.token()))).user == "alice"
            got = await v.validate(Secret(idp.token(preferred_username=None)))
            invalid(got, "no 'preferred_username' claim")
            # email_verified matters only when the email names the user.
            valid(await v.validate(Secret(idp.token(email_verified=False))))
        finally:
            await v.close()

    run(scenario())


# --- keys: rotation, refetch limit, outages ------------------------------------------------


def test_rotation_refetches_once_and_random_kids_cannot_make_us_hammer_the_idp(
    idp: Issuer,
) -> None:
    ticker = Ticker()

    async def scenario() -> None:
        v = TokenValidator(settings(idp), monotonic=ticker)
        assert v.keys is not None
        try:
            valid(await v.validate(Secret(idp.token())))
            assert v.keys.fetches == 1
            ticker.now += REFETCH_INTERVAL
            idp.rotate("RSA", drop_old=True)
            valid(await v.validate(Secret(idp.token())))  # new kid: fetched again, once
            assert v.keys.fetches == 2
            # A flood of made-up kids, all at once and one by one: no fetch until the
            # interval has passed, then one.
            flood = [idp.token(kid=secrets.token_hex(8)) for _ in range(20)]
            results = await asyncio.gather(*(v.validate(Secret(t)) for t in flood))
            for result in results:
                invalid(result, "unknown kid")
            assert v.keys.fetches == 2
            ticker.now += REFETCH_INTERVAL
            for result in await check(v, *flood):
                invalid(result, "unknown kid")
            assert v.keys.fetches == 3
        finally:
            await v.close()

    run(scenario())
    assert idp.requests["jwks"] == 3


@pytest.mark.parametrize("mode", ["down", "garbage", "hang", "stopped"])
def test_an_idp_that_cannot_answer_is_unavailable_never_invalid(idp: Issuer, mode: str) -> None:
    ticker = Ticker()
    tokens = [idp.token(), idp.token(alg="ES256"), idp.token(kid="made-up"), idp.token(kid="")]
    tokens.append(idp.opaque_token())
    if mode == "stopped":
        idp.stop()
    else:
        idp.mode = mode

    async def scenario() -> None:
        v = TokenValidator(settings(idp, timeout=0.3), monotonic=ticker)
        assert v.keys is not None
        try:
            # The first JWT tries to fetch the keys; the next ones, within the refetch
            # interval, do not ask again, and are unavailable all the same.
            for result in await check(v, *tokens):
                assert isinstance(result, TokenUnavailable), result
                assert "identity provider unavailable" in result.reason
            assert v.keys.fetches == 1
        finally:
            await v.close()

    run(scenario())


def test_an_unknown_kid_while_the_idp_fails_is_unavailable(idp: Issuer) -> None:
    ticker = Ticker()

    async def scenario() -> None:
        v = TokenValidator(settings(idp), monotonic=ticker)
        try:
            valid(await v.validate(Secret(idp.token())))
            idp.mode = "down"
            ticker.now += REFETCH_INTERVAL
            old = idp.token()
            idp.rotate("RSA")  # a new key the IdP cannot tell us about now
            rotated = idp.token()
            result = await v.validate(Secret(rotated))
            assert isinstance(result, TokenUnavailable), result
            valid(await v.validate(Secret(old)))  # the known key still works
            idp.mode = "ok"
            ticker.now += REFETCH_INTERVAL
            valid(await v.validate(Secret(rotated)))
        finally:
            await v.close()

    run(scenario())


def test_known_keys_outlive_an_idp_outage(idp: Issuer) -> None:
    ticker = Ticker()

    async def scenario() -> None:
        v = TokenValidator(settings(idp, jwks_cache=300.0), monotonic=ticker)
        assert v.keys is not None
        try:
            valid(await v.validate(Secret(idp.token())))
            idp.mode = "down"
            ticker.now += 301  # the cache is stale: a refetch is tried, fails, keys stay
            valid(await v.validate(Secret(idp.token())))
            assert v.keys.fetches == 2
            idp.mode = "ok"
            ticker.now += REFETCH_INTERVAL
            valid(await v.validate(Secret(idp.token())))
            assert v.keys.fetches == 3
        finally:
            await v.close()

    run(scenario())


def test_discovery_must_name_our_issuer(idp: Issuer) -> None:
    async def scenario() -> None:
        # The same server, named differently: its document names the other spelling.
        other = idp.issuer.replace("127.0.0.1", "localhost")
        v = TokenValidator(settings(idp, issuer=other, introspection_url=None))
        try:
            result = await v.validate(Secret(idp.token(iss=other)))
            assert isinstance(result, TokenUnavailable), result
            assert "its issuer is not" in result.reason
        finally:
            await v.close()

    run(scenario())


# --- introspection ----------------------------------------------------------------------------


def test_opaque_tokens_are_introspected_with_the_client_credentials(idp: Issuer) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp))
        try:
            got = valid(await v.validate(Secret(idp.opaque_token(email="bob@example.org"))))
            assert (got.user, got.via) == ("bob@example.org", "introspection")
            invalid(await v.validate(Secret("no-such-token")), "not active")
            invalid(await v.validate(Secret(idp.opaque_token(aud="other"))), "not for audience")
            # The client the token was issued to counts as its audience (RFC 7662 2.2).
            valid(await v.validate(Secret(idp.opaque_token(aud=None, client_id=AUDIENCE))))
            invalid(await v.validate(Secret(idp.opaque_token(iss="https://x"))), "issuer")
        finally:
            await v.close()
        wrong = TokenValidator(settings(idp, client_secret=Secret("guess")))
        try:
            result = await wrong.validate(Secret(idp.opaque_token()))
            assert isinstance(result, TokenUnavailable) and "HTTP 401" in result.reason
        finally:
            await wrong.close()

    run(scenario())


def test_jwts_go_to_introspection_when_no_issuer_is_set(idp: Issuer) -> None:
    token = idp.token()
    idp.opaque[token] = idp.claims()  # Keycloak introspects its JWTs too

    async def scenario() -> None:
        v = TokenValidator(settings(idp, issuer=None))
        try:
            assert valid(await v.validate(Secret(token))).via == "introspection"
        finally:
            await v.close()

    run(scenario())
    assert idp.requests["jwks"] == 0


def test_positive_introspection_is_cached_under_a_keyed_hash_only(idp: Issuer) -> None:
    ticker = Ticker()
    token = idp.opaque_token()

    async def scenario() -> None:
        v = TokenValidator(settings(idp, introspection_cache=60.0), monotonic=ticker)
        assert v.introspection is not None
        try:
            # Five connections at once ask the IdP once, and the answer is remembered.
            results = await asyncio.gather(*(v.validate(Secret(token)) for _ in range(5)))
            assert all(isinstance(r, TokenValid) for r in results)
            valid(await v.validate(Secret(token)))
            assert v.introspection.requests == 1
            assert not strings_holding(token, v.cache, v._pending)
            assert len(v.cache) == 1
            # Negative answers are not cached: each one asks again.
            for _ in range(2):
                invalid(await v.validate(Secret("not-a-token")), "not active")
            assert v.introspection.requests == 3
            ticker.now += 61
            valid(await v.validate(Secret(token)))
            assert v.introspection.requests == 4
        finally:
            await v.close()

    run(scenario())


def test_the_cache_never_outlives_the_token(idp: Issuer) -> None:
    ticker = Ticker()
    now = int(idp.claims()["iat"])
    token = idp.opaque_token(exp=now + 5)

    async def scenario() -> None:
        v = TokenValidator(settings(idp, introspection_cache=3600.0), monotonic=ticker)
        assert v.introspection is not None
        try:
            valid(await v.validate(Secret(token)))
            ticker.now += 10  # past the token's exp, well within the cache's hour
            await v.validate(Secret(token))
            assert v.introspection.requests == 2
        finally:
            await v.close()

    run(scenario())


def test_too_long_and_empty_tokens_are_refused_unread(idp: Issuer) -> None:
    async def scenario() -> None:
        v = TokenValidator(settings(idp, max_token=2048))
        try:
            invalid(await v.validate(Secret("a" * 2049)), "limit 2048")
            invalid(await v.validate(Secret("")), "token of 0 bytes")
        finally:
            await v.close()

    run(scenario())
    assert sum(idp.requests.values()) == 0


# What the walk below does not enter: through a class or a function it would reach every
# module, and from there the test's own frames, which hold the token on purpose.
_OPAQUE = (type, types.ModuleType, types.FunctionType, types.MethodType, types.CodeType)


def strings_holding(token: str, *roots: object) -> list[object]:
    """Every str or bytes reachable from `roots` through data (containers, instances,
    slots) that contains the token."""
    found, seen, todo = [], set(), list(roots)
    needle = token.encode()
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        text = isinstance(obj, str) and token in obj
        if text or (isinstance(obj, bytes | bytearray) and needle in obj):
            found.append(obj)
        elif not isinstance(obj, (str, bytes, bytearray, int, float, *_OPAQUE)):
            todo.extend(gc.get_referents(obj))
    return found


def test_strings_holding_finds_a_token_where_there_is_one() -> None:
    # The walker used above must be able to fail, through containers and slotted values.
    assert strings_holding("t0ken", {"k": ["x", ("t0ken-inside",)]})
    assert strings_holding("t0ken", TokenValid("t0ken", None, "jwt"))
    assert not strings_holding("t0ken", TokenValid("alice", None, "jwt"))
