"""The supervisor's part of the cluster (`[cluster] redis_url`): what concerns the whole node.

- It listens on Redis pub/sub for what other nodes and the admin commands publish:
  `kick` (end a user's sessions, or a backend's, on every node: `mailgate kick` on any node),
  `inval` (a user, domain or mailstore changed in the directory: the route caches forget it,
  then the node answers: the admin command waits for every node before it returns),
  `admin` (`mailgate backend up|down|drain` on any node: every node applies it). When the
  subscription is (re)made, every worker's route cache is flushed (it may have missed
  invalidations meanwhile) and the operator's backend states are read from Redis again.
- `who` and `kick` from the control socket reach the other nodes through it: sessions from
  the registry (every worker's, kept by its heartbeat), kicks by pub/sub with each node's
  count sent back.
- `throttle show|clear` read and change the cluster's counters.
- A worker that exits is reaped at once (its leases and registry entries go), rather than when
  its heartbeat runs out.

While Redis does not answer, this node's commands reach this node only (said in their answer)
and the subscription is retried with a growing pause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from mailgate import redisconn
from mailgate.auth.throttle import user_key
from mailgate.cluster import node_name, node_prefix, owner_of
from mailgate.config import Settings
from mailgate.redisstore import RedisState, RedisUnavailable

if TYPE_CHECKING:
    from mailgate.supervisor import Supervisor

log = logging.getLogger("mailgate.cluster")

# How long the other nodes keep a kick's count for the kicker to read.
KICK_REPLY_TTL = 20.0
# The subscription's connection is checked this often (a Redis that went away without a
# reset would otherwise leave it waiting for messages that never come).
PING_INTERVAL = 5.0
RETRY_MAX = 5.0
CHANNELS = ("kick", "inval", "admin")


class NodeCluster:
    def __init__(self, settings: Settings, supervisor: Supervisor) -> None:
        self.settings = settings
        self.supervisor = supervisor
        target = redisconn.parse_url(settings.cluster.redis_url or "")
        self.where = target.describe()
        self._target = target
        self.node = node_name(settings)
        self.me = node_prefix(settings)
        client = redisconn.client(target, settings.cluster.timeout, max_connections=8)
        self.redis = RedisState(client, settings.cluster.prefix, self.me + "supervisor")
        self.keys = self.redis.keys
        self.subscribed = False
        self._ever_subscribed = False
        self._tasks: list[asyncio.Task[Any]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._subscribe_loop()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        await self.redis.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # --- workers ------------------------------------------------------------------------------

    def worker_gone(self, pid: int) -> None:
        self._spawn(self._reap(owner_of(self.settings, pid)))

    async def _reap(self, owner: str) -> None:
        with contextlib.suppress(RedisUnavailable):
            leases = await self.redis.reap(owner)
            if leases:
                log.info("cluster: worker %s is gone; %d leases freed", owner, leases)

    # --- the subscription -------------------------------------------------------------------

    def channel(self, name: str) -> str:
        return self.keys("ch", name)

    async def _subscribe_loop(self) -> None:
        pause = 0.5
        while True:
            pubsub = self.redis.client.pubsub()
            try:
                await pubsub.subscribe(*(self.channel(c) for c in CHANNELS))
                await self._connected()
                pause = 0.5
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RedisError, OSError: wait, then subscribe again
                if self.subscribed:
                    log.warning("cluster: lost the Redis subscription (%s); retrying", e)
                self.subscribed = False
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)

    async def _connected(self) -> None:
        # Invalidations may have been published while we were not listening: forget it all
        # (each route cache's TTL is the safety net while Redis is away). At start the
        # caches are empty: nothing to forget.
        if self._ever_subscribed:
            await self.supervisor.fanout("flush")
        self._ever_subscribed = True
        await self._load_admin()
        if not self.subscribed:
            log.info("cluster: subscribed to %s", self.where)
        self.subscribed = True

    async def _listen(self, pubsub: Any) -> None:
        last_ping = time.monotonic()
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None and message.get("type") == "message":
                self._spawn(self._message(message))
            if time.monotonic() - last_ping >= PING_INTERVAL:
                await asyncio.wait_for(pubsub.ping(), self.settings.cluster.timeout * 4)
                last_ping = time.monotonic()

    async def _message(self, message: dict[str, Any]) -> None:
        channel = _text(message.get("channel"))
        try:
            data = json.loads(_text(message.get("data")))
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        with contextlib.suppress(RedisUnavailable):
            if channel == self.channel("kick") and data.get("from") != self.me:
                await self._kicked(data)
            elif channel == self.channel("inval"):
                await self.supervisor.fanout("cluster.forget", data)
                if data.get("id"):  # the admin command waits for every node's caches
                    await self._reply(str(data["id"]), 1)
            elif channel == self.channel("admin") and data.get("from") != self.me:
                self._apply_admin(str(data.get("action")), str(data.get("name")))

    # --- who and kick -------------------------------------------------------------------------

    async def _live_owners(self) -> list[str]:
        seconds, micros = await self.redis.call("TIME")
        now = int(seconds) * 1000 + int(micros) // 1000
        owners = await self.redis.call("ZRANGEBYSCORE", self.keys.live, now, "+inf")
        return [_text(o) for o in owners]

    async def who(self, user: str | None, backend: str | None) -> list[dict[str, Any]]:
        """The other nodes' sessions, from the registry (at most a second behind)."""
        wanted = user_key(user) if user else None
        found = []
        for owner in await self._live_owners():
            if owner.startswith(self.me):
                continue
            entries = await self.redis.call("HGETALL", self.keys("s", owner))
            for _, raw in _pairs(entries):
                with contextlib.suppress(ValueError):
                    session = json.loads(_text(raw))
                    if wanted is not None and user_key(session.get("user", "")) != wanted:
                        continue
                    if backend is not None and backend not in (
                        session.get("backend"),
                        session.get("mailstore"),
                    ):
                        continue
                    found.append(session)
        return found

    async def kick(self, user: str | None, backend: str | None) -> int:
        """End the matching sessions on the other nodes; how many they ended (those that
        answered within KICK_WAIT)."""
        from mailgate.clusteradmin import kick

        return await kick(self.redis, user, backend, self.me, skip=1 if self.subscribed else 0)

    async def _kicked(self, data: dict[str, Any]) -> None:
        user, backend = data.get("user"), data.get("backend")
        counts = await self.supervisor.fanout("kick", user, backend)
        await self._reply(str(data.get("id")), sum(counts))
        if sum(counts):
            log.info("cluster: kicked %d sessions (%s %s)", sum(counts), user or "", backend or "")

    async def _reply(self, reply_id: str, value: int) -> None:
        """Answer an admin command waiting for every node (clusteradmin._replies)."""
        key = self.keys("kr", reply_id)
        await self.redis.call("RPUSH", key, value)
        await self.redis.call("PEXPIRE", key, int(KICK_REPLY_TTL * 1000))

    # --- the operator's backend states ---------------------------------------------------------

    async def backend_changed(self, action: str, members: list[str]) -> None:
        """`mailgate backend up|down|drain` ran here: every node applies it, and it stays in
        Redis for nodes that start (or reconnect) later."""
        for name in members:
            if action == "up":
                await self.redis.call("HDEL", self.keys("admin"), name)
            else:
                await self.redis.call("HSET", self.keys("admin"), name, action)
            message = json.dumps({"action": action, "name": name, "from": self.me})
            await self.redis.call("PUBLISH", self.channel("admin"), message)

    async def _load_admin(self) -> None:
        router = self.supervisor.router
        if router is None:
            return
        stored = await self.redis.call("HGETALL", self.keys("admin"))
        wanted = {_text(k): _text(v) for k, v in _pairs(stored)}
        for member in router.describe():
            name = f"{member['pool']}/{member['member']}"
            action = wanted.get(name, "up")
            current = {"enabled": "up", "down": "down", "drain": "drain"}[member["admin"]]
            if action != current:
                self._apply_admin(action, name)

    def _apply_admin(self, action: str, name: str) -> None:
        router = self.supervisor.router
        if router is None or action not in ("up", "down", "drain"):
            return
        answer = router.command(action, name)  # its events reach every worker
        if answer.get("ok"):
            log.info("cluster: backend %s %s (from another node)", action, name)

    # --- the throttle -------------------------------------------------------------------------

    async def throttle_show(self, key: str | None) -> list[dict[str, Any]]:
        window_ms = int(self.settings.throttle.window * 1000)
        keys = [key] if key else [_text(k) for k in await self.redis.run("recent", window_ms)]
        entries = []
        for k in keys:
            shown = await self.redis.run("show", k, window_ms)
            if shown:
                failures, inflight, locked_ms, left_ms, users = (int(v) for v in shown)
                entries.append(
                    {
                        "key": k,
                        "failures": failures,
                        "in_flight": inflight,
                        "locked_for": locked_ms / 1000.0,
                        "window_left": left_ms / 1000.0,
                        "users_tried": users,
                    }
                )
        return entries

    async def throttle_clear(self, key: str) -> bool:
        return bool(await self.redis.run("clear", key))

    async def stats(self) -> dict[str, Any]:
        owners = await self._live_owners()
        nodes = sorted({o.split("/", 1)[0] for o in owners})
        return {"node": self.node, "cluster_nodes": nodes, "cluster_workers": len(owners)}


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """An HGETALL reply (a dict from redis-py, or the flat list) as (field, value) pairs."""
    if isinstance(reply, dict):
        return list(reply.items())
    return list(zip(reply[::2], reply[1::2], strict=True))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return "" if value is None else str(value)


def start(settings: Settings, supervisor: Supervisor) -> NodeCluster | None:
    if not settings.cluster.redis_url:
        return None
    node = NodeCluster(settings, supervisor)
    node.start()
    return node
