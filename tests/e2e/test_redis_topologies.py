"""The cluster's state through Redis Sentinel and Redis Cluster (real redis-server processes,
in sentinel and cluster mode): the URL forms of docs/scale-out.md reach a master, the scripts
run (every key in one hash slot), batches, the registry and pub/sub work."""

from __future__ import annotations

import asyncio
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailgate import redisconn
from mailgate.redisstore import ClaimRequest, LoginRequest, RedisState, ThrottleParams

from .conftest import peers, require

PARAMS = ThrottleParams(5, 60_000, 600_000, 4, 8, 5)
WAIT = 30.0


def wait_for(check, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT} s: {what}")
        time.sleep(0.1)


def cli(port: int, *args: str) -> str:
    done = subprocess.run(
        ["redis-cli", "-p", str(port), *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    return done.stdout


async def exercise(url: str) -> None:
    target = redisconn.parse_url(url)
    owner = f"n1/{secrets.token_hex(2)}/1"
    state = RedisState(redisconn.client(target, timeout=5.0), "topo", owner)
    try:
        assert (await state.heartbeat(30_000))[0]
        claim = ClaimRequest("stores", "alice@example.com", 600_000, ("a", "b"), ("a", "b"))
        request = LoginRequest(
            "t1", 60_000, PARAMS, "192.0.2.1", "alice@example.com", False, (2, 0, 0),
            "alice@example.com", [claim],
        )  # fmt: skip
        answer = await state.login(request)
        assert (answer.verdict, answer.lease, answer.claims[0].member) == ("allowed", "ok", "a")
        conflicts: list[tuple[str, ...]] = []
        state.settled_later("t1", "192.0.2.1", "alice@example.com")
        state.session_start_later("t1", "stores", "alice@example.com", "a", 600_000, [],
                                  lambda *c: conflicts.append(c))  # fmt: skip
        for _ in range(50):
            await asyncio.sleep(0.05)
            if state.counters.batched >= 2:
                break
        assert state.counters.batched == 2 and state.counters.dropped == 0 and not conflicts
        await state.publish_registry({"1.1": '{"user": "alice"}'}, [], 30_000, replace=True)
        assert await state.call("HLEN", state.keys("s", owner)) == 1
        assert await state.reap(owner) == 4  # u:, ui:, i: and alice's session on a

        pubsub = state.client.pubsub()
        await pubsub.subscribe(state.keys("ch", "kick"))
        await pubsub.get_message(timeout=2.0)  # the subscription's confirmation
        assert await state.call("PUBLISH", state.keys("ch", "kick"), "hello") >= 1
        message = None
        for _ in range(40):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.25)
            if message:
                break
        assert message is not None and message["data"] == b"hello"
        await pubsub.aclose()
    finally:
        await state.close()


@pytest.fixture
def sentinel(tmp_path: Path) -> Iterator[str]:
    require("redis-server", "redis-cli")
    master = peers.start_redis(tmp_path, peers.free_port(), name="master")
    port = peers.free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
        f"sentinel monitor mymaster 127.0.0.1 {master.ports['redis']} 1\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
    )
    log = tmp_path / "sentinel.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            ["redis-server", str(conf), "--sentinel"], stdout=out, stderr=out,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: "mymaster" in cli(port, "SENTINEL", "masters"), "the sentinel knows it")
        yield f"redis+sentinel://127.0.0.1:{port}/mymaster/0"
    finally:
        proc.terminate()
        proc.wait(10)
        master.stop()


def test_through_redis_sentinel(sentinel: str) -> None:
    asyncio.run(exercise(sentinel))


def cluster_port() -> int:
    """A free port for a Redis Cluster node: its bus listens 10000 higher (so at most 55535,
    or redis-server refuses to start), and that one must be free too."""
    while True:
        port = peers.free_port()
        if port > 55535:
            continue
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[str]:
    require("redis-server", "redis-cli")
    procs, ports = [], []
    try:
        for i in range(3):
            port = cluster_port()
            work = tmp_path / f"c{i}"
            work.mkdir()
            log = work / "redis.log"
            with log.open("ab") as out:
                procs.append(subprocess.Popen(
                    ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                     "--cluster-enabled", "yes", "--cluster-config-file", str(work / "nodes.conf"),
                     "--save", "", "--appendonly", "no", "--dir", str(work)],
                    stdout=out, stderr=out, start_new_session=True,
                ))  # fmt: skip
            ports.append(port)
        for port in ports:
            wait_for(lambda port=port: cli(port, "PING").strip() == "PONG", "a cluster node")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
             "--cluster-yes"], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert created.returncode == 0, created.stdout + created.stderr
        wait_for(lambda: "cluster_state:ok" in cli(ports[0], "CLUSTER", "INFO"), "cluster ok")
        yield f"redis+cluster://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


def test_through_redis_cluster(redis_cluster: str) -> None:
    asyncio.run(exercise(redis_cluster))
