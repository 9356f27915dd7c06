"""The auth_http server on 127.0.0.1:0, asked exactly as nginx asks (shared reference captures)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from mailgate import authserver
from mailgate.auth import passwords
from mailgate.authserver import BadInput, create_app, unescape
from mailgate.config import AuthServerSettings, parse
from mailgate.values import (
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

T = TypeVar("T")
KEY = ("X-NGX-Auth-Key", "some secret")
SETTINGS = AuthServerSettings(listen="127.0.0.1:0", required_headers=(KEY,))

# The directory of the fake authenticator: user -> (stored password, route).
USERS = {
    "p%ony@example.com": ("{PLAIN}my little p%ony", Route("10.0.0.5", 143, "p%ony", Secret("x"))),
    "alice@example.com": ("{PLAIN}alice-secret", Route("10.0.0.6", 1143, "alice", Secret("x"))),
    "bob@example.org": ('{PLAIN}bob secret "quoted"', Route("10.0.0.7", 110, "bob", Secret("x"))),
}
PASSWORDS = ["my little p%ony", "alice-secret", 'bob secret "quoted"', "wrong", "p4ss-word"]


class Directory:
    """Checks passwords with mailgate.auth.passwords; special user names give special answers."""

    def __init__(self) -> None:
        self.seen: list[tuple[Credentials, ClientInfo]] = []

    async def authenticate(self, creds: Credentials, client: ClientInfo) -> Decision:
        self.seen.append((creds, client))
        special = SPECIAL.get(creds.user)
        if special is not None:
            return special()
        if creds.method is Method.NONE:
            return Route("10.0.0.25", 25, "", Secret(""))
        stored, route = USERS.get(creds.user, (passwords.DUMMY_HASH, None))
        if creds.method is Method.CRAM_MD5:
            ok = passwords.verify_cram_md5(stored, creds.salt or "", creds.secret)
        elif creds.method is Method.APOP:
            ok = passwords.verify_apop(stored, creds.salt or "", creds.secret)
        else:
            ok = passwords.verify(stored, creds.secret)
        if route is None or not ok:
            return Reject("Invalid login or password", wait=3)
        clear = passwords.cleartext(stored) or ""
        return Route(route.host, route.port, route.user, Secret(clear))

    async def close(self) -> None:
        pass


def _raise() -> Decision:
    raise RuntimeError("bug in the authenticator p4ss-word")


SPECIAL: dict[str, Callable[[], Decision]] = {
    "down@example.com": lambda: TempFail("database down", wait=2.5),
    "downnow@example.com": lambda: TempFail("database down"),
    "short@example.com": lambda: Reject("Go away.", wait=0.2, error_code="535 5.7.8"),
    "named@example.com": lambda: Route("localhost", 143, "named", Secret("p4ss-word")),
    "nowhere@example.com": lambda: Route("no-such-host.invalid", 143, "n", Secret("p4ss-word")),
    "v6@example.com": lambda: Route("[2001:db8::5]", 993, "v6", Secret("p"), BackendTLS.IMPLICIT),
    "huge@example.com": lambda: Route("10.0.0.9", 143, "h" * 500, Secret("p" * 400)),
    "crlf@example.com": lambda: Route("10.0.0.9", 143, "evil\r\nAuth-Status: OK", Secret("p")),
    "raise@example.com": _raise,
}


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


class Server:
    def __init__(self, directory: Directory, settings: AuthServerSettings = SETTINGS) -> None:
        self.directory = directory
        self.settings = settings

    async def __aenter__(self) -> Server:
        self.runner = web.AppRunner(create_app(self.directory, self.settings))
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def raw(self, request: bytes) -> tuple[int, dict[str, str], bytes]:
        """Send bytes as nginx does (HTTP/1.0, one connection); parse the answer's head."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        head = answer.split(b"\r\n\r\n", 1)[0]
        status_line, *lines = head.decode("utf-8", "replace").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines if ": " in line)
        return int(status_line.split()[1]), headers, answer

    async def ask(self, **fields: str) -> dict[str, str]:
        status, headers, _ = await self.raw(request(**fields))
        assert status == 200
        return headers


def request(
    method: str = "plain",
    user: str = "alice@example.com",
    password: str = "alice-secret",
    protocol: str = "imap",
    extra: str = "",
    key: str = "some secret",
) -> bytes:
    return (
        "GET /auth HTTP/1.0\r\nHost: 127.0.0.1\r\n"
        f"Auth-Method: {method}\r\nAuth-User: {user}\r\nAuth-Pass: {password}\r\n"
        f"Auth-Protocol: {protocol}\r\nAuth-Login-Attempt: 1\r\nClient-IP: 192.0.2.44\r\n"
        f"{extra}X-NGX-Auth-Key: {key}\r\n\r\n"
    ).encode("utf-8", "surrogateescape")


# --- the captures --------------------------------------------------------------------------------

REFERENCE = Path(__file__).resolve().parents[3] / "shared" / "reference" / "nginx-auth-http.md"
# The captures of that reference, verbatim (nginx 1.22.1; each line ends in CRLF on the wire).
CAPTURE_HEAD = "GET /auth HTTP/1.0\nHost: 127.0.0.1\n"
CAPTURE_TAIL = "Auth-Login-Attempt: 1\nClient-IP: 127.0.0.1\n"
TLS = "Auth-SSL: on\nAuth-SSL-Protocol: TLSv1.2\nAuth-SSL-Cipher: ECDHE-RSA-AES256-GCM-SHA384\n"
SMTP_HOST = "Client-Host: [UNAVAILABLE]\n"
KEY_LINE = "X-NGX-Auth-Key: some secret\n"


def _capture(
    method: str, user: str, password: str, protocol: str, salt: str = "", after: str = ""
) -> str:
    salt_line = f"Auth-Salt: {salt}\n" if salt else ""
    return (
        f"{CAPTURE_HEAD}Auth-Method: {method}\nAuth-User: {user}\nAuth-Pass: {password}\n"
        f"{salt_line}Auth-Protocol: {protocol}\n{CAPTURE_TAIL}{after}{KEY_LINE}"
    )


CAPTURES = {
    "imap LOGIN (plain text, STARTTLS port, no TLS)": _capture(
        "plain", "p%25ony@example.com", "my%20little%20p%25ony", "imap"),
    "imap LOGIN wrong password": _capture("plain", "alice@example.com", "wrong", "imap"),
    "imap AUTHENTICATE PLAIN (implicit TLS)": _capture(
        "plain", "alice@example.com", "alice-secret", "imap", after=TLS),
    "imap AUTHENTICATE LOGIN": _capture("plain", "alice@example.com", "alice-secret", "imap"),
    "imap AUTHENTICATE CRAM-MD5": _capture(
        "cram-md5", "alice@example.com", "aa1affb28c2a60fabc4f5233755f6b46", "imap",
        salt="<147404414.1795606787@vm>"),
    "pop3 USER/PASS after STLS": _capture(
        "plain", "bob@example.org", 'bob%20secret%20"quoted"', "pop3", after=TLS),
    "pop3 APOP": _capture(
        "apop", "alice@example.com", "8bb62c1dd205a875145f0875d8c26e33", "pop3",
        salt="<539771754.1795606787@vm>"),
    "smtp AUTH PLAIN (submission)": _capture(
        "plain", "alice@example.com", "alice-secret", "smtp", after=SMTP_HOST),
    "smtp relay, smtp_auth none (after RCPT TO)": _capture(
        "none", "", "", "smtp",
        after=SMTP_HOST + "Auth-SMTP-Helo: mx.sender.example\n"
        "Auth-SMTP-From: MAIL FROM:<someone@sender.example>\n"
        "Auth-SMTP-To: RCPT TO:<alice@example.com>\n"),
}  # fmt: skip


def captures() -> dict[str, bytes]:
    return {t: (c.replace("\n", "\r\n") + "\r\n").encode() for t, c in CAPTURES.items()}


@pytest.mark.skipif(not REFERENCE.exists(), reason="shared/reference is not beside the repository")
def test_captures_match_the_reference() -> None:
    blocks: dict[str, str] = {}
    title, block = "", None
    for line in REFERENCE.read_text().splitlines():
        if line.startswith("### "):
            title = line[4:]
        elif line == "```":
            if block is None:
                block = list[str]()
            else:
                blocks[title] = "".join(b + "\n" for b in block)
                block = None
        elif block is not None:
            block.append(line)
    assert blocks == CAPTURES


EXPECTED = {
    # title: (Auth-Status, user seen, password seen, method, Auth-User/Auth-Pass answered)
    "imap LOGIN (plain text, STARTTLS port, no TLS)": (
        "OK", "p%ony@example.com", "my little p%ony", Method.PLAIN, ("p%ony", "my little p%ony")),
    "imap LOGIN wrong password": (
        "Invalid login or password", "alice@example.com", "wrong", Method.PLAIN, None),
    "imap AUTHENTICATE PLAIN (implicit TLS)": (
        "OK", "alice@example.com", "alice-secret", Method.PLAIN, ("alice", "alice-secret")),
    "imap AUTHENTICATE LOGIN": (
        "OK", "alice@example.com", "alice-secret", Method.PLAIN, ("alice", "alice-secret")),
    "imap AUTHENTICATE CRAM-MD5": (
        "OK", "alice@example.com", "aa1affb28c2a60fabc4f5233755f6b46", Method.CRAM_MD5,
        ("alice", "alice-secret")),
    "pop3 USER/PASS after STLS": (
        "OK", "bob@example.org", 'bob secret "quoted"', Method.PLAIN,
        ("bob", 'bob secret "quoted"')),
    "pop3 APOP": (
        "OK", "alice@example.com", "8bb62c1dd205a875145f0875d8c26e33", Method.APOP,
        ("alice", "alice-secret")),
    "smtp AUTH PLAIN (submission)": (
        "OK", "alice@example.com", "alice-secret", Method.PLAIN, ("alice", "alice-secret")),
    "smtp relay, smtp_auth none (after RCPT TO)": ("OK", "", "", Method.NONE, ("", "")),
}  # fmt: skip


def test_every_reference_capture() -> None:
    blocks = captures()
    assert set(blocks) == set(EXPECTED)

    async def go() -> None:
        directory = Directory()
        async with Server(directory) as server:
            for title, raw in blocks.items():
                status_text, user, password, method, answer = EXPECTED[title]
                status, headers, whole = await server.raw(raw)
                head = whole.split(b"\r\n\r\n")[0]
                assert status == 200, title
                assert len(head) + 4 <= 1024, title  # nginx's whole answer buffer
                assert headers["Auth-Status"] == status_text, title
                creds, client = directory.seen[-1]
                assert (creds.user, creds.secret.reveal(), creds.method) == (user, password, method)
                assert client.ip == "127.0.0.1" and client.protocol == title.split()[0]
                if answer is not None:
                    assert (headers["Auth-User"], headers["Auth-Pass"]) == answer, title
                    assert headers["Auth-Server"].startswith("10.0.0.")
                    assert headers["Auth-Port"].isdigit()
                else:
                    assert headers["Auth-Wait"] == "3"
                    assert "Auth-Server" not in headers

    run(go())


def test_capture_details_reach_the_authenticator() -> None:
    blocks = captures()

    async def go() -> dict[str, tuple[Credentials, ClientInfo]]:
        directory = Directory()
        seen = {}
        async with Server(directory) as server:
            for title, raw in blocks.items():
                await server.raw(raw)
                seen[title] = directory.seen[-1]
        return seen

    seen = run(go())
    tls_client = seen["imap AUTHENTICATE PLAIN (implicit TLS)"][1]
    assert tls_client.tls is not None
    assert (tls_client.tls.protocol, tls_client.tls.cipher) == (
        "TLSv1.2",
        "ECDHE-RSA-AES256-GCM-SHA384",
    )
    assert seen["imap LOGIN wrong password"][1].tls is None
    cram = seen["imap AUTHENTICATE CRAM-MD5"][0]
    assert cram.salt == "<147404414.1795606787@vm>"
    assert seen["imap LOGIN wrong password"][0].salt is None
    relay, relay_client = seen["smtp relay, smtp_auth none (after RCPT TO)"]
    assert relay.smtp_helo == "mx.sender.example"
    assert relay.smtp_from == "MAIL FROM:<someone@sender.example>"
    assert relay.smtp_to == "RCPT TO:<alice@example.com>"
    assert relay_client.host is None  # "[UNAVAILABLE]"
    assert all(c.attempt == 1 for c, _ in seen.values())


# --- the shared secret ---------------------------------------------------------------------------


def test_requests_without_the_shared_secret_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.authserver")

    async def go() -> None:
        directory = Directory()
        async with Server(directory) as server:
            for bad in (
                request(key="wrong secret"),
                request(key="some secret ").replace(b"X-NGX", b"X-Other"),
            ):
                status, headers, _ = await server.raw(bad)
                assert status == 403
                assert "Auth-Status" not in headers
            assert directory.seen == []
            assert (await server.ask())["Auth-Status"] == "OK"

    run(go())
    refusals = [r for r in caplog.records if "required header" in r.getMessage()]
    assert len(refusals) == 2
    assert "wrong secret" not in caplog.text


def test_no_required_headers_configured_accepts_all() -> None:
    async def go() -> None:
        async with Server(Directory(), AuthServerSettings()) as server:
            status, headers, _ = await server.raw(request(key="anything"))
            assert status == 200 and headers["Auth-Status"] == "OK"

    run(go())


# --- decisions -----------------------------------------------------------------------------------


def test_decision_mappings() -> None:
    async def go() -> None:
        async with Server(Directory()) as server:
            temp = await server.ask(user="down@example.com")
            assert temp == temp | {"Auth-Status": authserver.TEMPORARY, "Auth-Wait": "3"}
            assert "Auth-Error-Code" not in temp
            temp_smtp = await server.ask(user="down@example.com", protocol="smtp")
            assert temp_smtp["Auth-Error-Code"] == "451 4.3.0"
            # A wait of 0 is sent as 1: nginx closes the session on a missing or zero wait.
            assert (await server.ask(user="downnow@example.com"))["Auth-Wait"] == "1"
            short = await server.ask(user="short@example.com")
            assert (short["Auth-Status"], short["Auth-Wait"]) == ("Go away.", "1")
            assert "Auth-Error-Code" not in short  # nginx uses error codes for SMTP only
            short_smtp = await server.ask(user="short@example.com", protocol="smtp")
            assert short_smtp["Auth-Error-Code"] == "535 5.7.8"
            named = await server.ask(user="named@example.com")
            assert named["Auth-Server"] in ("127.0.0.1", "::1")  # nginx needs an address
            assert (named["Auth-User"], named["Auth-Pass"]) == ("named", "p4ss-word")
            v6 = await server.ask(user="v6@example.com")
            assert (v6["Auth-Server"], v6["Auth-Port"]) == ("2001:db8::5", "993")
            for user in ("nowhere", "huge", "crlf", "raise"):
                answer = await server.ask(user=f"{user}@example.com")
                assert answer["Auth-Status"] == authserver.TEMPORARY, user
                assert "Auth-Server" not in answer

    run(go())


def test_healthz() -> None:
    async def go() -> None:
        async with (
            Server(Directory()) as server,
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{server.port}/healthz") as resp,
        ):
            assert resp.status == 200

    run(go())


def test_through_aiohttp_client() -> None:
    async def go() -> None:
        async with Server(Directory()) as server, aiohttp.ClientSession() as session:
            headers = {
                "Auth-Method": "login",
                "Auth-User": "p%25ony@example.com",
                "Auth-Pass": "my%20little%20p%25ony",
                "Auth-Protocol": "smtp",
                "Client-IP": "2001:db8::1",
                KEY[0]: KEY[1],
            }
            async with session.get(
                f"http://127.0.0.1:{server.port}/any/path", headers=headers
            ) as r:
                assert r.status == 200
                assert r.headers["Auth-Status"] == "OK"
                assert r.headers["Auth-Pass"] == "my little p%ony"
            creds, client = server.directory.seen[-1]
            assert creds.method is Method.LOGIN and client.ip == "2001:db8::1"

    run(go())


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"user": "alice%0D%0AAuth-Status:%20OK@example.com"},
        {"user": "alice%00@example.com"},
        {"user": "alice%0A"},
        {"user": "alice%2"},
        {"user": "alice%zz"},
        {"password": "100%"},
        {"user": ""},
        {"method": "external"},
        {"method": "cram-md5", "password": "aa1affb28c2a60fabc4f5233755f6b46"},  # no Auth-Salt
        {"extra": "Auth-User: mallory@example.com\r\n"},  # a second Auth-User
        {"extra": "Auth-Login-Attempt: x\r\n"},
        {"user": "u" * 2000},
    ],
)
def test_bad_input_is_an_invalid_login(fields: dict[str, str]) -> None:
    async def go() -> None:
        directory = Directory()
        async with Server(directory) as server:
            status, headers, whole = await server.raw(request(**fields))
            assert status == 200
            assert headers["Auth-Status"] == "Invalid login or password"
            assert b"Traceback" not in whole
            assert directory.seen == []

    run(go())


@pytest.mark.parametrize(
    "raw",
    [
        request().replace(b"Auth-Protocol: imap\r\n", b""),
        request().replace(b"Auth-Method: plain\r\n", b""),
        request(protocol="gopher"),
        request().replace(b"Client-IP: 192.0.2.44", b"Client-IP: not-an-address"),
        request(extra="X-Huge: " + "h" * 20000 + "\r\n"),
        request(extra="".join(f"X-{i}: {i}\r\n" for i in range(100))),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,  # a TLS hello
        b"GET /auth HTTP/1.0\r\nAuth-User: a\r\n b\r\n\r\n",  # folded header
    ],
)
def test_malformed_requests_get_an_http_error(raw: bytes) -> None:
    async def go() -> None:
        directory = Directory()
        async with Server(directory) as server:
            status, headers, whole = await server.raw(raw)
            assert 400 <= status < 500
            assert "Auth-Server" not in headers
            assert b"Traceback" not in whole
            assert directory.seen == []

    run(go())


def test_no_password_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)

    async def go() -> None:
        async with Server(Directory()) as server:
            for raw in captures().values():
                await server.raw(raw)
            for user in [*SPECIAL, "alice@example.com", "nobody@example.com"]:
                await server.ask(user=user, password="p4ss-word")
                await server.ask(user=user, password="p4ss-word", protocol="smtp")
            await server.raw(request(user="bad%zz", password="p4ss-word"))
            await server.raw(request(password="p4ss-word" * 3000))  # over the header limit
            await server.raw(request(password="p4ss-word\r\n folded"))

    run(go())
    assert "auth-server: imap plain user='alice@example.com'" in caplog.text
    digests = ["aa1affb28c2a60fabc4f5233755f6b46", "8bb62c1dd205a875145f0875d8c26e33"]
    for password in [*PASSWORDS, *digests]:
        assert password not in caplog.text, password


# --- percent-decoding ----------------------------------------------------------------------------


# ngx_escape_uri(NGX_ESCAPE_MAIL_AUTH): control bytes, space and "%" (src/core/ngx_string.c).
def nginx_escape(raw: bytes) -> str:
    out = "".join(f"%{b:02X}" if b < 0x21 or b == 0x25 else chr(b) for b in raw)
    return out.encode("latin-1").decode("utf-8", "surrogateescape")


@given(st.binary(max_size=200))
def test_unescape_inverts_nginx_escaping(raw: bytes) -> None:
    assert unescape(nginx_escape(raw)).encode("utf-8", "surrogateescape") == raw


def test_unescape_examples() -> None:
    assert unescape("my%20little%20p%25ony") == "my little p%ony"
    assert unescape('a+b"c') == 'a+b"c'  # nginx leaves "+" and quotes alone
    assert unescape("%c3%a4%C3%A4") == "ää"
    assert unescape("%FF") == "\udcff"  # not UTF-8: kept byte-exact
    for bad in ("%", "%2", "%g0", "a%%20"):
        with pytest.raises(BadInput):
            unescape(bad)


# --- serve() -------------------------------------------------------------------------------------


def test_serve_binds_the_configured_address_until_cancelled() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = parse(
        {"auth_server": {"listen": f"127.0.0.1:{port}", "required_header": {KEY[0]: KEY[1]}}},
        base_dir=Path("."),
    )

    async def go() -> None:
        task = asyncio.create_task(authserver.serve(settings, Directory()))
        try:
            for _ in range(100):
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            writer.write(request())
            answer: Any = await reader.read()
            writer.close()
            assert b"Auth-Status: OK" in answer
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run(go())
