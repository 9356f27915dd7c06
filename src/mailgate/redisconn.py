"""Connecting to Redis: `[cluster] redis_url` parsed once, and a redis-py asyncio client made
the same way in every process that needs one (each worker, the supervisor, the CLI).

The URL forms:

- `redis://[user:password@]host[:port][/db]`, `rediss://...` (TLS), `unix:///path?db=N`:
  redis-py's own `from_url`;
- `redis+sentinel://[user:password@]host[:port][,host[:port]...]/SERVICE[/db]` (and
  `rediss+sentinel://`): Redis Sentinel, through redis-py's `Sentinel.master_for`; the
  password is the master's, and `?sentinel_password=...` the sentinels' if they have one.
  The client asks the sentinels for the master again whenever a connection to it fails, so a
  failover is a Redis outage of a few seconds (the degraded mode), not a restart;
- `redis+cluster://[user:password@]host[:port][,host[:port]...]` (and `rediss+cluster://`):
  Redis Cluster, through redis-py's `RedisCluster`. Every key mailgate writes starts with
  the hash tag `{prefix}`, so all of them live in one slot: the cluster gives failover, not
  sharding (a cluster's worth of mailgate state is megabytes, its load one core's share).

Every client fails fast: no retries inside redis-py (the caller falls back to the node's own
counts and tries Redis again later), timeouts of `[cluster] timeout` for connecting and for
every reply.
"""

from __future__ import annotations

import importlib.util
import urllib.parse
from dataclasses import dataclass
from typing import Any

# Connections one process may hold to Redis: a worker's logins in flight each use one for the
# length of a round trip; past this they wait (for `timeout` at most) rather than connect.
MAX_CONNECTIONS = 32
DEFAULT_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379


class RedisUrlError(ValueError):
    """`[cluster] redis_url` cannot be used; the message says why (without the password)."""


@dataclass(frozen=True, slots=True)
class RedisTarget:
    kind: str  # "direct", "sentinel" or "cluster"
    url: str  # direct: the URL as given, for redis-py
    hosts: tuple[tuple[str, int], ...] = ()  # sentinel, cluster: the seeds
    service: str = ""  # sentinel: the master's name
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    sentinel_password: str | None = None

    def describe(self) -> str:
        """For the log: where, never the password."""
        if self.kind == "direct":
            parts = urllib.parse.urlsplit(self.url)
            where = parts.hostname or parts.path
            port = f":{parts.port}" if parts.port else ""
            return f"{parts.scheme}://{where}{port}"
        hosts = ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{self.kind} {hosts}" + (f" {self.service}" if self.service else "")


def parse_url(url: str) -> RedisTarget:
    scheme, sep, _ = url.partition("://")
    if not sep:
        raise RedisUrlError("not a URL")
    if scheme in ("redis", "rediss", "unix"):
        return RedisTarget("direct", url, tls=scheme == "rediss")
    base, _, kind = scheme.partition("+")
    if base not in ("redis", "rediss") or kind not in ("sentinel", "cluster"):
        raise RedisUrlError(f"unknown scheme {scheme!r}")
    parts = urllib.parse.urlsplit("redis" + url[len(scheme) :])
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, password = _userinfo(userinfo)
    default_port = DEFAULT_SENTINEL_PORT if kind == "sentinel" else DEFAULT_PORT
    hosts = tuple(_host(h, default_port) for h in hostlist.split(",") if h)
    if not hosts:
        raise RedisUrlError("names no host")
    query = urllib.parse.parse_qs(parts.query)
    path = [p for p in parts.path.split("/") if p]
    service, db = "", 0
    if kind == "sentinel":
        if not path:
            raise RedisUrlError("a sentinel URL ends with /SERVICE (the master's name)")
        service = urllib.parse.unquote(path[0])
        db = _db(path[1] if len(path) > 1 else "0")
    elif path:
        raise RedisUrlError("a cluster URL has no path (Redis Cluster has database 0 only)")
    sentinel_password = query.get("sentinel_password", [None])[0]
    return RedisTarget(
        kind, url, hosts, service, db, username, password, base == "rediss", sentinel_password
    )


def _userinfo(text: str) -> tuple[str | None, str | None]:
    if not text:
        return None, None
    user, sep, password = text.partition(":")
    if not sep:
        return None, urllib.parse.unquote(user)  # redis://secret@host: a password alone
    return urllib.parse.unquote(user) or None, urllib.parse.unquote(password)


def _host(text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host or (port_text and not port_text.isdigit()):
        raise RedisUrlError(f"bad host {text!r}")
    port = int(port_text) if port_text else default_port
    if not 0 < port < 65536:
        raise RedisUrlError(f"bad port in {text!r}")
    return host, port


def _db(text: str) -> int:
    if not text.isdigit():
        raise RedisUrlError(f"bad database number {text!r}")
    return int(text)


def _common(timeout: float) -> dict[str, Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    # No CLIENT SETINFO on every new connection (redis-py 7 names it driver_info).
    if importlib.util.find_spec("redis.driver_info") is not None:
        common["driver_info"] = None
    else:
        common["lib_name"] = common["lib_version"] = None
    return common


def client(target: RedisTarget, timeout: float, max_connections: int = MAX_CONNECTIONS) -> Any:
    """A redis-py asyncio client for `target` (it connects at its first command)."""
    common = _common(timeout)
    if target.kind == "direct":
        from redis.asyncio import BlockingConnectionPool, Redis

        pool = BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=timeout, **common
        )
        return Redis(connection_pool=pool)
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.kind == "sentinel":
        from redis.asyncio.sentinel import Sentinel

        sentinels = Sentinel(  # type: ignore[no-untyped-call]
            list(target.hosts),
            sentinel_kwargs={**_common(timeout), "password": target.sentinel_password},
            ssl=target.tls,
            **common,
            **auth,
        )
        return sentinels.master_for(target.service, db=target.db, max_connections=max_connections)
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in target.hosts],
        ssl=target.tls,
        max_connections=max_connections,
        **common,
        **auth,
    )


def unavailable_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis cannot answer now (down, slow, failing over,
    read-only replica, out of memory): every one means "count locally for now"."""
    from redis.exceptions import RedisError

    return (RedisError, OSError, TimeoutError)


class Keys:
    """Key names: every one starts with the hash tag "{prefix}:" (one Redis Cluster slot)."""

    __slots__ = ("base",)

    def __init__(self, prefix: str) -> None:
        self.base = "{" + prefix + "}:"

    def __call__(self, *parts: str) -> str:
        return self.base + ":".join(parts)

    @property
    def live(self) -> str:
        return self.base + "live"
