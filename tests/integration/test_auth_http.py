"""The auth_http client against real HTTP servers on 127.0.0.1.

Requests are compared with what nginx 1.22 really sent (the captures in the project's
reference notes, copied below). The one difference is the request line: mailgate speaks
HTTP/1.1 with keep-alive, nginx HTTP/1.0 with a connection per login. The Host header carries
no port, exactly as nginx sends it, so aiohttp adds nothing of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib.util
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mailgate.auth.http import (
    MAX_WAIT,
    AuthHttpClient,
    AuthHttpSettings,
    build_request_headers,
    escape_mail_auth,
    parse_response,
)
from mailgate.values import (
    ClientInfo,
    Credentials,
    Method,
    Reject,
    Route,
    Secret,
    TempFail,
    TlsInfo,
)

SECRET_HEADER = (("X-NGX-Auth-Key", "some secret"),)
LOCAL = "127.0.0.1"
TLS12 = TlsInfo(protocol="TLSv1.2", cipher="ECDHE-RSA-AES256-GCM-SHA384")

# --- the captures (request headers after the request line, in order) -----------------------

CAPTURES: dict[str, tuple[Credentials, ClientInfo, str]] = {
    "imap LOGIN p%ony": (
        Credentials(Method.PLAIN, "p%ony@example.com", Secret("my little p%ony")),
        ClientInfo(LOCAL, 40000, "imap"),
        """\
Host: 127.0.0.1
Auth-Method: plain
Auth-User: p%25ony@example.com
Auth-Pass: my%20little%20p%25ony
Auth-Protocol: imap
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
X-NGX-Auth-Key: some secret""",
    ),
    "imap AUTHENTICATE PLAIN implicit TLS": (
        Credentials(Method.PLAIN, "alice@example.com", Secret("alice-secret")),
        ClientInfo(LOCAL, 40000, "imap", tls=TLS12),
        """\
Host: 127.0.0.1
Auth-Method: plain
Auth-User: alice@example.com
Auth-Pass: alice-secret
Auth-Protocol: imap
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
Auth-SSL: on
Auth-SSL-Protocol: TLSv1.2
Auth-SSL-Cipher: ECDHE-RSA-AES256-GCM-SHA384
X-NGX-Auth-Key: some secret""",
    ),
    "imap AUTHENTICATE LOGIN": (
        Credentials(Method.LOGIN, "alice@example.com", Secret("alice-secret")),
        ClientInfo(LOCAL, 40000, "imap"),
        """\
Host: 127.0.0.1
Auth-Method: plain
Auth-User: alice@example.com
Auth-Pass: alice-secret
Auth-Protocol: imap
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
X-NGX-Auth-Key: some secret""",
    ),
    "imap AUTHENTICATE CRAM-MD5": (
        Credentials(
            Method.CRAM_MD5,
            "alice@example.com",
            Secret("aa1affb28c2a60fabc4f5233755f6b46"),
            salt="<147404414.1795606787@vm>",
        ),
        ClientInfo(LOCAL, 40000, "imap"),
        """\
Host: 127.0.0.1
Auth-Method: cram-md5
Auth-User: alice@example.com
Auth-Pass: aa1affb28c2a60fabc4f5233755f6b46
Auth-Salt: <147404414.1795606787@vm>
Auth-Protocol: imap
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
X-NGX-Auth-Key: some secret""",
    ),
    "pop3 USER/PASS after STLS": (
        Credentials(Method.PLAIN, "bob@example.org", Secret('bob secret "quoted"')),
        ClientInfo(LOCAL, 40000, "pop3", tls=TLS12),
        """\
Host: 127.0.0.1
Auth-Method: plain
Auth-User: bob@example.org
Auth-Pass: bob%20secret%20"quoted"
Auth-Protocol: pop3
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
Auth-SSL: on
Auth-SSL-Protocol: TLSv1.2
Auth-SSL-Cipher: ECDHE-RSA-AES256-GCM-SHA384
X-NGX-Auth-Key: some secret""",
    ),
    "pop3 APOP": (
        Credentials(
            Method.APOP,
            "alice@example.com",
            Secret("8bb62c1dd205a875145f0875d8c26e33"),
            salt="<539771754.1795606787@vm>",
        ),
        ClientInfo(LOCAL, 40000, "pop3"),
        """\
Host: 127.0.0.1
Auth-Method: apop
Auth-User: alice@example.com
Auth-Pass: 8bb62c1dd205a875145f0875d8c26e33
Auth-Salt: <539771754.1795606787@vm>
Auth-Protocol: pop3
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
X-NGX-Auth-Key: some secret""",
    ),
    "smtp AUTH PLAIN": (
        Credentials(Method.PLAIN, "alice@example.com", Secret("alice-secret")),
        ClientInfo(LOCAL, 40000, "smtp"),
        """\
Host: 127.0.0.1
Auth-Method: plain
Auth-User: alice@example.com
Auth-Pass: alice-secret
Auth-Protocol: smtp
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
Client-Host: [UNAVAILABLE]
X-NGX-Auth-Key: some secret""",
    ),
    # nginx sends the empty user and password as "Auth-User: " ("\x20": the trailing space).
    "smtp relay, auth none": (
        Credentials(
            Method.NONE,
            "",
            Secret(""),
            smtp_helo="mx.sender.example",
            smtp_from="MAIL FROM:<someone@sender.example>",
            smtp_to="RCPT TO:<alice@example.com>",
        ),
        ClientInfo(LOCAL, 40000, "smtp"),
        """\
Host: 127.0.0.1
Auth-Method: none
Auth-User:\x20
Auth-Pass:\x20
Auth-Protocol: smtp
Auth-Login-Attempt: 1
Client-IP: 127.0.0.1
Client-Host: [UNAVAILABLE]
Auth-SMTP-Helo: mx.sender.example
Auth-SMTP-From: MAIL FROM:<someone@sender.example>
Auth-SMTP-To: RCPT TO:<alice@example.com>
X-NGX-Auth-Key: some secret""",
    ),
}

PLAIN = Credentials(Method.PLAIN, "alice@example.com", Secret("alice-secret"))
CRAM = Credentials(Method.CRAM_MD5, "alice@example.com", Secret("0" * 32), salt="<1.2@vm>")
IMAP = ClientInfo(LOCAL, 40000, "imap")


def lines(capture: str) -> list[tuple[str, str]]:
    return [tuple(line.split(": ", 1)) for line in capture.splitlines()]  # type: ignore[misc]


# --- servers -------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@contextlib.asynccontextmanager
async def aiohttp_server(handler: Handler) -> AsyncIterator[str]:
    async def handle(request: web.Request) -> web.StreamResponse:
        return await handler(request)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://{LOCAL}:{port}/auth"
    finally:
        await runner.cleanup()


class Recorder:
    """Records each request's raw headers and answers with the configured ones."""

    def __init__(self, answer: dict[str, str] | None = None, status: int = 200) -> None:
        self.answer = answer or {"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "143"}
        self.status = status
        self.requests: list[list[tuple[str, str]]] = []
        self.peers: list[Any] = []
        self.lines: list[str] = []

    async def __call__(self, request: web.Request) -> web.Response:
        raw = [(k.decode(), v.decode("utf-8", "surrogateescape")) for k, v in request.raw_headers]
        self.requests.append(raw)
        v = request.version
        self.lines.append(f"{request.method} {request.path_qs} HTTP/{v.major}.{v.minor}")
        assert request.transport is not None
        self.peers.append(request.transport.get_extra_info("peername"))
        return web.Response(status=self.status, headers=self.answer)


@contextlib.asynccontextmanager
async def raw_server(answer: bytes | None) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A TCP server that records the request head and answers `answer` as is (None: hang)."""
    heads: list[bytes] = []
    never = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            heads.append(await reader.readuntil(b"\r\n\r\n"))
            if answer is None:
                await never.wait()  # hang until the test is over
            else:
                writer.write(answer)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://{LOCAL}:{port}/auth", heads
    finally:
        server.close()
        never.set()


async def ask(
    url: str,
    creds: Credentials = PLAIN,
    client: ClientInfo = IMAP,
    timeout: float = 5.0,
    pass_client_cert: bool = False,
) -> Any:
    auth = AuthHttpClient(AuthHttpSettings(url, SECRET_HEADER, timeout, pass_client_cert))
    try:
        return await auth.authenticate(creds, client)
    finally:
        await auth.close()


async def ask_recorded(recorder: Recorder, creds: Credentials = PLAIN, **kw: Any) -> Any:
    async with aiohttp_server(recorder) as url:
        return await ask(url, creds, **kw)


# --- the request ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CAPTURES))
def test_request_matches_nginx_capture(name: str) -> None:
    creds, client, capture = CAPTURES[name]
    recorder = Recorder()
    asyncio.run(ask_recorded(recorder, creds, client=client))
    assert recorder.lines == ["GET /auth HTTP/1.1"]
    assert recorder.requests == [lines(capture)]


@pytest.mark.parametrize("name", list(CAPTURES))
def test_request_bytes_match_nginx_capture(name: str) -> None:
    creds, client, capture = CAPTURES[name]

    async def go() -> bytes:
        async with raw_server(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n") as (url, heads):
            await ask(url, creds, client)
            return heads[0]

    head = asyncio.run(go())
    expected = "GET /auth HTTP/1.1\r\n" + capture.replace("\n", "\r\n") + "\r\n\r\n"
    assert head == expected.encode()


def test_client_certificate_headers_follow_nginx_order() -> None:
    tls = TlsInfo(
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
        client_verify="SUCCESS",
        client_subject="CN=alice,O=Example",
        client_issuer="CN=Example CA",
        client_serial="1F",
        client_fingerprint="ab" * 20,
        client_cert_pem="-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    client = ClientInfo(LOCAL, 40000, "imap", tls=tls)
    recorder = Recorder()
    asyncio.run(ask_recorded(recorder, client=client, pass_client_cert=True))
    assert recorder.requests[0][7:] == [
        ("Auth-SSL", "on"),
        ("Auth-SSL-Protocol", "TLSv1.3"),
        ("Auth-SSL-Cipher", "TLS_AES_256_GCM_SHA384"),
        ("Auth-SSL-Verify", "SUCCESS"),
        ("Auth-SSL-Subject", "CN=alice,O=Example"),
        ("Auth-SSL-Issuer", "CN=Example CA"),
        ("Auth-SSL-Serial", "1F"),
        ("Auth-SSL-Fingerprint", "ab" * 20),
        (
            "Auth-SSL-Cert",
            "-----BEGIN%20CERTIFICATE-----%0AMIIB%0A-----END%20CERTIFICATE-----%0A",
        ),
        ("X-NGX-Auth-Key", "some secret"),
    ]
    # Without pass_client_cert only the connection facts go out.
    names = [n for n, _ in build_request_headers(PLAIN, client, AuthHttpSettings("h/a"))]
    assert [n for n in names if n.startswith("Auth-SSL")] == [
        "Auth-SSL",
        "Auth-SSL-Protocol",
        "Auth-SSL-Cipher",
    ]


def test_escaping_matches_nginx_mail_auth_table() -> None:
    # nginx escapes 0x00-0x1F, space and "%"; mailgate also DEL and 8-bit (module docstring).
    for byte in range(128):
        char = chr(byte)
        escaped = byte <= 0x20 or byte in (0x25, 0x7F)
        assert escape_mail_auth(char) == (f"%{byte:02X}" if escaped else char), byte
    assert escape_mail_auth("pässword") == "p%C3%A4ssword"
    raw = b"\xff\xfe".decode("utf-8", "surrogateescape")  # a non-UTF-8 password, byte-exact
    assert escape_mail_auth(raw) == "%FF%FE"


def test_other_fields_cannot_split_the_request() -> None:
    creds = Credentials(
        Method.NONE, "", Secret(""), smtp_helo="x\r\nAuth-Status: OK", smtp_from="f", smtp_to="t"
    )
    headers = dict(
        build_request_headers(creds, ClientInfo(LOCAL, 1, "smtp"), AuthHttpSettings("h"))
    )
    assert headers["Auth-SMTP-Helo"] == "x%0D%0AAuth-Status: OK"


def test_connections_are_kept_alive_and_reused() -> None:
    recorder = Recorder()

    async def go() -> None:
        async with aiohttp_server(recorder) as url:
            auth = AuthHttpClient(AuthHttpSettings(url, SECRET_HEADER))
            for _ in range(3):
                assert isinstance(await auth.authenticate(PLAIN, IMAP), Route)
            await auth.close()
            assert isinstance(await auth.authenticate(PLAIN, IMAP), TempFail)

    asyncio.run(go())
    assert len(recorder.requests) == 3
    assert len(set(recorder.peers)) == 1  # one TCP connection for all three


# --- the answer ----------------------------------------------------------------------------


ANSWERS: list[tuple[str, dict[str, str], int, Credentials, object]] = [
    (
        "OK with server and port",
        {"Auth-Status": "OK", "Auth-Server": "10.0.0.7", "Auth-Port": "143"},
        200,
        PLAIN,
        Route("10.0.0.7", 143, "alice@example.com", PLAIN.secret),
    ),
    (
        "OK with user and password used verbatim",
        {
            "Auth-Status": "OK",
            "Auth-Server": "mail1.internal",
            "Auth-Port": "10143",
            "Auth-User": "alice%40backend",
            "Auth-Pass": "my%20little%20p%25ony",
        },
        200,
        PLAIN,
        Route("mail1.internal", 10143, "alice%40backend", Secret("my%20little%20p%25ony")),
    ),
    (
        "cram-md5 with the clear password",
        {"Auth-Status": "OK", "Auth-Server": "::1", "Auth-Port": "143", "Auth-Pass": "clear"},
        200,
        CRAM,
        Route("::1", 143, "alice@example.com", Secret("clear")),
    ),
    (
        "Invalid login with Auth-Wait",
        {"Auth-Status": "Invalid login or password", "Auth-Wait": "3"},
        200,
        PLAIN,
        Reject("Invalid login or password", wait=3.0),
    ),
    (
        "Auth-Error-Code",
        {"Auth-Status": "Relaying denied", "Auth-Error-Code": "550 5.7.1"},
        200,
        PLAIN,
        Reject("Relaying denied", error_code="550 5.7.1"),
    ),
    (
        "an error code that would read as success is dropped",
        {"Auth-Status": "No", "Auth-Error-Code": "250 ok"},
        200,
        PLAIN,
        Reject("No"),
    ),
    (
        "a huge Auth-Wait is capped",
        {"Auth-Status": "No", "Auth-Wait": "86400"},
        200,
        PLAIN,
        Reject("No", wait=float(MAX_WAIT)),
    ),
    # nginx reads the headers whatever the HTTP status: 204 is what many auth locations send.
    *(
        (
            f"HTTP {code}",
            {"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "143"},
            code,
            PLAIN,
            Route(LOCAL, 143, "alice@example.com", PLAIN.secret),
        )
        for code in (204, 500, 302, 404)
    ),
    ("HTTP 502 without Auth-Status", {"Server": "nginx"}, 502, PLAIN, TempFail),
    ("no Auth-Status", {"Auth-Server": LOCAL, "Auth-Port": "143"}, 200, PLAIN, TempFail),
    ("missing Auth-Server", {"Auth-Status": "OK", "Auth-Port": "143"}, 200, PLAIN, TempFail),
    ("missing Auth-Port", {"Auth-Status": "OK", "Auth-Server": LOCAL}, 200, PLAIN, TempFail),
    *[
        (
            f"bad port {port!r}",
            {"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": port},
            200,
            PLAIN,
            TempFail,
        )
        for port in ("0", "65536", "abc", "25x", "-1", "+25", "99999999")
    ],
    (
        "bad server",
        {"Auth-Status": "OK", "Auth-Server": "mail one;rm", "Auth-Port": "143"},
        200,
        PLAIN,
        TempFail,
    ),
    (
        "cram-md5 without Auth-Pass",
        {"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "143"},
        200,
        CRAM,
        TempFail,
    ),
    ("WAIT", {"Auth-Status": "WAIT", "Auth-Wait": "2"}, 200, PLAIN, TempFail),
]


@pytest.mark.parametrize(
    ("answer", "status", "creds", "expected"),
    [a[1:] for a in ANSWERS],
    ids=[a[0] for a in ANSWERS],
)
def test_answer(answer: dict[str, str], status: int, creds: Credentials, expected: object) -> None:
    decision = asyncio.run(ask_recorded(Recorder(answer, status), creds))
    if isinstance(expected, type):
        assert isinstance(decision, expected), decision
        return
    assert type(decision) is type(expected)
    if isinstance(expected, Route):  # Secret has no ==: compare the revealed values
        assert isinstance(decision, Route)
        got = (decision.host, decision.port, decision.user, decision.secret.reveal())
        assert got == (expected.host, expected.port, expected.user, expected.secret.reveal())
    else:
        assert decision == expected


def test_answer_parsing_details() -> None:
    # Header names are case-insensitive, and the last of repeated headers wins, as in nginx.
    ok = parse_response(200, {"auth-status": "OK", "AUTH-SERVER": "h1", "auth-port": "25"}, PLAIN)
    assert isinstance(ok, Route) and (ok.host, ok.port) == ("h1", 25)
    assert parse_response(200, {"Auth-Status": "WAIT", "Auth-Wait": "2"}, PLAIN) == TempFail(
        "auth_http asked to wait and retry", wait=2.0
    )
    empty = parse_response(200, {"Auth-Status": ""}, PLAIN)
    assert isinstance(empty, Reject) and empty.message == Reject().message
    bad_wait = parse_response(200, {"Auth-Status": "No", "Auth-Wait": "soon"}, PLAIN)
    assert bad_wait == Reject("No", wait=0.0)


GARBAGE = {
    "not HTTP": b"hello there\r\n\r\n",
    "header without colon": b"HTTP/1.1 200 OK\r\nAuth-Status OK\r\nContent-Length: 0\r\n\r\n",
    "header line too long": b"HTTP/1.1 200 OK\r\nAuth-Status: "
    + b"x" * 10000
    + b"\r\nContent-Length: 0\r\n\r\n",
    "too many headers": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-%d: y\r\n" % i for i in range(200))
    + b"Content-Length: 0\r\n\r\n",
    "closed without answer": b"",
    "half an answer": b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\n",
}


@pytest.mark.parametrize("answer", list(GARBAGE.values()), ids=list(GARBAGE))
def test_garbage_answer_is_tempfail(answer: bytes) -> None:
    async def go() -> object:
        async with raw_server(answer) as (url, _):
            return await ask(url)

    assert isinstance(asyncio.run(go()), TempFail)


def test_big_body_is_ignored() -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 10.0.0.1\r\nAuth-Port: 110\r\n"
        b"Content-Length: 1000000\r\n\r\n" + b"x" * 100
    )

    async def go() -> object:
        async with raw_server(answer) as (url, _):
            return await ask(url)

    decision = asyncio.run(go())
    assert isinstance(decision, Route) and decision.port == 110


def test_hanging_server_is_tempfail_within_the_timeout() -> None:
    async def go() -> object:
        async with raw_server(None) as (url, heads):
            decision = await ask(url, timeout=0.5)
            assert heads  # the request did arrive: it is the answer that never comes
            return decision

    start = time.monotonic()
    decision = asyncio.run(go())
    assert isinstance(decision, TempFail)
    assert "timed out" in decision.reason
    assert time.monotonic() - start < 1.5


def test_connection_refused_is_tempfail() -> None:
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        port = sock.getsockname()[1]  # bound but not listening: refused
        decision = asyncio.run(ask(f"http://{LOCAL}:{port}/auth"))
    assert isinstance(decision, TempFail)


def test_bad_settings_fail_at_start() -> None:
    with pytest.raises(ValueError):
        AuthHttpClient(AuthHttpSettings("ftp://host/auth"))
    with pytest.raises(ValueError):
        AuthHttpClient(AuthHttpSettings("http://h/a", headers=(("X-A", "b\r\nEvil: 1"),)))


def test_logs_never_contain_the_password(caplog: pytest.LogCaptureFixture) -> None:
    password = "hunter2 p%ony"
    creds = Credentials(Method.PLAIN, "alice@example.com", Secret(password))
    answers = [
        Recorder({"Auth-Status": "Invalid login or password", "Auth-Wait": "1"}),
        Recorder({"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "1", "Auth-Pass": "x"}),
        Recorder({"Auth-Status": "OK", "Auth-Server": LOCAL, "Auth-Port": "0", "Auth-Pass": "x"}),
        Recorder({"Auth-Status": "OK"}, status=500),
    ]
    caplog.set_level(logging.DEBUG, logger="mailgate.auth.http")

    async def go() -> None:
        for recorder in answers:
            await ask_recorded(recorder, creds)
        long_pass = b"HTTP/1.1 200 OK\r\nAuth-Pass: " + password.encode() * 1000 + b"\r\n\r\n"
        async with raw_server(long_pass) as (url, _):
            await ask(url, creds)

    asyncio.run(go())
    text = caplog.text
    assert "Invalid login or password" in text and "Auth-Port" in text  # the log says why
    for secret in (password, "hunter2", escape_mail_auth(password)):
        assert secret not in text


# --- the example service (examples/auth_service.py) ----------------------------------------


def load_example() -> Any:
    path = Path(__file__).resolve().parents[2] / "examples" / "auth_service.py"
    spec = importlib.util.spec_from_file_location("auth_service_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> Any:
    return load_example()


@contextlib.asynccontextmanager
async def example_service(example: Any, db: Path, ports: str = "") -> AsyncIterator[str]:
    cfg = example.Config(str(db), "X-NGX-Auth-Key", "some secret", example.parse_port_map(ports))
    runner = web.AppRunner(example.make_app(cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOCAL, 0)
    await site.start()
    try:
        yield f"http://{LOCAL}:{runner.addresses[0][1]}/auth"
    finally:
        await runner.cleanup()


def test_example_service(example: Any, tmp_path: Path) -> None:
    db = tmp_path / "auth.sqlite"
    assert example.main(["--db", str(db), "--init"]) == 0
    with example.connect(str(db)) as conn:
        conn.execute(
            "INSERT INTO users VALUES (?, ?)",
            ("alice@example.com", example.hash_password("my little p%ony", "ARGON2ID")),
        )
        conn.execute("INSERT INTO users VALUES (?, ?)", ("bob@example.org", "{PLAIN}clear pw"))
        conn.execute("INSERT INTO transport VALUES ('example.com', 'smtp:[10.0.0.5]:2143')")
        conn.execute("INSERT INTO transport VALUES ('example.org', 'smtp:mail2.internal')")
    salt = "<1896.697170952@mailgate>"
    cram = hmac.new(b"clear pw", salt.encode(), hashlib.md5).hexdigest()
    apop = hashlib.md5(salt.encode() + b"clear pw").hexdigest()

    async def go() -> dict[str, object]:
        async with example_service(example, db, "pop3=10110") as url:
            alice = Credentials(Method.PLAIN, "alice@example.com", Secret("my little p%ony"))
            bob = "bob@example.org"
            results = {
                "plain": await ask(url, alice),
                "wrong": await ask(url, Credentials(Method.PLAIN, bob, Secret("nope"))),
                "unknown": await ask(url, Credentials(Method.PLAIN, "x@example.org", Secret("a"))),
                "cram": await ask(url, Credentials(Method.CRAM_MD5, bob, Secret(cram), salt=salt)),
                "apop": await ask(
                    url,
                    Credentials(Method.APOP, bob, Secret(apop), salt=salt),
                    ClientInfo(LOCAL, 1, "pop3"),
                ),
                "cram on a hash": await ask(
                    url, Credentials(Method.CRAM_MD5, alice.user, Secret(cram), salt=salt)
                ),
            }
            no_key = AuthHttpClient(AuthHttpSettings(url))
            results["no secret"] = await no_key.authenticate(alice, IMAP)
            await no_key.close()
            return results

    r = asyncio.run(go())
    plain, cram_route, apop_route = r["plain"], r["cram"], r["apop"]
    assert isinstance(plain, Route)
    assert (plain.host, plain.port, plain.user) == ("10.0.0.5", 2143, "alice@example.com")
    assert plain.secret.reveal() == "my little p%ony"  # the client's own, no Auth-Pass sent
    assert r["wrong"] == Reject("Invalid login or password", wait=3.0)
    assert r["unknown"] == r["wrong"]  # the same answer whether or not the user exists
    assert r["cram on a hash"] == r["wrong"]
    assert isinstance(cram_route, Route) and isinstance(apop_route, Route)
    assert (cram_route.host, cram_route.port) == ("mail2.internal", 143)
    assert cram_route.secret.reveal() == "clear pw"
    assert (apop_route.port, apop_route.secret.reveal()) == (10110, "clear pw")
    assert isinstance(r["no secret"], TempFail)  # HTTP 403
