"""mailgate's auth_http client against the Perl handler the project started from.

`seed_handler` is a line-by-line Python port of mailauth.pm from the seed article (nginx's
embedded Perl, MySQL schema users(email, clear) and transport(domain, destination_mailstore)),
here on SQLite and served by aiohttp. If mailgate speaks to it the way nginx does, an existing
nginx deployment can switch to mailgate without touching its auth service.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import unquote_to_bytes

import pytest
from aiohttp import web

from mailgate.auth.http import AuthHttpClient, AuthHttpSettings
from mailgate.values import ClientInfo, Credentials, Decision, Method, Reject, Route, Secret

# --- the port of mailauth.pm ---------------------------------------------------------------

protocol_ports = {"pop3": 110, "imap": 143, "smtp": 25}


def uri_unescape(value: str) -> str:  # URI::Escape: %XX -> byte, nothing else
    return unquote_to_bytes(value).decode("utf-8", "surrogateescape")


def hmac_md5_hex(data: str, key: str) -> str:  # Digest::HMAC_MD5::hmac_md5_hex($data, $key)
    return hmac.new(key.encode(), data.encode(), hashlib.md5).hexdigest()


def seed_handler(dbh: sqlite3.Connection, header_in: dict[str, str]) -> dict[str, str]:
    header_out: dict[str, str] = {}

    auth_method = header_in.get("Auth-Method", "")
    username = uri_unescape(header_in.get("Auth-User", ""))
    password = uri_unescape(header_in.get("Auth-Pass", ""))
    salt = header_in.get("Auth-Salt", "")

    sth = dbh.execute("select clear from users where email=? limit 1", (username,))
    hash_ = sth.fetchone()
    real_password = hash_[0] if hash_ else ""  # Perl's undef compares as ""

    # Authorize user
    if (auth_method == "plain" and password == real_password) or (
        auth_method == "cram-md5" and password == hmac_md5_hex(salt, real_password)
    ):
        # Auth OK, find mail server
        domain = header_in.get("Auth-User", "")
        domain = re.sub(r"^.*@", "", domain)  # remove @ and everything before
        sth = dbh.execute(
            "select destination_mailstore from transport where domain=? limit 1", (domain,)
        )
        hash_ = sth.fetchone()
        mailserver = hash_[0] if hash_ else ""
        mailserver = mailserver.replace("smtp:", "", 1)

        header_out["Auth-User"] = username
        header_out["Auth-Pass"] = real_password
        header_out["Auth-Status"] = "OK"
        header_out["Auth-Server"] = mailserver
        header_out["Auth-Port"] = str(protocol_ports[header_in["Auth-Protocol"]])

        # Shared secret to ensure that the request comes from this script
        header_out["X-NGX-Auth-Key"] = "some secret"
    else:
        header_out["Auth-Status"] = "Invalid login or password"

    return header_out


# --- serving it ----------------------------------------------------------------------------

USER = "p%ony@example.com"
PASSWORD = "my little p%ony"
MAILSTORE = "mail1.internal"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "postfix.sqlite"
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute("create table users (email varchar(255) primary key, clear varchar(255))")
        conn.execute(
            "create table transport (domain varchar(255) primary key,"
            " destination_mailstore varchar(255))"
        )
        conn.execute("insert into users values (?, ?)", (USER, PASSWORD))
        conn.execute("insert into transport values ('example.com', ?)", (f"smtp:{MAILSTORE}",))
    return path


@contextlib.asynccontextmanager
async def seed_service(db: Path, seen: list[dict[str, str]]) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.Response:
        headers = dict(request.headers)
        seen.append(headers)
        with contextlib.closing(sqlite3.connect(db)) as dbh:
            answer = seed_handler(dbh, headers)
        return web.Response(headers=answer, content_type="text/html")

    app = web.Application()
    app.router.add_get("/auth", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/auth"
    finally:
        await runner.cleanup()


def login(db: Path, creds: Credentials, protocol: str) -> tuple[Decision, list[dict[str, str]]]:
    seen: list[dict[str, str]] = []

    async def go() -> Decision:
        async with seed_service(db, seen) as url:
            settings = AuthHttpSettings(url, headers=(("X-NGX-Auth-Key", "some secret"),))
            client = AuthHttpClient(settings)
            try:
                return await client.authenticate(creds, ClientInfo("192.0.2.7", 50000, protocol))
            finally:
                await client.close()

    return asyncio.run(go()), seen


@pytest.mark.parametrize(("protocol", "port"), [("imap", 143), ("pop3", 110), ("smtp", 25)])
def test_plain_login_routes_by_domain_and_protocol(db: Path, protocol: str, port: int) -> None:
    decision, seen = login(db, Credentials(Method.PLAIN, USER, Secret(PASSWORD)), protocol)
    assert isinstance(decision, Route)
    assert (decision.host, decision.port, decision.user) == (MAILSTORE, port, USER)
    assert decision.secret.reveal() == PASSWORD
    assert seen[0]["X-NGX-Auth-Key"] == "some secret"
    assert seen[0]["Client-IP"] == "192.0.2.7"


def test_cram_md5_gets_the_clear_password_back(db: Path) -> None:
    salt = "<1896.697170952@mailgate.example>"
    digest = hmac.new(PASSWORD.encode(), salt.encode(), hashlib.md5).hexdigest()  # the client's
    creds = Credentials(Method.CRAM_MD5, USER, Secret(digest), salt=salt)
    decision, seen = login(db, creds, "imap")
    assert seen[0]["Auth-Salt"] == salt
    assert isinstance(decision, Route)
    assert (decision.host, decision.port) == (MAILSTORE, 143)
    assert decision.secret.reveal() == PASSWORD  # Auth-Pass from the script, for the backend


@pytest.mark.parametrize(
    "creds",
    [
        Credentials(Method.PLAIN, USER, Secret("my little pony")),
        Credentials(Method.PLAIN, "nobody@example.com", Secret("x")),
        Credentials(Method.CRAM_MD5, USER, Secret("0" * 32), salt="<1.2@x>"),
    ],
    ids=["wrong password", "unknown user", "wrong cram-md5 digest"],
)
def test_wrong_credentials_are_rejected_with_the_script_message(
    db: Path, creds: Credentials
) -> None:
    decision, _ = login(db, creds, "imap")
    assert decision == Reject("Invalid login or password")
