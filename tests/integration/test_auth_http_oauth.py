"""OAuth logins over the nginx auth_http protocol (a mailgate extension: nginx has no OAuth).

Both ends, over real HTTP on 127.0.0.1: mailgate's auth_http client (what it sends for an
XOAUTH2 / OAUTHBEARER login and how it reads the answer) and `mailgate auth-server` (what it
takes and answers), and the two together over the built-in directory with a real token issuer:
a token route answered without Auth-Pass comes back as a token route, a master route with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from integration.test_auth_http import LOCAL, SECRET_HEADER, Recorder, aiohttp_server
from integration.test_directory_sqlite import MASTER_PW, populate
from mailgate.auth.directory import SqlDirectory
from mailgate.auth.http import AuthHttpClient, build_request_headers, parse_response
from mailgate.authserver import create_app, field_limit
from mailgate.config import AuthHttpSettings, AuthServerSettings, DirectorySettings, OAuthSettings
from mailgate.protocols.sasl import MAX_TOKEN
from mailgate.values import (
    BackendAuth,
    ClientInfo,
    Credentials,
    Decision,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
    TokenChallenge,
)
from oauth_issuer import AUDIENCE, Issuer

IMAP = ClientInfo("192.0.2.7", 50000, "imap")
TOKEN = "eyJhbGciOiJSUzI1NiJ9.eyJlbWFpbCI6ImFsaWNlQGV4YW1wbGUuY29tIn0." + "s" * 8000
XOAUTH2 = Credentials(Method.XOAUTH2, "alice@example.com", Secret(TOKEN))
OAUTHBEARER = Credentials(Method.OAUTHBEARER, "", Secret(TOKEN))
OK = {"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "143"}
CHALLENGE = TokenChallenge(
    "mail", "https://idp.example/realms/mail/.well-known/openid-configuration"
)
KEY = ("X-NGX-Auth-Key", "some secret")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def ask(url: str, creds: Credentials, oauth: OAuthSettings | None = None) -> Decision:
    client = AuthHttpClient(AuthHttpSettings(url, SECRET_HEADER, 5.0, False), oauth)
    try:
        return await client.authenticate(creds, IMAP)
    finally:
        await client.close()


# --- mailgate's auth_http client -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("creds", "method", "user"),
    [(XOAUTH2, "xoauth2", "alice@example.com"), (OAUTHBEARER, "oauthbearer", "")],
)
def test_the_request_names_the_method_and_carries_the_token(
    creds: Credentials, method: str, user: str
) -> None:
    recorder = Recorder(OK)

    async def scenario() -> None:
        async with aiohttp_server(recorder) as url:
            await ask(url, creds)

    run(scenario())
    sent = dict(recorder.requests[0])
    assert (sent["Auth-Method"], sent["Auth-User"], sent["Auth-Pass"]) == (method, user, TOKEN)
    names = [name for name, _ in recorder.requests[0]]
    assert names[:5] == ["Host", "Auth-Method", "Auth-User", "Auth-Pass", "Auth-Protocol"]


def test_a_token_is_escaped_as_any_secret() -> None:
    odd = Credentials(Method.XOAUTH2, "a b@example.com", Secret("to%ken"))
    headers = dict(build_request_headers(odd, IMAP, AuthHttpSettings("http://h/", (), 5.0, False)))
    assert (headers["Auth-User"], headers["Auth-Pass"]) == ("a%20b@example.com", "to%25ken")


@pytest.mark.parametrize("creds", [XOAUTH2, OAUTHBEARER], ids=["xoauth2", "oauthbearer"])
def test_an_answer_without_auth_pass_passes_the_token_on(creds: Credentials) -> None:
    answer = {**OK, "Auth-User": "alice@example.com"}
    decision = parse_response(200, answer, creds)
    assert isinstance(decision, Route)
    assert decision.backend_auth is BackendAuth(creds.method.value)
    assert (decision.user, decision.secret.reveal()) == ("alice@example.com", TOKEN)


def test_an_answer_with_auth_pass_is_a_password_login() -> None:
    answer = {**OK, "Auth-User": "alice@example.com*proxy", "Auth-Pass": "master-pw"}
    decision = parse_response(200, answer, XOAUTH2)
    assert isinstance(decision, Route)
    assert decision.backend_auth is BackendAuth.PASSWORD
    assert (decision.user, decision.secret.reveal()) == ("alice@example.com*proxy", "master-pw")


def test_the_answer_keeps_the_sasl_user_when_it_names_none() -> None:
    decision = parse_response(200, OK, XOAUTH2)
    assert isinstance(decision, Route) and decision.user == "alice@example.com"
    nobody = parse_response(200, OK, OAUTHBEARER)  # no authzid, no Auth-User: whom to log in?
    assert isinstance(nobody, TempFail) and "without Auth-User" in nobody.reason


def test_only_a_token_login_needs_a_user_a_relay_does_not() -> None:
    relay = Credentials(Method.NONE, "", Secret(""), smtp_to="RCPT TO:<a@example.com>")
    decision = parse_response(200, OK, relay)
    assert isinstance(decision, Route) and decision.backend_auth is BackendAuth.PASSWORD


def test_a_refused_token_carries_the_oauth_challenge_facts() -> None:
    refusal = {"Auth-Status": "Invalid token", "Auth-Wait": "1"}
    recorder = Recorder(refusal)
    settings = OAuthSettings(issuer="https://idp.example/realms/mail", scope="mail")

    async def scenario() -> tuple[Decision, Decision]:
        async with aiohttp_server(recorder) as url:
            token = await ask(url, XOAUTH2, settings)
            plain = await ask(
                url, Credentials(Method.PLAIN, "a@example.com", Secret("x")), settings
            )
            return token, plain

    token, plain = run(scenario())
    assert isinstance(token, Reject) and token.token_challenge == CHALLENGE
    assert token.message == "Invalid token" and token.wait == 1.0
    assert isinstance(plain, Reject) and plain.token_challenge is None


# --- mailgate auth-server ------------------------------------------------------------------------


class TokenDirectory:
    """Decides on the token itself: "good" routes by token or master user, anything else
    is refused; "down" is an outage."""

    def __init__(self) -> None:
        self.seen: list[Credentials] = []

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        self.seen.append(creds)
        token = creds.secret.reveal()
        if token.startswith("good-token"):
            return Route("10.0.0.5", 143, "alice@example.com", creds.secret,
                         backend_auth=BackendAuth(creds.method.value))  # fmt: skip
        if token.startswith("good-master"):
            return Route("10.0.0.6", 143, "alice@example.com*proxy", Secret("master-pw"),
                         backend_auth=BackendAuth.MASTER)  # fmt: skip
        if token == "down":
            return TempFail("IdP down")
        return Reject("Invalid token", wait=1)

    async def close(self) -> None:
        pass


@contextlib.asynccontextmanager
async def auth_server(authenticator: Any, max_token: int = MAX_TOKEN) -> AsyncIterator[str]:
    app = create_app(authenticator, AuthServerSettings("127.0.0.1:0", (KEY,)), max_token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    try:
        yield f"http://{LOCAL}:{runner.addresses[0][1]}/auth"
    finally:
        await runner.cleanup()


async def raw_ask(url: str, method: str, user: str, token: str) -> dict[str, str]:
    """Ask as a mailgate (or any nginx-protocol) client would, one HTTP/1.0 request."""
    port = int(url.split(":")[2].split("/")[0])
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(
        (
            "GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n"
            f"Auth-Method: {method}\r\nAuth-User: {user}\r\nAuth-Pass: {token}\r\n"
            "Auth-Protocol: imap\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.44\r\n"
            f"{KEY[0]}: {KEY[1]}\r\n\r\n"
        ).encode()
    )
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    return dict(line.split(": ", 1) for line in head.split("\r\n")[1:] if ": " in line)


@pytest.mark.parametrize("method", ["xoauth2", "oauthbearer"])
def test_auth_server_takes_a_max_token_and_answers_a_token_route_without_auth_pass(
    method: str,
) -> None:
    directory = TokenDirectory()
    token = "good-token." + "t" * (MAX_TOKEN - 11)

    async def scenario() -> dict[str, str]:
        async with auth_server(directory) as url:
            return await raw_ask(url, method, "alice@example.com", token)

    answer = run(scenario())
    assert answer["Auth-Status"] == "OK" and answer["Auth-Server"] == "10.0.0.5"
    assert answer["Auth-User"] == "alice@example.com"
    assert "Auth-Pass" not in answer  # the client's token goes on
    assert directory.seen[0].method is Method(method)
    assert directory.seen[0].secret.reveal() == token


def test_auth_server_master_route_answers_the_master_password() -> None:
    async def scenario() -> dict[str, str]:
        async with auth_server(TokenDirectory()) as url:
            return await raw_ask(url, "xoauth2", "alice@example.com", "good-master")

    answer = run(scenario())
    assert (answer["Auth-User"], answer["Auth-Pass"]) == ("alice@example.com*proxy", "master-pw")


def test_auth_server_oauthbearer_may_name_no_user_xoauth2_must() -> None:
    directory = TokenDirectory()

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        async with auth_server(directory) as url:
            bearer = await raw_ask(url, "oauthbearer", "", "good-token")
            xoauth2 = await raw_ask(url, "xoauth2", "", "good-token")
            return bearer, xoauth2

    bearer, xoauth2 = run(scenario())
    assert bearer["Auth-Status"] == "OK"
    assert xoauth2["Auth-Status"] == "Invalid login or password"
    assert [c.user for c in directory.seen] == [""]


def test_auth_server_refuses_a_token_past_max_token_and_outages_are_temporary() -> None:
    directory = TokenDirectory()

    async def scenario() -> list[dict[str, str]]:
        async with auth_server(directory, max_token=2048) as url:
            return [
                await raw_ask(url, "xoauth2", "a@example.com", "good-token" + "t" * 2048),
                await raw_ask(url, "xoauth2", "a@example.com", "down"),
                await raw_ask(url, "xoauth2", "a@example.com", "expired"),
            ]

    too_long, down, refused = run(scenario())
    assert too_long["Auth-Status"] == "Invalid login or password"
    assert down["Auth-Status"] == "Temporary server problem, try again later"
    assert refused["Auth-Status"] == "Invalid token"
    assert field_limit(64 * 1024) > 64 * 1024 and field_limit(1024) == 16 * 1024


# --- both ends, over the built-in directory and a real issuer -----------------------------------


@pytest.fixture
def idp() -> Iterator[Issuer]:
    with Issuer() as issuer:
        yield issuer


@pytest.mark.parametrize("store", ["example.com", "example.org"])
def test_mailgate_asks_auth_server_over_the_directory(
    store: str, idp: Issuer, tmp_path: Path
) -> None:
    """example.com's mailstore has no master user: the token goes on; example.org's has one."""
    url = f"sqlite:///{tmp_path / 'directory.db'}"
    user = "alice@example.com" if store == "example.com" else "dave@example.org"
    settings = OAuthSettings(issuer=idp.issuer, audience=AUDIENCE, timeout=2.0, scope="mail")

    async def scenario() -> list[Decision]:
        await populate(url)
        directory = SqlDirectory(DirectorySettings(url=url), settings)
        try:
            async with auth_server(directory) as server:
                good = Credentials(Method.XOAUTH2, user, Secret(idp.token(email=user)))
                bad = Credentials(Method.OAUTHBEARER, "", Secret(idp.expired(email=user)))
                return [await ask(server, good, settings), await ask(server, bad, settings)]
        finally:
            await directory.close()

    good, bad = run(scenario())
    assert isinstance(good, Route)
    if store == "example.com":
        assert good.backend_auth is BackendAuth.XOAUTH2 and good.user == user
        assert good.secret.reveal().count(".") == 2  # the JWT itself
    else:
        assert good.backend_auth is BackendAuth.PASSWORD  # Auth-Pass: a password login
        assert (good.user, good.secret.reveal()) == (user + "*proxy", MASTER_PW)
    assert isinstance(bad, Reject) and bad.token_challenge == TokenChallenge(
        "mail", settings.openid_configuration
    )
