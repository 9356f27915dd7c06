"""XOAUTH2 and OAUTHBEARER logins through the SQL directory (SQLite) with a real token issuer.

The directory is `populate`d as in test_directory_sqlite.py: store1 (example.com, alice and
carol) has no master user, store2 (example.org, dave) has one. Tokens come from
tests/oauth_issuer.py over HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Coroutine, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from integration.test_directory_sqlite import (
    FAILED,
    MASTER_PW,
    SEED_DDL,
    SEED_QUERIES,
    populate,
    route,
    sql,
)
from mailgate import admin
from mailgate.auth.directory import SqlDirectory
from mailgate.auth.schema import dispose, make_engine
from mailgate.config import DirectorySettings, OAuthSettings
from mailgate.values import (
    BackendAuth,
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    TempFail,
)
from mailgate.values import Secret as S
from oauth_issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, Issuer

LOGGER = "mailgate.auth.directory"


@pytest.fixture
def idp() -> Iterator[Issuer]:
    with Issuer() as issuer:
        yield issuer


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'directory.db'}"


def oauth(idp: Issuer, **changes: Any) -> OAuthSettings:
    return replace(
        OAuthSettings(
            issuer=idp.issuer,
            audience=AUDIENCE,
            introspection_url=idp.introspection_url,
            client_id=CLIENT_ID,
            client_secret=S(CLIENT_SECRET),
            timeout=1.0,
        ),
        **changes,
    )


class Env:
    def __init__(self, url: str, tokens: OAuthSettings | None, **directory: Any) -> None:
        self.directory = SqlDirectory(DirectorySettings(url=url, **directory), tokens)
        self.engine = make_engine(url, 1)

    async def login(
        self,
        token: str,
        user: str = "",
        method: Method = Method.XOAUTH2,
        protocol: str = "imap",
    ) -> Decision:
        creds = Credentials(method, user, S(token))
        return await self.directory.authenticate(creds, ClientInfo("192.0.2.7", 5000, protocol))

    async def close(self) -> None:
        await self.directory.close()
        await dispose(self.engine)


@contextlib.asynccontextmanager
async def env(url: str, tokens: OAuthSettings | None, **directory: Any) -> AsyncIterator[Env]:
    e = Env(url, tokens, **directory)
    try:
        yield e
    finally:
        await e.close()


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def test_the_token_names_the_user_and_the_mailstore_says_how_to_log_in(
    idp: Issuer, db_url: str
) -> None:
    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp)) as e:
            alice = idp.token(email="Alice@EXAMPLE.com")
            # store1 has no master user: the token is passed on, with the client's mechanism.
            for method, how in ((Method.XOAUTH2, BackendAuth.XOAUTH2),
                                (Method.OAUTHBEARER, BackendAuth.OAUTHBEARER)):  # fmt: skip
                r = route(await e.login(alice, "alice@example.com", method))
                assert (r.host, r.port, r.user, r.mailstore) == (
                    "10.0.0.5", 2143, "alice@example.com", "store1"
                )  # fmt: skip
                assert (r.backend_auth, r.secret.reveal()) == (how, alice)
            # store2 has one: dave's logins go in as dave*proxy, whatever the token.
            r = route(await e.login(idp.token(email="dave@example.org"), "dave@example.org"))
            assert (r.user, r.secret.reveal(), r.backend_auth) == (
                "dave@example.org*proxy", MASTER_PW, BackendAuth.MASTER
            )  # fmt: skip
            # The mailstore may ask for the token instead.
            await admin.set_mailstore_oauth_login(e.engine, "store2", "token")
            token = idp.token(email="dave@example.org")
            r = route(await e.login(token, "dave@example.org", protocol="smtp"))
            assert (r.user, r.port, r.backend_auth) == ("dave@example.org", 25, BackendAuth.XOAUTH2)
            assert r.secret.reveal() == token

    run(scenario())


def test_the_sasl_user_must_be_the_tokens_user(
    idp: Issuer, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp)) as e:
            token = idp.token(email="alice@example.com")
            route(await e.login(token, "ALICE@Example.COM"))  # names normalised alike
            route(await e.login(token, "", Method.OAUTHBEARER))  # no authzid: the token's user
            assert await e.login(token, "carol@example.com") == FAILED
            assert await e.login(token, "alice@example.com\r\nX") == FAILED

    run(scenario())
    assert "token is for alice@example.com, the client logged in as carol@example.com" in (
        caplog.text
    )


def test_a_valid_token_still_needs_an_active_directory_user(
    idp: Issuer, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)

    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp)) as e:
            assert await e.login(idp.token(email="nobody@example.com")) == FAILED
            assert await e.login(idp.token(email="no-domain")) == FAILED
            await admin.set_user_active(e.engine, "alice@example.com", False)
            assert await e.login(idp.token(email="alice@example.com")) == FAILED
            await admin.set_user_active(e.engine, "alice@example.com", True)
            await admin.set_mailstore_active(e.engine, "store1", False)
            assert await e.login(idp.token(email="alice@example.com")) == FAILED
            await admin.set_mailstore_active(e.engine, "store1", True)
            # oauth-only users are who tokens are for.
            await admin.set_oauth_only(e.engine, "alice@example.com", True)
            route(await e.login(idp.token(email="alice@example.com")))

    run(scenario())
    for reason in ("token ok (jwt) but no such user", "user disabled", "mailstore disabled"):
        assert reason in caplog.text


def test_bad_tokens_are_rejected_and_an_idp_outage_is_temporary(
    idp: Issuer, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    bad = [idp.expired(), idp.wrong_audience(), idp.alg_none(), idp.hmac_with_public_key(),
           idp.tampered(), "opaque-and-unknown"]  # fmt: skip
    good = idp.token()

    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp)) as e:
            for token in bad:
                assert await e.login(token, "alice@example.com") == FAILED, token
            route(await e.login(good, "alice@example.com"))
        idp.stop()
        async with env(db_url, oauth(idp)) as e:  # a fresh process: no keys known yet
            for token in (good, "opaque-and-unknown"):
                down = await e.login(token, "alice@example.com")
                assert isinstance(down, TempFail), down
                assert "identity provider unavailable" in down.reason

    run(scenario())
    assert caplog.text.count("token refused: ") == len(bad)
    for token in [*bad, good]:
        assert token not in caplog.text


def test_without_oauth_settings_tokens_are_refused(db_url: str, idp: Issuer) -> None:
    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, None) as e:
            assert await e.login(idp.token(), "alice@example.com") == FAILED

    run(scenario())


def test_oauth_login_master_without_a_master_user_is_a_temporary_failure(
    idp: Issuer, db_url: str
) -> None:
    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp)) as e:
            with pytest.raises(admin.AdminError, match="needs a master user"):
                await admin.set_mailstore_oauth_login(e.engine, "store1", "master")
            await sql(db_url, "UPDATE mailstores SET oauth_login = 'master' WHERE name = 'store1'")
            failed = await e.login(idp.token())
            assert isinstance(failed, TempFail) and "no master user" in failed.reason

    run(scenario())


def test_an_existing_schema_logs_token_users_in_as_the_master_user(
    idp: Issuer, db_url: str
) -> None:
    async def scenario() -> None:
        await sql(db_url, *SEED_DDL)
        await sql(
            db_url,
            "INSERT INTO users (email, clear) VALUES ('pony@example.com', 'x')",
            "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')",
        )
        master = {"master_user": "m", "master_password": S("mp")}
        async with env(db_url, oauth(idp), queries=SEED_QUERIES, **master) as e:
            r = route(await e.login(idp.token(email="pony@example.com")))
            assert (r.host, r.user, r.backend_auth) == ("10.0.0.5", "pony@example.com*m",
                                                        BackendAuth.MASTER)  # fmt: skip
            assert await e.login(idp.token(email="nobody@example.com")) == FAILED
        async with env(db_url, oauth(idp), queries=SEED_QUERIES) as e:
            r = route(await e.login(idp.token(email="pony@example.com"), method=Method.OAUTHBEARER))
            assert r.backend_auth is BackendAuth.OAUTHBEARER

    run(scenario())


def test_opaque_tokens_through_introspection(idp: Issuer, db_url: str) -> None:
    async def scenario() -> None:
        await populate(db_url)
        async with env(db_url, oauth(idp, issuer=None)) as e:
            token = idp.opaque_token(email="carol@example.com")
            r = route(await e.login(token, "carol@example.com", Method.OAUTHBEARER))
            assert (r.user, r.backend_auth) == ("carol@example.com", BackendAuth.OAUTHBEARER)
            refused = await e.login(idp.opaque_token(email="carol@example.com", aud="x"))
            assert isinstance(refused, Reject)

    run(scenario())
