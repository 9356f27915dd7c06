"""What an OAuth login costs mailgate: the SASL parse, the token check, the directory decision.

    python bench/oauth.py [--n 2000]

A test issuer (tests/oauth_issuer.py: real keys, real HTTP on 127.0.0.1) signs the tokens.
Keys and introspection answers are fetched once, so the figures are the steady state: CPU per
call, one call at a time, in microseconds (median of five rounds; the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

from mailgate import admin  # noqa: E402
from mailgate.auth.directory import SqlDirectory  # noqa: E402
from mailgate.auth.oauth import TokenValid, TokenValidator  # noqa: E402
from mailgate.auth.schema import dispose, make_engine  # noqa: E402
from mailgate.config import DirectorySettings, OAuthSettings  # noqa: E402
from mailgate.protocols.sasl import OAuthBearerServer, XOAuth2Server  # noqa: E402
from mailgate.values import ClientInfo, Credentials, Method, Route, Secret  # noqa: E402
from oauth_issuer import AUDIENCE, CLIENT_ID, CLIENT_SECRET, Issuer  # noqa: E402


def settings(idp: Issuer) -> OAuthSettings:
    return OAuthSettings(
        issuer=idp.issuer,
        audience=AUDIENCE,
        introspection_url=idp.introspection_url,
        client_id=CLIENT_ID,
        client_secret=Secret(CLIENT_SECRET),
    )


async def per_call(n: int, call: Callable[[], Awaitable[object]]) -> float:
    await call()  # warm: keys fetched, caches filled
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            await call()
        rounds.append((time.process_time() - start) / n * 1e6)
    return statistics.median(rounds)


def sync_per_call(n: int, call: Callable[[], object]) -> float:
    rounds = []
    for _ in range(5):
        start = time.process_time()
        for _ in range(n):
            call()
        rounds.append((time.process_time() - start) / n * 1e6)
    return statistics.median(rounds)


async def main(n: int) -> None:
    with Issuer() as idp, tempfile.TemporaryDirectory() as tmp:
        rows: list[tuple[str, float]] = []
        token = idp.token()
        xo = f"user=alice@example.com\x01auth=Bearer {token}\x01\x01".encode()
        ob = f"n,a=alice@example.com,\x01auth=Bearer {token}\x01\x01".encode()
        rows.append((f"SASL XOAUTH2 parse ({len(token)}-byte JWT)",
                     sync_per_call(n, lambda: XOAuth2Server().step(xo))))  # fmt: skip
        rows.append(
            ("SASL OAUTHBEARER parse", sync_per_call(n, lambda: OAuthBearerServer().step(ob)))
        )
        rows.append(("base64 decode of that response", sync_per_call(n, lambda: base64.b64decode(
            base64.b64encode(xo)))))  # fmt: skip

        v = TokenValidator(settings(idp))
        for alg in ("RS256", "PS256", "ES256", "EdDSA"):
            t = Secret(idp.token(alg=alg))

            async def check(t: Secret = t) -> object:
                result = await v.validate(t)
                assert isinstance(result, TokenValid), result
                return result

            rows.append((f"JWT check, {alg}", await per_call(n, check)))
        opaque = Secret(idp.opaque_token())
        rows.append(("introspection, cached answer", await per_call(n, lambda: v.validate(opaque))))
        await v.close()

        url = f"sqlite:///{tmp}/d.db"
        engine = make_engine(url, 1)
        await admin.init_schema(engine)
        await admin.add_mailstore(engine, "s", "10.0.0.5")
        await admin.add_domain(engine, "example.com", "s")
        await admin.add_user(engine, "alice@example.com", Secret("x"), scheme="PLAIN")
        await dispose(engine)
        directory = SqlDirectory(DirectorySettings(url=url), settings(idp))
        creds = Credentials(Method.XOAUTH2, "alice@example.com", Secret(token))
        client = ClientInfo("192.0.2.1", 40000, "imap")

        async def login() -> object:
            decision = await directory.explain(creds, client)
            assert isinstance(decision.decision, Route), decision
            return decision

        rows.append(("directory decision, XOAUTH2 + RS256 (SQLite)", await per_call(n // 4, login)))
        plain = Credentials(Method.PLAIN, "alice@example.com", Secret("x"))
        rows.append(("directory decision, PLAIN {PLAIN} (SQLite), for comparison",
                     await per_call(n // 4, lambda: directory.explain(plain, client))))  # fmt: skip
        await directory.close()
    width = max(len(name) for name, _ in rows)
    for name, micros in rows:
        print(f"{name:<{width}}  {micros:8.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="calls per round")
    asyncio.run(main(parser.parse_args().n))
