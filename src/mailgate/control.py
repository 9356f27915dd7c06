"""The control socket: how an operator talks to a running mailgate.

A Unix socket (mode 0600, only its owner and root may connect, checked with SO_PEERCRED),
one JSON request per connection, one JSON answer. The supervisor answers from its own state
(reload, throttle) or by asking every worker (who, kick, stats, flush, backend). The command
line (`mailgate who`, `kick`, `stats`, `reload`, `throttle`, `backend`) is in cli.py; this
module holds both ends of the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailgate.addresses import subscriber
from mailgate.auth.throttle import user_key
from mailgate.redisstore import RedisUnavailable

if TYPE_CHECKING:
    from mailgate.supervisor import Supervisor

# A request is a small JSON object; an answer may list every session of the node.
MAX_REQUEST = 64 * 1024
MAX_ANSWER = 256 * 1024 * 1024
# A reload waits for the new workers to start; everything else answers in milliseconds.
CLIENT_TIMEOUT = 60.0
SERVER_READ_TIMEOUT = 5.0


class ControlError(Exception):
    """The control socket could not be reached, or the answer was an error."""


# --- the supervisor's end ---------------------------------------------------------------------


async def serve_control(path: Path, supervisor: Supervisor) -> asyncio.Server:
    if path.exists() and _in_use(path):
        raise OSError(f"control socket {path} is in use by another mailgate")
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o177)  # the socket is created mode 0600
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _handle(r, w, supervisor), path=str(path), limit=MAX_REQUEST
        )
    finally:
        os.umask(old_umask)
    return server


def _in_use(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


async def _handle(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, supervisor: Supervisor
) -> None:
    try:
        if not _peer_allowed(writer):
            answer: dict[str, Any] = {"ok": False, "error": "not allowed"}
        else:
            line = await asyncio.wait_for(reader.readline(), SERVER_READ_TIMEOUT)
            answer = await _answer(json.loads(line), supervisor)
    except (ValueError, asyncio.LimitOverrunError, TimeoutError) as e:
        answer = {"ok": False, "error": f"bad request ({type(e).__name__})"}
    except Exception as e:
        answer = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    with contextlib.suppress(OSError, ConnectionError):
        writer.write(json.dumps(answer).encode() + b"\n")
        await writer.drain()
        writer.close()


def _peer_allowed(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return True
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid in (0, os.getuid())


async def _answer(request: dict[str, Any], supervisor: Supervisor) -> dict[str, Any]:
    op = request.get("op")
    if op == "who":
        return await _who(supervisor, request.get("user"), request.get("backend"))
    if op == "kick":
        return await _kick(supervisor, request.get("user"), request.get("backend"))
    if op == "stats":
        workers = await supervisor.fanout("stats")
        summary = _summary(supervisor, workers)
        if supervisor.cluster is not None:
            try:
                summary.update(await supervisor.cluster.stats())
            except RedisUnavailable as e:
                summary["cluster"] = f"Redis unavailable: {e}"
        return {"ok": True, **summary}
    if op == "reload":
        ok, message = await supervisor.reload()
        return {"ok": ok, "message": message} if ok else {"ok": False, "error": message}
    if op == "throttle-show" and supervisor.cluster is not None:  # the cluster's counters
        target = request.get("key")
        entries = await supervisor.cluster.throttle_show(throttle_key(target) if target else None)
        return {"ok": True, "entries": entries}
    if op == "throttle-show":
        return {"ok": True, "entries": _throttle_show(supervisor, request.get("key"))}
    if op == "throttle-clear":
        key = throttle_key(str(request.get("key", "")))
        cleared = supervisor.state.clear(key)
        if supervisor.cluster is not None:
            cleared = await supervisor.cluster.throttle_clear(key) or cleared
        return {"ok": True, "cleared": cleared, "key": key}
    if op == "flush":
        return {"ok": True, "workers": len(await supervisor.fanout("flush"))}
    if op == "backend":
        return await _backend(supervisor, str(request.get("action")), request.get("name") or "")
    return {"ok": False, "error": f"unknown request {op!r}"}


async def _who(supervisor: Supervisor, user: str | None, backend: str | None) -> dict[str, Any]:
    """This node's sessions from its workers; with [cluster], every other node's from the
    registry in Redis."""
    lists = await supervisor.fanout("who", user, backend)
    sessions = [s for each in lists for s in each]
    answer: dict[str, Any] = {"ok": True}
    if supervisor.cluster is not None:
        for session in sessions:
            session["node"] = supervisor.cluster.node
        try:
            sessions += await supervisor.cluster.who(user, backend)
        except RedisUnavailable as e:
            answer["note"] = f"Redis unavailable ({e}): this node's sessions only"
    answer["sessions"] = sorted(sessions, key=lambda s: s["since"])
    return answer


async def _kick(supervisor: Supervisor, user: str | None, backend: str | None) -> dict[str, Any]:
    counts = await supervisor.fanout("kick", user, backend)
    answer: dict[str, Any] = {"ok": True, "kicked": sum(counts)}
    if supervisor.cluster is not None:
        try:
            answer["kicked"] += await supervisor.cluster.kick(user, backend)
        except RedisUnavailable as e:
            answer["note"] = f"Redis unavailable ({e}): kicked on this node only"
    return answer


async def _backend(supervisor: Supervisor, action: str, name: str) -> dict[str, Any]:
    """The supervisor keeps the node's backend health: it applies the command (and tells the
    workers); the members' session counts are the workers', summed. With [cluster], up, down
    and drain apply on every node."""
    if supervisor.router is None:
        return {"ok": False, "error": "no backend router"}
    answer = supervisor.router.command(action, name)
    if not answer.get("ok") or "members" not in answer:
        return answer
    if supervisor.cluster is not None and action != "list":
        named = [f"{m['pool']}/{m['member']}" for m in answer["members"]]
        try:
            await supervisor.cluster.backend_changed(action, named)
        except RedisUnavailable as e:
            answer["note"] = f"Redis unavailable ({e}): applied on this node only"
    sessions: dict[tuple[str, str], int] = {}
    for listing in await supervisor.fanout("backend", "list", ""):
        for member in listing.get("members", []):
            key = (member["pool"], member["member"])
            sessions[key] = sessions.get(key, 0) + int(member.get("sessions", 0))
    members = [
        {**m, "sessions": sessions.get((m["pool"], m["member"]), 0)} for m in answer["members"]
    ]
    return {**answer, "members": members}


def _summary(supervisor: Supervisor, workers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "generation": supervisor.generation,
        "workers": len(supervisor.workers),
        "draining": sum(1 for w in supervisor.workers.values() if w.draining),
        "relayed": sum(w.get("relayed", 0) for w in workers),
        "logging_in": sum(w.get("logging_in", 0) for w in workers),
        "connections": sum(w.get("connections", 0) for w in workers),
        "handshakes": sum(w.get("handshakes", 0) for w in workers),
        "throttled": len(supervisor.state.keys(time.monotonic())),
        **{
            key: sum(w.get(key, 0) for w in workers)
            for key in REDIS_STATS
            if any(key in w for w in workers)
        },
    }


# What the workers count of their Redis use (cluster.py WorkerCluster.stats), summed.
REDIS_STATS = (
    "redis_up", "redis_logins", "redis_round_trips", "redis_batches", "redis_batched",
    "redis_dropped",
)  # fmt: skip


def throttle_key(target: str) -> str:
    """`mailgate throttle show|clear X`: an address (its /64 for IPv6) or a user name."""
    try:
        ipaddress.ip_address(target)
    except ValueError:
        return "user:" + (user_key(target) or "")
    return "ip:" + subscriber(target)


def _throttle_show(supervisor: Supervisor, target: str | None) -> list[dict[str, object]]:
    now = time.monotonic()
    keys = [throttle_key(target)] if target else supervisor.state.keys(now)
    entries = [supervisor.state.show(key, now) for key in keys]
    return [entry for entry in entries if entry is not None]


# --- the command line's end -------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], timeout: float = CLIENT_TIMEOUT) -> dict[str, Any]:
    """Send one request to the control socket at `path`; its answer. Raises ControlError."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
                if len(data) > MAX_ANSWER:
                    raise ControlError("the answer is too large")
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is mailgate running?") from None
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    try:
        answer: dict[str, Any] = json.loads(data)
    except ValueError:
        raise ControlError("the answer is not JSON") from None
    if not answer.get("ok"):
        raise ControlError(str(answer.get("error", "failed")))
    return answer
