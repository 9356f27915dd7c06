"""Prometheus counters. Every worker counts into its own registry; with several workers the
multiprocess mode of prometheus_client aggregates them (see server.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

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
# Children looked up once: these change on every session, on the hot path, where
# prometheus_client's labels() (a lock and a dict per call) showed in profiles.
ACTIVE_PREAUTH = ACTIVE.labels("preauth")
ACTIVE_RELAY = ACTIVE.labels("relay")
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
    child = _children.get(key)
    if child is None:
        child = _children[key] = BACKEND_SESSIONS.labels(pool, member)
    child.inc(delta)


def backend_failure(pool: str, member: str, reason: str) -> None:
    count(BACKEND_LOGIN_FAILURES, pool, member, reason)


def observe_check(pool: str, member: str, ok: bool, seconds: float) -> None:
    BACKEND_CHECK_DURATION.labels(pool, member, "ok" if ok else "failed").observe(seconds)


def count(metric: Counter, *labels: str, amount: float = 1) -> None:
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    child.inc(amount)


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
