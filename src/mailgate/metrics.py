"""Prometheus counters. Every worker counts into its own registry; with several workers the
multiprocess mode of prometheus_client aggregates them (see server.py).

The login path does not touch prometheus_client: `count` and `add` put the amounts in a dict,
and `flush` hands them over (each worker every FLUSH_INTERVAL, and before any collection in
this process). A child's inc() is a lock, two checks and, in multiprocess mode, a write to an
mmap'd file: ten of them per login showed as a tenth of mailgate's Python calls per login.
A scrape may see a worker's counts up to FLUSH_INTERVAL late.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.registry import Collector

FLUSH_INTERVAL = 1.0  # seconds, between a worker's hand-overs (server.py)

# (metric, *labels) -> amount not yet handed to prometheus_client (a Gauge's is a delta).
_pending: dict[tuple[Any, ...], float] = {}
# ((histogram, *labels), seconds) observed and not yet handed over.
_observed: list[tuple[tuple[Any, ...], float]] = []


class _FlushFirst(Collector):
    """Registered before every metric of this module: a collection in this process (the
    single-process /metrics, a test reading REGISTRY) first takes the pending amounts."""

    def collect(self) -> Iterator[Any]:
        flush()
        return iter(())

    def describe(self) -> Iterator[Any]:
        return iter(())  # no metric of its own (and register() must not collect yet)


REGISTRY.register(_FlushFirst())

SESSIONS = Counter(
    "mailgate_sessions_total", "Sessions ended, by protocol and outcome", ["protocol", "outcome"]
)
LOGINS = Counter(
    "mailgate_logins_total",
    "Login attempts, by protocol and result (ok, rejected, tempfail, backend_error)",
    ["protocol", "result"],
)
THROTTLE = Counter(
    "mailgate_throttle_actions_total",
    "Throttle decisions: locked, budget, concurrent (refused before the check), lockout "
    "(a lock-out began), delayed, spraying",
    ["action"],
)
RELOADS = Counter("mailgate_reloads_total", "Reloads, by result (ok, failed)", ["result"])
BYTES = Counter(
    "mailgate_relay_bytes_total", "Bytes relayed after login", ["protocol", "direction"]
)
ACTIVE = Gauge(
    "mailgate_active_sessions",
    "Sessions open now, by phase",
    ["phase"],
    multiprocess_mode="livesum",
)
AUTH_DURATION = Histogram(
    "mailgate_auth_duration_seconds",
    "Time the authenticator took to decide a login (auth service or directory, route cache"
    " and throttle checks included; not the throttle's delay), by protocol and result"
    " (ok, rejected, tempfail)",
    ["protocol", "result"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
TLS_HANDSHAKE_FAILURES = Counter(
    "mailgate_tls_handshake_failures_total",
    "TLS handshakes with clients that failed or timed out, by protocol and kind"
    " (implicit, starttls)",
    ["protocol", "kind"],
)
ACTIVE_PREAUTH = (ACTIVE, "preauth")  # for add(): +1 when a session starts, -1 when it ends
ACTIVE_RELAY = (ACTIVE, "relay")
# Children by (metric, *labels), looked up once: labels() is a lock and a dict per call.
_children: dict[tuple[object, ...], Any] = {}

# --- backends and pools (backend/routing.py, backend/health.py) -----------------------------

BACKEND_STATES = ("up", "down", "draining", "half-open")
BACKEND_UP = Gauge(
    "mailgate_backend_up",
    "1 while a pool member takes new logins (up), 0 while it is down, draining or half-open",
    ["pool", "member"],
    multiprocess_mode="livemin",  # with per-worker checks: 0 as soon as one worker says so
)
BACKEND_STATE = Gauge(
    "mailgate_backend_state",
    "1 for a pool member's current state (up, down, draining, half-open), 0 for the others",
    ["pool", "member", "state"],
    multiprocess_mode="livemax",
)
BACKEND_STATE_CHANGES = Counter(
    "mailgate_backend_state_changes_total",
    "Times a pool member entered a state",
    ["pool", "member", "state"],
)
BACKEND_SESSIONS = Gauge(
    "mailgate_backend_sessions",
    'Relayed sessions open now per backend (pool member, or host:port with pool="")',
    ["pool", "member"],
    multiprocess_mode="livesum",
)
BACKEND_LOGIN_FAILURES = Counter(
    "mailgate_backend_login_failures_total",
    "Backend logins that failed, by reason: connect, temporary (the backend in trouble),"
    " refused (the backend refused the credentials), unavailable (no member took the login:"
    " down, draining, ramping up), loop (a route to mailgate itself), unknown_pool",
    ["pool", "member", "reason"],
)
BACKEND_CHECK_DURATION = Histogram(
    "mailgate_backend_check_duration_seconds",
    "Active health checks of pool members (connect, greeting, TLS), by result (ok, failed)",
    ["pool", "member", "result"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)


def backend_state(pool: str, member: str, state: str, *, changed: bool = False) -> None:
    BACKEND_UP.labels(pool, member).set(1 if state == "up" else 0)
    for name in BACKEND_STATES:
        BACKEND_STATE.labels(pool, member, name).set(1 if name == state else 0)
    if changed:
        BACKEND_STATE_CHANGES.labels(pool, member, state).inc()


def backend_sessions(pool: str, member: str, delta: int) -> None:
    key = (BACKEND_SESSIONS, pool, member)
    _pending[key] = _pending.get(key, 0) + delta


def backend_failure(pool: str, member: str, reason: str) -> None:
    count(BACKEND_LOGIN_FAILURES, pool, member, reason)


def observe_check(pool: str, member: str, ok: bool, seconds: float) -> None:
    BACKEND_CHECK_DURATION.labels(pool, member, "ok" if ok else "failed").observe(seconds)


def count(metric: Counter, *labels: str, amount: float = 1) -> None:
    key = (metric, *labels)
    _pending[key] = _pending.get(key, 0) + amount


def add(gauge: tuple[Gauge, str], delta: int) -> None:
    """A change of a one-label gauge such as ACTIVE_PREAUTH."""
    _pending[gauge] = _pending.get(gauge, 0) + delta


def flush_every(loop: asyncio.AbstractEventLoop, interval: float = FLUSH_INTERVAL) -> None:
    """Flush every `interval` seconds, for as long as `loop` runs."""

    def tick() -> None:
        flush()
        loop.call_later(interval, tick)

    loop.call_later(interval, tick)


def observe(histogram: Histogram, seconds: float, *labels: str) -> None:
    _observed.append(((histogram, *labels), seconds))


def flush() -> None:
    """Hand the pending amounts to prometheus_client."""
    while _observed:
        key, seconds = _observed.pop()
        _child(key).observe(seconds)
    while _pending:
        key, amount = _pending.popitem()
        if amount:
            _child(key).inc(amount)  # a Gauge's inc() takes a negative delta too


def _child(key: tuple[Any, ...]) -> Any:
    child = _children.get(key)
    if child is None:
        child = _children[key] = key[0].labels(*key[1:])
    return child


def use_multiprocess() -> str | None:
    """Workers count, the supervisor serves: prometheus_client's multiprocess mode, in a
    directory of our own (removed by the caller at exit) unless PROMETHEUS_MULTIPROC_DIR names
    one. Call it before any value is counted: the mode is chosen per value when it is made,
    by the class prometheus_client picked at import, which this picks again. Returns the
    directory made, or None."""
    import os
    import tempfile

    from prometheus_client import values

    made = None
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        made = os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="mailgate-metrics-")
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    _children.clear()
    return made


def serve(listen: str) -> None:
    """Expose the counters over HTTP on a thread (prometheus_client's own server).

    With several workers, each counts into files under PROMETHEUS_MULTIPROC_DIR (set by the
    CLI before anything imports prometheus_client) and this, in the supervisor, sums them.
    """
    import os

    from prometheus_client import CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from mailgate.config import parse_address

    host, port = parse_address(listen, "metrics_listen")
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(port, host or "0.0.0.0", registry=registry)
    else:
        start_http_server(port, host or "0.0.0.0")


def worker_died(pid: int) -> None:
    """Drop a dead worker's live gauges (multiprocess mode only)."""
    import os

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
