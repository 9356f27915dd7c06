"""The SQL directory against a real SQLite file: what a logging-in client gets, and the log.

`DirectoryBehaviour` is the behaviour suite; a subclass provides `db_url`, the URL of an empty
database. This file runs it on SQLite; tests/e2e/test_directory_sql.py runs the same suite on
MariaDB and PostgreSQL. Data is written through `mailgate.admin`, as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import logging
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import argon2
import pytest
from sqlalchemy import MetaData, text

from mailgate import admin
from mailgate.auth import passwords, schema
from mailgate.auth.directory import SqlDirectory, engine_url
from mailgate.auth.schema import SCHEMA_VERSION, SchemaError, dispose, make_engine
from mailgate.config import DirectoryQueries, DirectorySettings
from mailgate.values import (
    BackendAuth,
    BackendTLS,
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
)

LOGGER = "mailgate.auth.directory"
FAILED = Reject("Authentication failed.")
SALT = "<1896.697170952@mail.example.com>"  # RFC 1939's APOP example timestamp
ALICE_PW = "my little p%ony"  # the seed article's example: space and "%"
CAROL_PW = "carol-clear"
MASTER_PW = "master-secret"
# The seed article's schema and its two queries, verbatim but for named parameters.
SEED_QUERIES = DirectoryQueries(
    password="SELECT clear AS password FROM users WHERE email = :user LIMIT 1",
    route="SELECT destination_mailstore AS host FROM transport WHERE domain = :domain LIMIT 1",
)
SEED_DDL = (
    "CREATE TABLE users (email VARCHAR(255) NOT NULL, clear VARCHAR(255))",
    "CREATE TABLE transport (domain VARCHAR(255) NOT NULL, destination_mailstore VARCHAR(255))",
)
# Undo version 4 (OAuth and app passwords): a database as versions 1 to 3 left it.
UNDO_VERSION_4 = (
    "DROP TABLE app_passwords",
    "ALTER TABLE users DROP COLUMN oauth_only",
    "ALTER TABLE mailstores DROP COLUMN oauth_login",
)
HOSTILE_NAMES = ["' OR 1=1 --", "alice@example.com' --", '" OR ""="', "%", "*", "alice@%"]


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


def cram(password: str, salt: str = SALT) -> Secret:
    return Secret(hmac.new(password.encode(), salt.encode(), hashlib.md5).hexdigest())


def apop(password: str, salt: str = SALT) -> Secret:
    return Secret(hashlib.md5((salt + password).encode()).hexdigest())


async def wipe(url: str) -> None:
    """Drop every table, so each test starts from an empty database."""
    engine = make_engine(url, 1)
    try:
        async with engine.begin() as conn:
            meta = MetaData()
            await conn.run_sync(meta.reflect)
            await conn.run_sync(meta.drop_all)
    finally:
        await dispose(engine)


async def sql(url: str, *statements: str, **params: object) -> None:
    engine = make_engine(url, 1)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement), params)
    finally:
        await dispose(engine)


async def set_stored(url: str, address: str, stored: str) -> None:
    """Add a user whose stored password is `stored` verbatim (admin would refuse some)."""
    e = make_engine(url, 1)
    try:
        await admin.add_user(e, address, Secret("placeholder"), scheme="PLAIN")
    finally:
        await dispose(e)
    await sql(url, "UPDATE users SET password = :p WHERE address = :a", p=stored, a=address)


async def add_app(engine: Any, address: str, label: str, protocols: list[str], pw: str) -> None:
    """An app password stored as {PLAIN}: quick to check, which these tests do a lot."""
    await admin.add_app_password(
        engine, address, label, protocols, password=Secret(pw), scheme="PLAIN"
    )


async def app_hashes(url: str, address: str) -> list[str]:
    """The stored app-password values of a user, oldest first."""
    e = make_engine(url, 1)
    try:
        async with e.connect() as conn:
            rows = await conn.execute(
                text("SELECT a.password FROM app_passwords a JOIN users u ON u.id = a.user_id"
                     " WHERE u.address = :a ORDER BY a.id"), {"a": address})  # fmt: skip
            return [str(row[0]) for row in rows]
    finally:
        await dispose(e)


async def list_app(url: str, address: str) -> list[admin.AppPasswordInfo]:
    e = make_engine(url, 1)
    try:
        return await admin.list_app_passwords(e, address)
    finally:
        await dispose(e)


async def populate(url: str) -> None:
    """Two mailstores and two domains, as `mailgate mailstore/domain/user add` would make them.

    store1 (10.0.0.5): own IMAP and SMTP ports, STARTTLS; example.com lives here.
    store2 (10.0.0.6): a Dovecot master user; example.org lives here.
    """
    await wipe(url)
    e = make_engine(url, 1)
    try:
        await admin.init_schema(e)
        await admin.add_mailstore(
            e, "store1", "10.0.0.5", imap_port=2143, smtp_port=2525, tls="starttls"
        )
        await admin.add_mailstore(
            e, "store2", "10.0.0.6", master_user="proxy", master_password=Secret(MASTER_PW)
        )
        await admin.add_domain(e, "example.com", "store1")
        await admin.add_domain(e, "Example.ORG", "store2")
        await admin.add_user(e, "Alice@Example.com", Secret(ALICE_PW))  # ARGON2ID
        await admin.add_user(e, "carol@example.com", Secret(CAROL_PW), scheme="PLAIN")
        await admin.add_user(e, "dave@example.org", Secret("dave-pw"), scheme="SSHA512")
    finally:
        await dispose(e)


class Env:
    """One SqlDirectory (kept across logins, as in a running server) and an admin engine."""

    def __init__(self, url: str, **settings: Any) -> None:
        self.url = url
        self.directory = SqlDirectory(DirectorySettings(url=url, **settings))
        self.engine = make_engine(url, 1)

    async def auth(
        self,
        user: str,
        secret: str | Secret,
        method: Method = Method.PLAIN,
        protocol: str = "imap",
        salt: str | None = None,
    ) -> Decision:
        secret = secret if isinstance(secret, Secret) else Secret(secret)
        if method in (Method.CRAM_MD5, Method.APOP):
            salt = salt or SALT
        creds = Credentials(method, user, secret, salt=salt)
        return await self.directory.authenticate(creds, ClientInfo("192.0.2.7", 50123, protocol))

    async def close(self) -> None:
        await self.directory.close()
        await dispose(self.engine)


@contextlib.asynccontextmanager
async def env(url: str, **settings: Any) -> AsyncIterator[Env]:
    e = Env(url, **settings)
    try:
        yield e
    finally:
        await e.close()


def route(decision: Decision) -> Route:
    assert isinstance(decision, Route), decision
    return decision


class DirectoryBehaviour:
    """The behaviour suite. Subclasses define the `db_url` fixture (an empty database)."""

    # --- successful logins -------------------------------------------------------------------

    def test_plain_and_login_route_to_the_domain_mailstore_with_the_users_password(
        self, db_url: str
    ) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                for method in (Method.PLAIN, Method.LOGIN):
                    r = route(await e.auth("ALICE@example.COM", ALICE_PW, method))
                    assert (r.host, r.port, r.tls, r.mailstore) == (
                        "10.0.0.5", 2143, BackendTLS.STARTTLS, "store1"
                    )  # fmt: skip
                    assert r.user == "alice@example.com"
                    assert r.secret.reveal() == ALICE_PW

        run(scenario())

    def test_port_follows_the_protocol_mailstore_column_else_settings(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            ports = {"imap": 143, "pop3": 1110, "smtp": 25}
            async with env(db_url, ports=ports) as e:
                got = {p: route(await e.auth("alice@example.com", ALICE_PW, protocol=p)).port
                       for p in ports}  # fmt: skip
            assert got == {"imap": 2143, "pop3": 1110, "smtp": 2525}

        run(scenario())

    def test_version_1_upgrades_and_mailstores_choose_their_smtp_login(self, db_url: str) -> None:
        async def scenario() -> None:
            await wipe(db_url)
            e = make_engine(db_url, 1)
            try:
                await admin.init_schema(e)
                # A database as version 1 left it: no smtp_login column, nothing of version 4.
                await sql(db_url, "ALTER TABLE mailstores DROP COLUMN smtp_login",
                          *UNDO_VERSION_4, "UPDATE mailgate_schema SET version = 1")  # fmt: skip
                assert await admin.upgrade_schema(e) == (1, SCHEMA_VERSION)
                assert await admin.upgrade_schema(e) == (SCHEMA_VERSION,) * 2  # idempotent
                await admin.add_mailstore(e, "mx", "10.0.0.7", smtp_login="auth")
                await admin.add_mailstore(e, "plain", "10.0.0.8")
                with pytest.raises(admin.AdminError, match="smtp login"):
                    await admin.add_mailstore(e, "bad", "10.0.0.9", smtp_login="lmtp")
                await admin.add_domain(e, "example.com", "mx")
                await admin.add_domain(e, "example.org", "plain")
                await admin.add_user(e, "a@example.com", Secret("pw-a"), scheme="PLAIN")
                await admin.add_user(e, "b@example.org", Secret("pw-b"), scheme="PLAIN")
            finally:
                await dispose(e)
            async with env(db_url) as e2:
                a = route(await e2.auth("a@example.com", "pw-a", protocol="smtp"))
                b = route(await e2.auth("b@example.org", "pw-b", protocol="smtp"))
            assert (a.smtp_mode, b.smtp_mode) == ("auth", None)

        run(scenario())

    def test_version_3_upgrades_and_a_mailstore_sends_its_logins_to_a_pool(
        self, db_url: str
    ) -> None:
        """Schema version 5: mailstores.pool names a [[pool]] that chooses the host."""

        async def scenario() -> None:
            await wipe(db_url)
            e = make_engine(db_url, 1)
            try:
                await admin.init_schema(e)
                await sql(db_url, "ALTER TABLE mailstores DROP COLUMN pool",
                          "UPDATE mailgate_schema SET version = 3")  # fmt: skip
                assert await admin.upgrade_schema(e) == (3, SCHEMA_VERSION)
                await admin.add_mailstore(e, "cluster", "10.0.0.7", pool="stores")
                with pytest.raises(admin.AdminError, match="pool name"):
                    await admin.add_mailstore(e, "bad", "10.0.0.8", pool="a b")
                await admin.add_domain(e, "example.com", "cluster")
                await admin.add_user(e, "a@example.com", Secret("pw-a"), scheme="PLAIN")
                listed = await admin.list_mailstores(e)
                assert [(m.name, m.pool) for m in listed] == [("cluster", "stores")]
            finally:
                await dispose(e)
            async with env(db_url, cache_ttl=0) as e2:
                imap = route(await e2.auth("a@example.com", "pw-a"))
                assert (imap.pool, imap.mailstore, imap.host) == ("stores", "cluster", "10.0.0.7")
                relay = route(
                    await e2.directory.authenticate(
                        Credentials(Method.NONE, "", Secret(""), smtp_to="RCPT TO:<a@example.com>"),
                        ClientInfo("192.0.2.7", 50123, "smtp"),
                    )
                )
                assert relay.pool == "stores"
                await admin.set_mailstore_pool(e2.engine, "cluster", None)
                assert route(await e2.auth("a@example.com", "pw-a")).pool is None

        run(scenario())

    @pytest.mark.parametrize("before", [2, 3])
    def test_versions_2_and_3_upgrade_to_oauth_columns_and_app_passwords(
        self, db_url: str, before: int
    ) -> None:
        async def scenario() -> None:
            await populate(db_url)
            # A database as version 2 or 3 left it: no app_passwords, oauth_only, oauth_login.
            await sql(db_url, *UNDO_VERSION_4, f"UPDATE mailgate_schema SET version = {before}")
            e = make_engine(db_url, 1)
            try:
                assert await admin.upgrade_schema(e) == (before, SCHEMA_VERSION)
                assert await admin.upgrade_schema(e) == (SCHEMA_VERSION,) * 2  # idempotent
                assert not any(u.oauth_only for u in await admin.list_users(e))
                await add_app(e, "dave@example.org", "phone", ["imap"], "dave-app")
                await admin.set_mailstore_oauth_login(e, "store2", "token")
                assert {m.name: m.oauth_login for m in await admin.list_mailstores(e)} == {
                    "store1": None, "store2": "token"
                }  # fmt: skip
            finally:
                await dispose(e)
            async with env(db_url) as e2:
                assert route(await e2.auth("dave@example.org", "dave-app")).credential_label == (
                    "phone"
                )
                assert route(await e2.auth("dave@example.org", "dave-pw")).credential_label is None
                assert route(await e2.auth("ALICE@example.COM ", ALICE_PW)).identity == (
                    "alice@example.com"
                )

        run(scenario())

    # --- app passwords and oauth-only users ------------------------------------------------

    def test_app_passwords_log_in_for_their_protocols_until_expiry_or_revocation(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        later = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                made = await admin.add_app_password(e.engine, "Dave@example.org", "phone",
                                                    ["smtp", "imap"], expires_at=later)  # fmt: skip
                assert len(made.reveal()) == 24  # generated: 5 groups of 4, with dashes
                await add_app(e.engine, "dave@example.org", "old-laptop", ["pop3"], "laptop-pw")
                for protocol in ("imap", "smtp"):
                    r = route(await e.auth("dave@example.org", made, protocol=protocol))
                    # The backend knows nothing of app passwords: the master user logs in.
                    assert (r.user, r.secret.reveal()) == ("dave@example.org*proxy", MASTER_PW)
                    assert (r.backend_auth, r.credential_label) == (BackendAuth.MASTER, "phone")
                assert await e.auth("dave@example.org", made, protocol="pop3") == FAILED
                r = route(await e.auth("dave@example.org", "laptop-pw", protocol="pop3"))
                assert r.credential_label == "old-laptop"
                assert await e.auth("dave@example.org", "laptop-pw", protocol="imap") == FAILED
                main = route(await e.auth("dave@example.org", "dave-pw"))  # still works
                assert main.credential_label is None
                # App passwords are hashes: CRAM-MD5 cannot use them.
                assert await e.auth("dave@example.org", cram("laptop-pw"), Method.CRAM_MD5,
                                    "pop3") == FAILED  # fmt: skip
                expire = "UPDATE app_passwords SET expires_at = :past WHERE label = 'phone'"
                await sql(db_url, expire, past=dt.datetime(2020, 1, 1))
                assert await e.auth("dave@example.org", made) == FAILED
                await admin.revoke_app_password(e.engine, "dave@example.org", "old-laptop")
                assert await e.auth("dave@example.org", "laptop-pw", protocol="pop3") == FAILED
            listed = await list_app(db_url, "dave@example.org")
            assert [(a.label, a.protocols, a.expired) for a in listed] == [
                ("phone", ("imap", "smtp"), True)
            ]  # fmt: skip
            assert listed[0].last_used_at is not None  # written in the background
            assert listed[0].created_at is not None and listed[0].created_at.tzinfo is not None

        run(scenario())
        assert "no app password for pop3 matched" in caplog.text
        assert "laptop-pw" not in caplog.text

    def test_oauth_only_refuses_the_main_password_only(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                await add_app(e.engine, "dave@example.org", "tb", ["imap"], "tb-pw")
                await admin.set_oauth_only(e.engine, "dave@example.org", True)
                assert [u.oauth_only for u in await admin.list_users(e.engine)] == [
                    False, False, True
                ]  # fmt: skip
                assert await e.auth("dave@example.org", "dave-pw") == FAILED
                assert route(await e.auth("dave@example.org", "tb-pw")).credential_label == "tb"
                await admin.set_oauth_only(e.engine, "dave@example.org", False)
                route(await e.auth("dave@example.org", "dave-pw"))

        run(scenario())
        assert "main password refused: the user is oauth-only" in caplog.text

    def test_app_passwords_need_a_master_user_and_are_capped(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                # alice's mailstore has no master user: her app password is right, but there
                # is nothing to log in to the backend with.
                await add_app(e.engine, "alice@example.com", "a", ["imap"], "alice-app")
                refused = await e.auth("alice@example.com", "alice-app")
                assert isinstance(refused, TempFail) and "no master user" in refused.reason
                for n in range(1, schema.MAX_APP_PASSWORDS):
                    await add_app(e.engine, "alice@example.com", f"a{n}", ["smtp"], f"x{n}")
                with pytest.raises(admin.AdminError, match="the most allowed"):
                    await admin.add_app_password(e.engine, "alice@example.com", "one-more",
                                                 ["imap"], scheme="PLAIN")  # fmt: skip
                with pytest.raises(admin.AdminError, match="already has an app password"):
                    await admin.add_app_password(e.engine, "carol@example.com", "x", ["imap"])
                    await admin.add_app_password(e.engine, "carol@example.com", "x", ["imap"])
                for bad, why in ((["ftp"], "not 'ftp'"), ([], "protocols must be")):
                    with pytest.raises(admin.AdminError, match=why):
                        await admin.add_app_password(e.engine, "carol@example.com", "y", bad)
                with pytest.raises(admin.AdminError, match="label"):
                    await admin.add_app_password(e.engine, "carol@example.com", "a b", ["imap"])
                past = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
                with pytest.raises(admin.AdminError, match="in the past"):
                    await admin.add_app_password(
                        e.engine, "carol@example.com", "z", ["imap"], expires_at=past
                    )
                await admin.remove_user(e.engine, "alice@example.com")
                assert await list_app(db_url, "carol@example.com") != []
            await sql(db_url, "DELETE FROM app_passwords WHERE label = 'x'")
            e3 = make_engine(db_url, 1)
            try:
                async with e3.connect() as conn:
                    left = (await conn.execute(text("SELECT COUNT(*) FROM app_passwords"))).scalar()
                assert left == 0  # alice's went with her
            finally:
                await dispose(e3)

        run(scenario())

    def test_a_wrong_password_costs_two_hashes_whoever_and_however_many_app_passwords(
        self, db_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Once any user has an app password, every wrong PLAIN/LOGIN password costs the main
        check and one app-password hash: a user with three (sharing one salt, as admin writes
        them), one without any, a protocol none is for, and an unknown user alike."""
        hashes: list[str] = []
        real_verify, real_raw = passwords.verify, argon2.low_level.hash_secret_raw

        def verify(stored: str, password: Secret, **kw: Any) -> bool:
            hashes.append(stored.partition("}")[0] + "}")
            return real_verify(stored, password, **kw)

        def raw(*args: Any, **kw: Any) -> bytes:
            hashes.append("{ARGON2ID} group")
            return real_raw(*args, **kw)

        def cost(decision: Decision) -> list[str]:
            made = list(hashes)
            hashes.clear()
            return made

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                assert await e.auth("carol@example.com", "wrong") == FAILED
                for label, protocols in (("a", ["imap"]), ("b", ["imap"]), ("c", ["smtp"])):
                    await admin.add_app_password(e.engine, "dave@example.org", label, protocols,
                                                 password=Secret(label + "-pw"))  # fmt: skip
            groups = {passwords.salt_group(r) for r in await app_hashes(db_url, "dave@example.org")}
            assert len(groups) == 1 and None not in groups  # one salt for all three
            monkeypatch.setattr(passwords, "verify", verify)
            monkeypatch.setattr(argon2.low_level, "hash_secret_raw", raw)
            async with env(db_url) as e:
                group = ["{SSHA512}", "{ARGON2ID} group"]
                dummy = ["{SSHA512}", "{ARGON2ID}"]
                assert cost(await e.auth("dave@example.org", "wrong")) == group
                assert cost(await e.auth("dave@example.org", "wrong", protocol="smtp")) == group
                assert cost(await e.auth("dave@example.org", "wrong", protocol="pop3")) == dummy
                assert len(cost(await e.auth("carol@example.com", "wrong"))) == 2
                assert len(cost(await e.auth("nobody@example.org", "wrong"))) == 2
                r = route(await e.auth("dave@example.org", "b-pw"))
                assert r.credential_label == "b" and cost(r) == group
                assert cost(route(await e.auth("dave@example.org", "dave-pw"))) == ["{SSHA512}"]
                # CRAM-MD5 cannot use an app password (they are hashes): no app-password hash
                # (its own check is verify_cram_md5, not counted here).
                assert cost(await e.auth("carol@example.com", cram("x"), Method.CRAM_MD5)) == []

        run(scenario())

    def test_without_any_app_password_a_wrong_password_costs_one_hash(
        self, db_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        checked: list[str] = []
        real = passwords.verify

        def spy(stored: str, password: Secret, **kw: Any) -> bool:
            checked.append(stored)
            return real(stored, password, **kw)

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                monkeypatch.setattr(passwords, "verify", spy)
                for user in ("carol@example.com", "dave@example.org", "nobody@example.org"):
                    assert await e.auth(user, "wrong") == FAILED
                    assert len(checked) == 1, user
                    checked.clear()

        run(scenario())

    def test_smtp_relay_goes_to_the_recipient_domains_mailstore(self, db_url: str) -> None:
        """Port 25 without AUTH: nginx's Auth-Method none, decided by RCPT TO's domain."""

        async def relay(e: Env, rcpt: str) -> Decision:
            creds = Credentials(
                Method.NONE,
                "",
                Secret(""),
                smtp_helo="mx.sender.example",
                smtp_from="MAIL FROM:<someone@sender.example>",
                smtp_to=rcpt,
            )
            return await e.directory.authenticate(creds, ClientInfo("192.0.2.7", 50123, "smtp"))

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                r = route(await relay(e, "RCPT TO:<Bob@EXAMPLE.org> NOTIFY=NEVER"))
                assert (r.host, r.port, r.user, r.secret.reveal()) == ("10.0.0.6", 25, "", "")
                r = route(await relay(e, "RCPT TO:<anyone@example.com>"))  # unknown users too:
                assert (r.host, r.port) == ("10.0.0.5", 2525)  # the mailstore says who exists
                denied = Reject("Relay access denied", error_code="554 5.7.1")
                assert await relay(e, "RCPT TO:<victim@elsewhere.example>") == denied
                bad = await relay(e, "RCPT TO:<not an address>")
                assert isinstance(bad, Reject) and bad.error_code == "501 5.1.3"
                await sql(db_url, "UPDATE domains SET active = :f WHERE name = 'example.com'",
                          f=False)  # fmt: skip
                assert await relay(e, "RCPT TO:<anyone@example.com>") == denied

        run(scenario())

    def test_cram_md5_and_apop_with_a_cleartext_password_pass_it_to_the_backend(
        self, db_url: str
    ) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                for method, digest in ((Method.CRAM_MD5, cram), (Method.APOP, apop)):
                    r = route(await e.auth("carol@example.com", digest(CAROL_PW), method, "pop3"))
                    assert (r.host, r.port, r.user) == ("10.0.0.5", 110, "carol@example.com")
                    assert r.secret.reveal() == CAROL_PW
                    wrong = await e.auth("carol@example.com", digest("guess"), method, "pop3")
                    assert wrong == FAILED

        run(scenario())

    def test_cram_md5_against_a_hashed_password_is_refused_with_a_clear_log_line(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                assert await e.auth("alice@example.com", cram(ALICE_PW), Method.CRAM_MD5) == FAILED
                assert await e.auth("alice@example.com", apop(ALICE_PW), Method.APOP) == FAILED

        run(scenario())
        assert (
            "cram-md5 needs a cleartext password for alice@example.com; use PLAIN or store {PLAIN}"
            in caplog.text
        )
        assert "apop needs a cleartext password for alice@example.com" in caplog.text

    def test_master_user_mailstore_logs_in_as_user_star_master(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                r = route(await e.auth("dave@EXAMPLE.org", "dave-pw"))
                assert (r.host, r.port, r.mailstore) == ("10.0.0.6", 143, "store2")
                assert r.user == "dave@example.org*proxy"
                assert r.secret.reveal() == MASTER_PW
                assert r.tls == BackendTLS.NONE
            async with env(db_url, master_separator="%") as e:
                assert route(await e.auth("dave@example.org", "dave-pw")).user == (
                    "dave@example.org%proxy"
                )

        run(scenario())

    def test_user_mailstore_overrides_the_domains_and_move_changes_it(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                await admin.add_user(e.engine, "erin@example.com", Secret("e"), mailstore="store2")
                r = route(await e.auth("erin@example.com", "e"))
                assert (r.host, r.user) == ("10.0.0.6", "erin@example.com*proxy")
                await admin.move_user(e.engine, "alice@example.com", "store2")
                assert route(await e.auth("alice@example.com", ALICE_PW)).host == "10.0.0.6"
                await admin.move_user(e.engine, "alice@example.com", "store1")
                assert route(await e.auth("alice@example.com", ALICE_PW)).host == "10.0.0.5"
                moved = {u.address: u.moved for u in await admin.list_users(e.engine)}
                assert moved["alice@example.com"] is False  # back home: override cleared
                assert moved["erin@example.com"] is True

        run(scenario())

    def test_lookup_returns_the_record_or_none(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                rec = await e.directory.lookup("Alice@Example.COM", "smtp")
                assert rec is not None
                assert (rec.user, rec.host, rec.port, rec.refused) == (
                    "alice@example.com", "10.0.0.5", 2525, None
                )  # fmt: skip
                assert "argon2" not in repr(rec)  # the stored hash is a Secret
                assert await e.directory.lookup("nobody@example.com", "imap") is None
                assert await e.directory.lookup("a\r\nb", "imap") is None

        run(scenario())

    # --- refusals: all the same to the client ----------------------------------------------

    def test_unknown_user_wrong_password_and_disabled_get_the_same_reject(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                answers = [
                    await e.auth("nobody@example.com", ALICE_PW),
                    await e.auth("alice@example.com", "wrong"),
                    await e.auth("alice@nowhere.test", ALICE_PW),
                ]
                await admin.set_user_active(e.engine, "alice@example.com", False)
                answers.append(await e.auth("alice@example.com", ALICE_PW))
                await admin.set_user_active(e.engine, "alice@example.com", True)
                await admin.set_domain_active(e.engine, "example.com", False)
                answers.append(await e.auth("alice@example.com", ALICE_PW))
                await admin.set_domain_active(e.engine, "example.com", True)
                await admin.set_mailstore_active(e.engine, "store1", False)
                answers.append(await e.auth("alice@example.com", ALICE_PW))
                await admin.set_mailstore_active(e.engine, "store1", True)
                assert answers == [FAILED] * 6
                route(await e.auth("alice@example.com", ALICE_PW))  # enabled again

        run(scenario())
        for reason in ("unknown user", "wrong password", "user disabled", "domain disabled",
                       "mailstore disabled"):  # fmt: skip
            assert reason in caplog.text
        assert ALICE_PW not in caplog.text

    def test_unknown_user_is_checked_against_a_dummy_of_its_domains_scheme(
        self, db_url: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        checked: list[str] = []
        real = passwords.verify

        def spy(stored: str, password: Secret, **kw: Any) -> bool:
            checked.append(stored)
            return real(stored, password, **kw)

        monkeypatch.setattr(passwords, "verify", spy)

        async def scenario() -> None:
            await populate(db_url)
            await sql(db_url, "DELETE FROM users WHERE address = 'alice@example.com'")
            async with env(db_url) as e:  # example.com: carol's {PLAIN}; example.org: {SSHA512}
                assert await e.auth("nobody@example.com", "x") == FAILED
                assert await e.auth("nobody@example.org", "x") == FAILED
                assert await e.auth("carol@example.com", "x") == FAILED

        run(scenario())
        assert [value[: value.index("}") + 1] for value in checked] == [
            "{PLAIN}", "{SSHA512}", "{PLAIN}"
        ]  # fmt: skip
        assert checked[0] not in ("{PLAIN}" + CAROL_PW, checked[2])  # a dummy, not carol's

    def test_empty_password_is_never_valid(self, db_url: str) -> None:
        # The seed's Perl compared "" with the undef of an unknown user and let it in.
        async def scenario() -> None:
            await populate(db_url)
            await set_stored(db_url, "empty@example.com", "{PLAIN}")
            async with env(db_url) as e:
                assert await e.auth("nobody@example.com", "") == FAILED
                assert await e.auth("empty@example.com", "") == FAILED
                assert await e.auth("alice@example.com", "") == FAILED
                assert await e.auth("", "") == FAILED

        run(scenario())

    def test_sql_looking_user_names_are_just_unknown_users(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                for name in HOSTILE_NAMES:
                    assert await e.auth(name, ALICE_PW) == FAILED, name
                    assert await e.auth(name, CAROL_PW) == FAILED, name
                route(await e.auth("alice@example.com", ALICE_PW))  # tables intact
                assert len(await admin.list_users(e.engine)) == 3

        run(scenario())

    def test_control_characters_and_overlong_names_are_refused_unlogged(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        names = ["alice@example.com\r\nX-Injected: 1", "alice\0@example.com", "a\nb", "x" * 321]

        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                for name in names:
                    assert await e.auth(name, ALICE_PW) == FAILED

        run(scenario())
        assert "X-Injected" not in caplog.text and "\0" not in caplog.text
        assert "x" * 321 not in caplog.text
        assert caplog.text.count("refused: ") == len(names)

    def test_unknown_scheme_and_malformed_hash_are_refused_and_logged_without_the_hash(
        self, db_url: str, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.INFO, logger=LOGGER)
        stored = {
            "odd@example.com": "{ROT13}frperg-unfu-inyhr",
            "bad@example.com": "{SHA256}not~base64~at~all~hash~value",
        }

        async def scenario() -> None:
            await populate(db_url)
            for address, value in stored.items():
                await set_stored(db_url, address, value)
            async with env(db_url) as e:
                for address in stored:
                    assert await e.auth(address, "typed-password") == FAILED

        run(scenario())
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "stored password of odd@example.com uses unknown scheme {ROT13}" in errors[0]
        assert "stored password of bad@example.com is not a valid {SHA256} value" in errors[1]
        for value in stored.values():
            assert value.split("}")[1] not in caplog.text
        assert "typed-password" not in caplog.text

    def test_method_none_without_a_recipient_is_refused(self, db_url: str) -> None:
        async def scenario() -> None:
            await populate(db_url)
            async with env(db_url) as e:
                refused = await e.auth("alice@example.com", ALICE_PW, Method.NONE, "smtp")
                assert isinstance(refused, Reject) and refused.error_code == "501 5.1.3"

        run(scenario())

    # --- an existing schema: the seed's postfix tables -------------------------------------

    def test_seed_schema_verbatim(self, db_url: str) -> None:
        async def scenario() -> None:
            await wipe(db_url)
            await sql(db_url, *SEED_DDL)
            await sql(
                db_url,
                "INSERT INTO users (email, clear) VALUES ('pony@example.com', 'my little p%ony')",
                "INSERT INTO users (email, clear) VALUES ('bob@example.net', '$ecret{}')",
                "INSERT INTO users (email, clear) VALUES ('empty@example.com', '')",
                "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')",
                "INSERT INTO transport VALUES ('example.net', '10.0.0.7:2143')",
            )
            ports = {"imap": 143, "pop3": 110, "smtp": 25}
            async with env(db_url, queries=SEED_QUERIES, ports=ports) as e:
                for proto, port in ports.items():
                    r = route(await e.auth("pony@EXAMPLE.com", "my little p%ony", protocol=proto))
                    assert (r.host, r.port, r.user) == ("10.0.0.5", port, "pony@example.com")
                    assert r.secret.reveal() == "my little p%ony"
                r = route(
                    await e.auth("pony@example.com", cram("my little p%ony"), Method.CRAM_MD5)
                )
                assert r.secret.reveal() == "my little p%ony"  # the seed's Auth-Pass
                r = route(await e.auth("bob@example.net", "$ecret{}"))
                assert (r.host, r.port) == ("10.0.0.7", 2143)
                assert await e.auth("pony@example.com", "my little p%25ony") == FAILED
                assert await e.auth("nobody@example.com", "") == FAILED  # the seed's hole
                assert await e.auth("empty@example.com", "") == FAILED
                for name in HOSTILE_NAMES:
                    assert await e.auth(name, "my little p%ony") == FAILED

        run(scenario())

    def test_custom_schema_user_active_and_port_columns(self, db_url: str) -> None:
        queries = DirectoryQueries(
            # "user" is a reserved word in PostgreSQL: quoted, it works everywhere.
            password='SELECT pw AS password, login AS "user", enabled AS active FROM accounts'
            " WHERE name = :user",
            route="SELECT host, port FROM routes WHERE domain = :domain AND proto = :protocol",
        )

        async def scenario() -> None:
            await wipe(db_url)
            await sql(
                db_url,
                "CREATE TABLE accounts (name VARCHAR(100), pw VARCHAR(200), login VARCHAR(100),"
                " enabled INTEGER)",
                "CREATE TABLE routes (domain VARCHAR(100), proto VARCHAR(10), host VARCHAR(100),"
                " port INTEGER)",
                "INSERT INTO accounts VALUES ('Fred@example.com', '{PLAIN}f', 'fred', 1)",
                "INSERT INTO accounts VALUES ('gone@example.com', '{PLAIN}g', NULL, 0)",
                "INSERT INTO routes VALUES ('example.com', 'imap', 'imap.example.com', 993)",
                # "\\:" is text()'s escape for a colon that is not a parameter.
                "INSERT INTO routes VALUES ('example.com', 'pop3', 'smtp:[10.1.1.1]\\:25', NULL)",
            )
            settings = {"queries": queries, "master_user": "m", "master_password": Secret("mp")}
            async with env(db_url, **settings) as e:
                r = route(await e.auth("Fred@EXAMPLE.COM", "f"))  # domain lower-cased
                assert (r.host, r.port, r.user, r.secret.reveal()) == (
                    "imap.example.com", 993, "fred*m", "mp"
                )  # fmt: skip
                r = route(await e.auth("Fred@example.com", "f", protocol="pop3"))
                assert (r.host, r.port) == ("10.1.1.1", 110)  # the transport's :25 is for SMTP
                assert await e.auth("gone@example.com", "g") == FAILED
                no_route = await e.auth("Fred@example.com", "f", protocol="smtp")
                assert isinstance(no_route, TempFail)

        run(scenario())

    def test_custom_queries_may_hold_a_literal_percent_and_colon(self, db_url: str) -> None:
        """A `%` is no parameter marker for any driver, and `\\:` is a colon (docs)."""
        queries = DirectoryQueries(
            password="SELECT clear AS password FROM users"
            " WHERE email = :user AND clear LIKE '%' LIMIT 1",
            route="SELECT destination_mailstore AS host FROM transport"
            " WHERE domain = :domain AND destination_mailstore LIKE 'smtp\\:%' LIMIT 1",
        )

        async def scenario() -> None:
            await wipe(db_url)
            await sql(db_url, *SEED_DDL, "INSERT INTO users VALUES ('bob@example.com', 'bob-pw')",
                      "INSERT INTO transport VALUES ('example.com', 'smtp:10.0.0.5')")  # fmt: skip
            async with env(db_url, queries=queries) as e:
                assert route(await e.auth("bob@example.com", "bob-pw")).host == "10.0.0.5"
                assert await e.auth("bob@example.com", "wrong") == FAILED

        run(scenario())

    # --- outages are temporary -------------------------------------------------------------

    def test_missing_tables_and_broken_queries_are_tempfail_not_reject(self, db_url: str) -> None:
        broken = DirectoryQueries(
            password="SELECT no_such_column AS password FROM users WHERE email = :user",
            route="SELECT destination_mailstore AS host FROM transport WHERE domain = :domain",
        )

        async def scenario() -> None:
            await wipe(db_url)
            async with env(db_url) as e:  # no schema at all
                assert isinstance(await e.auth("alice@example.com", ALICE_PW), TempFail)
            await sql(db_url, *SEED_DDL)
            async with env(db_url, queries=broken) as e:
                assert isinstance(await e.auth("alice@example.com", ALICE_PW), TempFail)

        run(scenario())


class TestSqliteDirectory(DirectoryBehaviour):
    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'directory.db'}"


class TestSqliteDirectoryThroughSqlAlchemy(DirectoryBehaviour):
    """A URL naming another driver is read through SQLAlchemy's engine (auth/sqlread.py's
    EngineReader), which must behave the same."""

    @pytest.fixture
    def db_url(self, tmp_path: Path) -> str:
        return f"sqlite+aiosqlite:///{tmp_path / 'directory.db'}"


# --- SQLite only --------------------------------------------------------------------------------


def test_engine_url_picks_the_asyncio_driver() -> None:
    assert engine_url("sqlite:///x.db") == "sqlite+aiosqlite:///x.db"
    assert engine_url("mysql://u:p@h/db") == "mysql+aiomysql://u:p@h/db"
    assert engine_url("mariadb://u@h/db") == "mysql+aiomysql://u@h/db"
    assert engine_url("postgresql://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert engine_url("postgresql+asyncpg://u@h/db") == "postgresql+asyncpg://u@h/db"
    with pytest.raises(ValueError, match="unsupported database 'oracle'"):
        engine_url("oracle://u@h/db")


def test_unknown_query_parameter_fails_at_start(tmp_path: Path) -> None:
    queries = DirectoryQueries(
        password="SELECT clear AS password FROM users WHERE email = :username",
        route=SEED_QUERIES.route,
    )
    with pytest.raises(SchemaError, match=r"queries.password: unknown parameter :username"):
        SqlDirectory(DirectorySettings(url=f"sqlite:///{tmp_path}/x.db", queries=queries))


def test_unreadable_database_is_tempfail(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with env(f"sqlite:///{tmp_path}/no/such/dir/x.db") as e:
            decision = await e.auth("alice@example.com", ALICE_PW)
            assert isinstance(decision, TempFail)
            assert "directory unavailable" in decision.reason

    run(scenario())


def test_locked_database_is_tempfail_within_the_timeout_then_recovers(tmp_path: Path) -> None:
    """A writer holding an exclusive lock stands in for a database that stopped answering."""
    url = f"sqlite:///{tmp_path / 'directory.db'}"

    async def scenario() -> None:
        await populate(url)
        async with env(url, query_timeout=0.3) as e:
            route(await e.auth("carol@example.com", CAROL_PW))
            locker = make_engine(url, 1)
            conn = await locker.connect()
            await conn.exec_driver_sql("BEGIN EXCLUSIVE")
            try:
                decision = await e.auth("carol@example.com", CAROL_PW)
                assert isinstance(decision, TempFail)
                assert "no answer in 0.3 s" in decision.reason
            finally:
                await conn.rollback()
                await conn.close()
                await dispose(locker)
            route(await e.auth("carol@example.com", CAROL_PW))  # same SqlDirectory, no restart

    run(scenario())
