"""How many login decisions per second the built-in directory answers.

    python bench/directory.py [--seconds 3] [--users 2000] [--concurrency 16] [--no-postgres]

For SQLite (a temp file) and PostgreSQL (a real server started on 127.0.0.1, if installed),
the same directory is filled with `--users` users through mailgate's admin API, then
`--concurrency` tasks ask it for random users' logins for `--seconds`, four ways:

- uncached, {PLAIN} passwords: the database round trip and mailgate's own work per login;
- cached, {PLAIN}: the same through the route cache (`auth.cache.Cached`), warmed first;
- uncached, {ARGON2ID} (the default scheme): the hash check dominates, by design;
- cached, {ARGON2ID}: a cache hit skips the hash as well as the database.

Figures are decisions per second and ratios within this run (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "scripts")]

from mailgate import admin  # noqa: E402
from mailgate.auth import Authenticator  # noqa: E402
from mailgate.auth.cache import Cached  # noqa: E402
from mailgate.auth.directory import SqlDirectory  # noqa: E402
from mailgate.auth.schema import dispose, make_engine  # noqa: E402
from mailgate.config import DirectorySettings  # noqa: E402
from mailgate.values import ClientInfo, Credentials, Method, Route, Secret  # noqa: E402

CLIENT = ClientInfo("192.0.2.1", 40000, "imap")
# Argon2 costs tens of milliseconds a check: a few hundred such users are plenty.
ARGON_USERS = 200


def password(i: int) -> str:
    return f"password-{i}"


async def populate(url: str, users: int) -> None:
    engine = make_engine(url, 2)
    try:
        await admin.init_schema(engine)
        await admin.add_mailstore(engine, "store1", "10.0.0.5", imap_port=143)
        await admin.add_domain(engine, "plain.example", "store1")
        await admin.add_domain(engine, "argon.example", "store1")
        for i in range(users):
            await admin.add_user(engine, f"u{i}@plain.example", Secret(password(i)), scheme="PLAIN")
        for i in range(min(users, ARGON_USERS)):
            await admin.add_user(engine, f"u{i}@argon.example", Secret(password(i)))
    finally:
        await dispose(engine)


async def rate(auth: Authenticator, domain: str, users: int, seconds: float, tasks: int) -> float:
    done = 0
    deadline = time.monotonic() + seconds

    async def worker(rng: random.Random) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            i = rng.randrange(users)
            creds = Credentials(Method.PLAIN, f"u{i}@{domain}", Secret(password(i)))
            decision = await auth.authenticate(creds, CLIENT)
            assert isinstance(decision, Route), decision
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(random.Random(n)) for n in range(tasks)))
    return done / (time.monotonic() - started)


async def measure(url: str, args: argparse.Namespace) -> dict[str, float]:
    await populate(url, args.users)
    directory = SqlDirectory(DirectorySettings(url=url, pool_size=args.concurrency))
    cached = Cached(directory, ttl=3600, size=args.users * 2)
    argon_users = min(args.users, ARGON_USERS)
    results = {}
    try:
        results["uncached PLAIN"] = await rate(
            directory, "plain.example", args.users, args.seconds, args.concurrency
        )
        await rate(cached, "plain.example", args.users, args.seconds, args.concurrency)  # warm
        results["cached PLAIN"] = await rate(
            cached, "plain.example", args.users, args.seconds, args.concurrency
        )
        results["uncached ARGON2ID"] = await rate(
            directory, "argon.example", argon_users, args.seconds, args.concurrency
        )
        for i in range(argon_users):  # warm: every user once
            await cached.authenticate(
                Credentials(Method.PLAIN, f"u{i}@argon.example", Secret(password(i))), CLIENT
            )
        results["cached ARGON2ID"] = await rate(
            cached, "argon.example", argon_users, args.seconds, args.concurrency
        )
    finally:
        await cached.close()
    return results


def postgres_url(workdir: Path) -> tuple[str, object] | None:
    try:
        import peers
    except ImportError:
        return None
    if peers.postgres_bin("postgres") is None:
        return None
    port = peers.free_port()
    peer = peers.start_postgres(workdir, port)
    peers.postgres_sql(peer, "CREATE DATABASE bench")
    return f"postgresql://postgres@127.0.0.1:{port}/bench", peer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    table: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mailgate-bench-dir-") as tmp:
        work = Path(tmp)
        table["SQLite"] = asyncio.run(measure(f"sqlite:///{work / 'directory.db'}", args))
        pg = None if args.no_postgres else postgres_url(work)
        if pg is not None:
            url, peer = pg
            try:
                table["PostgreSQL"] = asyncio.run(measure(url, args))
            finally:
                peer.stop()  # type: ignore[attr-defined]
    rows = list(next(iter(table.values())))
    print(f"\n{'decisions/s':<22}" + "".join(f"{db:>14}" for db in table))
    for row in rows:
        print(f"{row:<22}" + "".join(f"{table[db][row]:>14,.0f}" for db in table))
    for db, r in table.items():
        print(
            f"{db}: cached/uncached PLAIN {r['cached PLAIN'] / r['uncached PLAIN']:.1f}x, "
            f"cached/uncached ARGON2ID {r['cached ARGON2ID'] / r['uncached ARGON2ID']:.0f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
