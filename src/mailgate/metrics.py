"""Prometheus counters. Every worker counts into its own registry; with several workers the
multiprocess mode of prometheus_client aggregates them (see server.py)."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge

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
