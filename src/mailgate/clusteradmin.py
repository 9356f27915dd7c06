"""What the admin commands do in the cluster (`[cluster] redis_url`), from the operator's
process, against Redis directly (no node has to be asked):

- after a directory change (`user passwd|disable|...`, `domain ...`, `mailstore ...`) the
  change is published, and every node's route cache forgets what it concerns at once
  (without Redis, `cache_ttl` and `directory flush` remain);
- `mailgate user move USER --to MEMBER` moves a user of an affinity pool: the user's new
  logins get a temporary failure, their sessions on every node are kicked with the protocol's
  goodbye, once none is left (and `move_delay` later) the assignment changes and logins
  resume on the new member;
- `mailgate backend drain MEMBER` (after every node set it draining) moves each user assigned
  to it the same way, `move_parallel` at a time; a user without sessions there is just
  unassigned (their next login chooses again).
A move whose sessions do not end within `move_timeout` is undone and reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from mailgate import redisconn
from mailgate.affinity import affinity_user
from mailgate.config import PoolSettings, Settings
from mailgate.redisstore import RedisState, RedisUnavailable

# Commands that change nothing: nothing to publish.
READ_ONLY = frozenset({"list", "test", "init", "upgrade"})
# How long a kick or an invalidation waits for the nodes' answers at most.
KICK_WAIT = 2.0
# How often a move asks whether the user's sessions have ended; answers are asked for from
# FIRST_POLL on, twice as long each time up to POLL.
POLL = 0.05
FIRST_POLL = 0.002


def client(settings: Settings) -> RedisState:
    target = redisconn.parse_url(settings.cluster.redis_url or "")
    redis = redisconn.client(target, settings.cluster.timeout, max_connections=64)
    return RedisState(redis, settings.cluster.prefix, "admin")


def channel(redis: RedisState, name: str) -> str:
    return redis.keys("ch", name)


# --- directory changes ------------------------------------------------------------------------


def changed_scope(args: argparse.Namespace) -> dict[str, str] | None:
    """What a finished admin command changed, for the route caches: {"user": ...},
    {"domain": ...}, {} (anything: a mailstore), or None (nothing)."""
    if getattr(args, "app_password_command", None) in READ_ONLY:
        return None
    for group, field in (("user_command", "address"), ("domain_command", "name")):
        command = getattr(args, group, None)
        if command:
            return None if command in READ_ONLY else {group.split("_")[0]: getattr(args, field)}
    command = getattr(args, "mailstore_command", None)
    if command and command not in READ_ONLY:
        return {}
    return None


def publish_change(settings: Settings, scope: dict[str, str]) -> str | None:
    """Tell every node, and wait until their route caches forgot; None when all did, else
    why not (the change itself is made: caches then learn it within cache_ttl)."""
    silent = _with_redis(settings, lambda redis: forget_everywhere(redis, scope))
    if isinstance(silent, str):
        return f"{silent}: the nodes' route caches learn it within cache_ttl"
    if silent:
        return f"{silent} nodes did not confirm within {KICK_WAIT:g} s: theirs within cache_ttl"
    return None


async def forget_everywhere(redis: RedisState, scope: dict[str, str]) -> int:
    """Publish a directory change; once every node's caches forgot it (each node's
    subscriber answers after its workers did, KICK_WAIT at most): how many did not answer."""
    ack_id = secrets.token_hex(8)
    message = json.dumps({**scope, "id": ack_id})
    receivers = int(await redis.call("PUBLISH", channel(redis, "inval"), message))
    replies, _ = await _replies(redis, ack_id, receivers)
    return receivers - replies


# --- kicks ----------------------------------------------------------------------------------


async def kick(
    redis: RedisState, user: str | None, backend: str | None, origin: str, skip: int = 0
) -> int:
    """End the matching sessions on every node (pub/sub); how many they ended (the nodes
    that answered within KICK_WAIT). `skip`: subscribers of the caller's own node."""
    kick_id = secrets.token_hex(8)
    message = json.dumps({"id": kick_id, "user": user, "backend": backend, "from": origin})
    receivers = int(await redis.call("PUBLISH", channel(redis, "kick"), message))
    _, total = await _replies(redis, kick_id, max(0, receivers - skip))
    return total


async def _replies(redis: RedisState, reply_id: str, expected: int) -> tuple[int, int]:
    """The nodes' answers to a published message (each pushes a number on `kr:<id>`):
    how many answered within KICK_WAIT, and the sum of their numbers."""
    replies, total = 0, 0
    deadline = time.monotonic() + KICK_WAIT
    key = redis.keys("kr", reply_id)
    pause = FIRST_POLL  # the nodes answer within milliseconds: a drain kicks every user
    while replies < expected and time.monotonic() < deadline:
        answer = await redis.call("LPOP", key)
        if answer is None:
            await asyncio.sleep(pause)
            pause = min(pause * 2, POLL)
            continue
        replies += 1
        total += int(answer)
    return replies, total


# --- moves ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Moved:
    user: str
    ok: bool
    kicked: int = 0
    why: str = ""


def find_member(settings: Settings, name: str) -> tuple[PoolSettings, str] | str:
    """The affinity pool and member NAME means (pool/member, or a member's unique name)."""
    pool_name, slash, member = name.partition("/")
    found = []
    for pool in settings.pools:
        if not pool.affinity:
            continue
        for m in pool.members:
            if (slash and pool.name == pool_name and m.name == member) or (
                not slash and m.name == name
            ):
                found.append((pool, m.name))
    if not found:
        return f"no member {name!r} in a pool with affinity = true"
    if len(found) > 1:
        return f"{name!r} is in several affinity pools; say which: pool/member"
    return found[0]


async def move(
    redis: RedisState, settings: Settings, pool: PoolSettings, user: str, to: str
) -> Moved:
    """Move one user of `pool` to member `to` ("" = let their next login choose)."""
    c = settings.cluster
    who = affinity_user(user)
    token = secrets.token_hex(8)
    expire_ms = int(pool.user_expire * 1000)
    current, holders = await redis.run(
        "move_begin", pool.name, who, token, int(c.move_timeout * 1000)
    )
    current = current.decode() if isinstance(current, bytes) else str(current)
    if int(holders) < 0:
        return Moved(user, False, why="another move of this user is under way")
    kicked = 0
    # Kicked whatever Redis counts: a worker that counted on its own node while Redis did not
    # answer for a moment holds sessions Redis learns of only at its resync.
    if current or int(holders) > 0:
        kicked = await kick(redis, user, f"{pool.name}/{current}" if current else None, "admin")
    if int(holders) > 0 or kicked:
        deadline = time.monotonic() + c.move_timeout
        while int(await redis.run("move_holders", pool.name, who)) > 0:
            if time.monotonic() > deadline:
                await redis.run("move_end", pool.name, who, token, "", expire_ms, "1")
                why = f"sessions on {current} did not end within {c.move_timeout:g} s"
                return Moved(user, False, kicked, why)
            await asyncio.sleep(POLL)
        await asyncio.sleep(c.move_delay)  # the old member finishes what it writes
    if not await redis.run("move_end", pool.name, who, token, to, expire_ms, "0"):
        return Moved(user, False, kicked, "the move took too long and was taken over")
    return Moved(user, True, kicked)


async def drain(
    redis: RedisState,
    settings: Settings,
    pool: PoolSettings,
    member: str,
    parallel: int,
    progress: Callable[[Moved], None],
) -> list[Moved]:
    """Move every user assigned to `member` away, `parallel` at a time."""
    raw = await redis.call("ZRANGE", redis.keys("am", pool.name, member), 0, -1)
    users = [_text(u) for u in raw]
    gate = asyncio.Semaphore(parallel)

    async def one(user: str) -> Moved:
        async with gate:
            assigned = await redis.call("HGET", redis.keys("a", pool.name, user), "m")
            if (
                assigned is None
                or (assigned.decode() if isinstance(assigned, bytes) else assigned) != member
            ):
                await redis.call("ZREM", redis.keys("am", pool.name, member), user)
                return Moved(user, True, why="no longer assigned there")
            moved = await move(redis, settings, pool, user, "")
            progress(moved)
            return moved

    return list(await asyncio.gather(*(one(u) for u in users)))


# --- the command line ---------------------------------------------------------------------------


def run_move(settings: Settings, user: str, target: str) -> int:
    found = find_member(settings, target)
    if isinstance(found, str):
        print(f"mailgate: {found}", file=sys.stderr)
        return 2
    pool, member = found

    async def go(redis: RedisState) -> Moved:
        return await move(redis, settings, pool, user, member)

    moved = _with_redis(settings, go)
    if isinstance(moved, str):
        print(f"mailgate: {moved}", file=sys.stderr)
        return 1
    if not moved.ok:
        print(f"mailgate: {user} not moved: {moved.why}", file=sys.stderr)
        return 1
    print(f"{user} moved to {pool.name}/{member} ({moved.kicked} sessions ended)")
    return 0


def run_directory_move(settings: Settings, user: str, write: Callable[[], int]) -> int:
    """A user moved to another directory mailstore, in the cluster: their logins get a
    temporary failure meanwhile, their sessions (and logins on their way) end on every node,
    `move_delay` later `write` changes the directory, and logins resume once every node's
    route cache forgot the old route."""
    from mailgate.auth.throttle import user_key

    c = settings.cluster
    moving_key = ("mv", user_key(user) or user)  # the login script's check, by its name

    async def begin(redis: RedisState) -> int:
        ttl_ms = int(c.move_timeout * 1000)
        await redis.call("SET", redis.keys(*moving_key), "1", "PX", ttl_ms)
        kicked = await kick(redis, user, None, "admin")
        await asyncio.sleep(c.move_delay)  # the old store finishes what it writes
        return kicked

    async def end(redis: RedisState) -> int:
        try:
            return await forget_everywhere(redis, {"user": user})
        finally:
            await redis.call("DEL", redis.keys(*moving_key))

    kicked = _with_redis(settings, begin)
    if isinstance(kicked, str):
        print(
            f"mailgate: {kicked}: moved in the directory only (sessions on the nodes not "
            "ended; their route caches learn it within cache_ttl)",
            file=sys.stderr,
        )
        return write()
    try:
        code = write()
    finally:
        silent = _with_redis(settings, end)
    if isinstance(silent, str):
        print(f"mailgate: {silent}: route caches learn it within cache_ttl", file=sys.stderr)
    elif silent:
        print(f"mailgate: {silent} nodes did not confirm within {KICK_WAIT:g} s", file=sys.stderr)
    if code == 0:
        print(f"{kicked} sessions of {user} ended on every node")
    return code


def run_drain(settings: Settings, name: str, parallel: int | None) -> int:
    found = find_member(settings, name)
    if isinstance(found, str):
        return 0  # not an affinity member: the drain of the node's states is all there is
    pool, member = found

    def progress(moved: Moved) -> None:
        state = "moved" if moved.ok else f"NOT moved ({moved.why})"
        print(f"  {moved.user}: {state}, {moved.kicked} sessions ended", flush=True)

    async def go(redis: RedisState) -> list[Moved]:
        return await drain(
            redis, settings, pool, member, parallel or settings.cluster.move_parallel, progress
        )

    result = _with_redis(settings, go)
    if isinstance(result, str):
        print(f"mailgate: {result}", file=sys.stderr)
        return 1
    failed = [m for m in result if not m.ok]
    print(f"{pool.name}/{member}: {len(result) - len(failed)} users moved, {len(failed)} not")
    return 1 if failed else 0


def _with_redis(settings: Settings, work: Callable[[RedisState], Awaitable[Any]]) -> Any:
    async def run() -> Any:
        redis = client(settings)
        try:
            return await work(redis)
        finally:
            await redis.close()

    try:
        return asyncio.run(run())
    except RedisUnavailable as e:
        return f"Redis unavailable: {e}"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)
