"""Backend pools through a real mailgate worker, with fake backends for the faults: a backend
that accepts and never greets, one that refuses connections, one that comes back on the same
port; the half-open probe; active checks; shared-storage failover; the loop guard."""

from __future__ import annotations

import asyncio
import imaplib
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import REGISTRY

from harness import FakeAuth, free_port, listener, route_to, running_auth, running_proxy
from mailgate.backend import pools as P
from mailgate.backend.routing import BackendRouter

WAIT = 10.0  # the longest wait for something the checks should do within a second or two


class ImapServer(socketserver.ThreadingTCPServer):
    """A tiny IMAP backend on a chosen port: LOGIN ok, LOGOUT; or, with `greet=False`, one
    that accepts and never says a word. Counts the connections it accepted."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int, greet: bool = True) -> None:
        self.greet = greet
        self.accepted = 0
        self.stop_event = threading.Event()
        super().__init__(("127.0.0.1", port), _ImapHandler)


class _ImapHandler(socketserver.StreamRequestHandler):
    server: ImapServer

    def handle(self) -> None:
        self.server.accepted += 1
        if not self.server.greet:
            self.server.stop_event.wait(30)
            return
        self.wfile.write(b"* OK fake ready\r\n")
        for line in self.rfile:
            tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
            verb = rest.split(b" ", 1)[0].upper()
            if verb == b"LOGIN":
                self.wfile.write(tag + b" OK Logged in\r\n")
            elif verb == b"LOGOUT":
                self.wfile.write(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                return
            else:
                self.wfile.write(tag + b" OK " + verb + b" done\r\n")


@contextmanager
def imap_server(port: int = 0, greet: bool = True) -> Iterator[ImapServer]:
    srv = ImapServer(port, greet)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.stop_event.set()
        srv.shutdown()
        srv.server_close()


def port_of(srv: ImapServer) -> int:
    return int(srv.server_address[1])


def config(auth_url: str, *pools: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "listener": [listener("imap")],
        "auth_http": {"url": auth_url},
        "backend": {"connect_timeout": 1.0, "login_timeout": 1.0},
        "pool": list(pools),
        **extra,
    }


def router_of(proxy: Any, pool: str) -> BackendRouter:
    """The running worker's router, which serves this test's pool."""
    router: BackendRouter = proxy.worker.router
    assert pool in router.pools, router.pools
    return router


def on_loop(proxy: Any, call: Callable[[], Any]) -> Any:
    async def run() -> Any:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), proxy.loop).result(5)


def up(pool: str, member: str) -> float | None:
    return REGISTRY.get_sample_value("mailgate_backend_up", {"pool": pool, "member": member})


def imap_login(port: int, user: str = "alice") -> tuple[str, float]:
    """('ok' | the error text, seconds the login took)."""
    started = time.perf_counter()
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        try:
            client.login(user, "pw")
        except imaplib.IMAP4.error as e:
            return str(e), time.perf_counter() - started
        took = time.perf_counter() - started
        client.logout()
        return "ok", took


def wait_for(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def test_a_backend_that_never_greets_goes_down_then_logins_fail_fast() -> None:
    with (
        imap_server(greet=False) as hung,
        running_auth(FakeAuth(route_to(port_of(hung)))) as auth,
    ):
        pool = {"name": "hung", "members": [f"127.0.0.1:{port_of(hung)}"]}
        pool |= {"check_interval": 0, "failures_to_down": 2, "half_open_after": 60}
        with running_proxy(config(auth.url, pool)) as proxy:
            port = proxy.port("imap")
            slow = [imap_login(port) for _ in range(2)]  # each waits for login_timeout
            assert all("UNAVAILABLE" in text for text, _ in slow)
            assert hung.accepted == 2
            assert up("hung", f"127.0.0.1:{port_of(hung)}") == 0
            fast = [imap_login(port) for _ in range(5)]
            assert all("UNAVAILABLE" in text for text, _ in fast)
            assert hung.accepted == 2  # no connection to a member that is down
            worst = max(took for _, took in fast)
            # The slow ones took the backend's login_timeout (1 s); the fast ones make no
            # connection at all, so they take a local login round trip.
            assert worst < 1.0, (slow, fast)
            print(f"hung member: slow {[round(t, 3) for _, t in slow]}, fast max {worst:.4f} s")


def test_a_refused_member_recovers_through_the_half_open_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mailgate.backend.routing")
    dead = free_port()
    name = f"127.0.0.1:{dead}"
    with running_auth(FakeAuth(route_to(dead))) as auth:
        pool = {"name": "flaky", "members": [name], "check_interval": 0}
        pool |= {"failures_to_down": 3, "half_open_after": 0.5, "reconnect_spread": 0}
        with running_proxy(config(auth.url, pool)) as proxy:
            port = proxy.port("imap")
            for _ in range(3):
                assert "UNAVAILABLE" in imap_login(port)[0]
            assert up("flaky", name) == 0
            with imap_server(dead) as back:
                assert "UNAVAILABLE" in imap_login(port)[0]  # still down: no probe yet
                assert back.accepted == 0
                time.sleep(0.6)  # half_open_after
                assert imap_login(port)[0] == "ok"  # the probe
                assert back.accepted == 1
                assert up("flaky", name) == 1
                assert imap_login(port)[0] == "ok"
            described = on_loop(proxy, lambda: router_of(proxy, "flaky").describe())
    transitions = [r.getMessage() for r in caplog.records if "backend flaky/" in r.getMessage()]
    assert [t.split(": ", 1)[1].split(" (")[0] for t in transitions] == [
        "up -> down",
        "down -> half-open",
        "half-open -> up",
    ]
    assert described[0]["state"] == "up" and described[0]["failures"] == 0


def test_active_checks_find_a_dead_member_and_bring_it_back() -> None:
    dead = free_port()
    name = f"127.0.0.1:{dead}"
    with running_auth(FakeAuth(route_to(dead))) as auth:
        pool = {"name": "checked", "members": [name], "check_interval": 0.1}
        pool |= {"check_timeout": 0.5, "failures_to_down": 2, "half_open_after": 0.3}
        with running_proxy(config(auth.url, pool)) as proxy:
            port = proxy.port("imap")
            # The checks start with the first login (until server.py starts them itself).
            assert "UNAVAILABLE" in imap_login(port)[0]
            assert wait_for(lambda: up("checked", name) == 0)
            with imap_server(dead) as back:
                assert wait_for(lambda: up("checked", name) == 1)
                assert back.accepted >= 1  # the check connected (and logged out)
                state = on_loop(proxy, lambda: router_of(proxy, "checked").describe()[0])
                assert state["last_check"]["ok"] is True
                assert state["last_check"]["detail"].startswith("* OK")
            count = REGISTRY.get_sample_value(
                "mailgate_backend_check_duration_seconds_count",
                {"pool": "checked", "member": name, "result": "ok"},
            )
            assert count and count >= 1


def test_shared_storage_fails_over_to_the_next_member_in_the_same_login() -> None:
    dead = free_port()
    with imap_server() as alive, running_auth(FakeAuth(route_to(dead))) as auth:
        members = [f"127.0.0.1:{dead}", f"127.0.0.1:{port_of(alive)}"]
        pool = {"name": "shared", "members": members, "shared_storage": True}
        pool |= {"check_interval": 0, "failures_to_down": 1, "half_open_after": 60}
        pool |= {"reconnect_spread": 0}
        with running_proxy(config(auth.url, pool)) as proxy:
            port = proxy.port("imap")
            # The auth service names the dead member; shared storage lets another serve.
            assert imap_login(port)[0] == "ok"
            assert alive.accepted == 1
            assert up("shared", members[0]) == 0
            assert imap_login(port)[0] == "ok"
            assert alive.accepted == 2
            # Drained, the last member takes nothing: a fast temporary failure.
            reply = on_loop(proxy, lambda: router_of(proxy, "shared").command("drain", members[1]))
            assert reply["ok"] and reply["members"][0]["state"] == "draining"
            assert "UNAVAILABLE" in imap_login(port)[0]
            assert alive.accepted == 2
            on_loop(proxy, lambda: router_of(proxy, "shared").command("up", members[1]))
            assert imap_login(port)[0] == "ok"


def test_sessions_per_member_are_counted_while_relayed() -> None:
    with imap_server() as store, running_auth(FakeAuth(route_to(port_of(store)))) as auth:
        name = f"127.0.0.1:{port_of(store)}"
        pool = {"name": "counted", "members": [name], "check_interval": 0}
        with running_proxy(config(auth.url, pool)) as proxy:
            clients = [imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10) for _ in range(3)]
            for c in clients:
                c.login("alice", "pw")
            gauge = {"pool": "counted", "member": name}
            assert REGISTRY.get_sample_value("mailgate_backend_sessions", gauge) == 3
            listed = on_loop(proxy, lambda: router_of(proxy, "counted").command("list"))
            assert listed["members"][0]["sessions"] == 3
            for c in clients:
                c.logout()
            assert wait_for(
                lambda: REGISTRY.get_sample_value("mailgate_backend_sessions", gauge) == 0
            )


@pytest.mark.parametrize(
    ("listen", "route_host"),
    [
        ("127.0.0.1", "127.0.0.1"),  # the listener's own address
        ("127.0.0.1", "localhost"),  # a name: refused once connected, before a byte is sent
        ("0.0.0.0", "127.0.0.9"),  # a wildcard bind listens on all of 127.0.0.0/8
    ],
)
def test_a_route_to_our_own_listener_is_refused(
    listen: str, route_host: str, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    with running_auth(FakeAuth(route_to(port, host=route_host))) as auth:
        raw = {
            "listener": [{"protocol": "imap", "listen": f"{listen}:{port}"}],
            "auth_http": {"url": auth.url},
        }
        with running_proxy(raw) as proxy:
            text, took = imap_login(port)
            assert "UNAVAILABLE" in text
            assert took < 1.0  # no loop: not one nested login after another
            assert wait_for(lambda: proxy.worker.connections == 0)  # nothing held open
    loops = [r.getMessage() for r in caplog.records if "proxy loop" in r.getMessage()]
    assert loops, "the refusal is logged"
    assert len(auth.requests) == 1  # one login, not a chain of them


def test_loop_guard_lets_other_ports_of_this_host_through() -> None:
    with imap_server() as store, running_auth(FakeAuth(route_to(port_of(store)))) as auth:
        raw = {
            "listener": [{"protocol": "imap", "listen": "0.0.0.0:0"}],
            "auth_http": {"url": auth.url},
        }
        with running_proxy(raw) as proxy:
            assert imap_login(proxy.ports[0])[0] == "ok"


def test_a_probe_event_is_not_lost_between_processes() -> None:
    """What a supervisor would broadcast: events from one router applied by another."""
    pool = {"name": "wire", "members": ["10.1.1.1:143"], "check_interval": 0}
    settings = config("http://127.0.0.1:1/auth", pool)
    from pathlib import Path

    from mailgate import config as cfg

    parsed = cfg.parse(settings, base_dir=Path("."))
    published: list[list[Any]] = []
    one = BackendRouter.from_settings(parsed, publish=lambda e: published.append(e.to_json()))
    other = BackendRouter.from_settings(parsed)
    one.command("drain", "10.1.1.1:143")
    for wire in published:
        other.apply_remote(P.HealthEvent.from_json(wire))
    assert other.describe()[0]["state"] == "draining"
    assert socket  # imported for the fakes above


def test_a_login_whose_hops_ran_out_is_refused_and_the_rest_go_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another proxy in front says x-proxy-ttl 1: proxying once more would be a loop."""
    with imap_server() as store, running_auth(FakeAuth(route_to(port_of(store)))) as auth:
        raw = config(auth.url)
        with running_proxy(raw) as proxy:
            with imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10) as client:
                client.xatom("ID", '("x-proxy-ttl" "1")')
                with pytest.raises(imaplib.IMAP4.error, match="UNAVAILABLE"):
                    client.login("alice", "pw")
            assert store.accepted == 0
            with imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10) as client:
                client.xatom("ID", '("x-proxy-ttl" "2")')
                client.login("alice", "pw")
            assert store.accepted == 1
    assert any("x-proxy-ttl 1" in r.getMessage() for r in caplog.records)


def test_the_backend_is_told_the_hops_left() -> None:
    from harness import imap_backend, running_backend

    fake = imap_backend(password="pw")
    with running_backend(fake), running_auth(FakeAuth(route_to(fake.port))) as auth:
        raw = config(auth.url)
        raw["backend"]["forward_client"] = True
        with running_proxy(raw) as proxy:
            with imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10) as client:
                client.xatom("ID", '("x-proxy-ttl" "3")')
                client.login("alice", "pw")
            with imaplib.IMAP4("127.0.0.1", proxy.port("imap"), timeout=10) as client:
                client.login("alice", "pw")
    ids = [line for line in fake.lines if b" ID (" in line]
    assert b'"x-proxy-ttl" "2"' in ids[0] and b'"x-proxy-ttl" "4"' in ids[1], ids
