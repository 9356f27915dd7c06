"""The route cache in front of the real SQL directory (SQLite): hits log in with the password
just sent, or the master password the directory holds, and the cache's memory has neither.

Found when it was tried (issue 8, item 4): the cache kept `Route` objects whose secret was the
user's cleartext password, up to 100,000 of them for 60 s, although its comment said it never
held a password.
"""

from __future__ import annotations

from pathlib import Path

from integration.test_directory_sqlite import ALICE_PW, MASTER_PW, env, populate, route, run
from mailgate import admin
from mailgate.auth.cache import Cached
from mailgate.values import ClientInfo, Credentials, Method, Secret
from unit.test_cache import secrets_reachable, walked

CLIENT = ClientInfo("192.0.2.7", 50123, "imap")


def test_hits_log_in_with_the_password_just_sent_and_the_cache_holds_no_secret(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'directory.db'}"

    async def scenario() -> None:
        await populate(url)
        async with env(url) as e:
            cached = Cached(e.directory, ttl=3600.0, size=100)
            alice = Credentials(Method.PLAIN, "alice@example.com", Secret(ALICE_PW))
            dave = Credentials(Method.PLAIN, "dave@example.org", Secret("dave-pw"))
            first = route(await cached.authenticate(alice, CLIENT))
            assert route(await cached.authenticate(dave, CLIENT)).secret.reveal() == MASTER_PW
            # Disabled now: only a cache hit can still route them, and it does (cache_ttl).
            await admin.set_user_active(e.engine, "alice@example.com", False)
            await admin.set_user_active(e.engine, "dave@example.org", False)
            again = Credentials(Method.PLAIN, "  Alice@Example.COM", Secret(ALICE_PW))
            hit = route(await cached.authenticate(again, CLIENT))
            assert (hit.user, hit.host, hit.identity) == (first.user, first.host, first.user)
            assert hit.secret is again.secret  # the password this client just sent
            master_hit = route(await cached.authenticate(dave, CLIENT))
            assert (master_hit.user, master_hit.secret.reveal()) == (
                "dave@example.org*proxy", MASTER_PW
            )  # fmt: skip
            assert len(cached) == 2
            assert Secret in walked(cached, e.directory)
            secrets = (ALICE_PW, "dave-pw", MASTER_PW)
            assert secrets_reachable(cached, e.directory, *secrets) == []

    run(scenario())
