"""Prometheus counters. Every worker counts into its own registry; with several workers the
multiprocess mode of prometheus_client aggregates them (see server.py)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

SESSIONS = Counter(
    "mailgate_sessions_total", "Sessions ended, by protocol and outcome", ["protocol", "outcome"]
)
LOGINS = Counter(
    "mailgate_logins_total",
    "Login attempts, by protocol and result (ok, rejected, tempfail, backend_error)",
    ["protocol", "result"],
)
BYTES = Counter(
    "mailgate_relay_bytes_total", "Bytes relayed after login", ["protocol", "direction"]
)
ACTIVE = Gauge(
    "mailgate_active_sessions",
    "Sessions open now, by phase",
    ["phase"],
    multiprocess_mode="livesum",
)
