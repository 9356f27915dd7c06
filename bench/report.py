"""The tables: one per run (rows are paths, medians over rounds), the evidence that the load
generator and the backend are not the bottleneck (cores busy per process), database round
trips, and at the end the ratios, each the median of the per-round ratios (each round runs the
paths back to back, so a round where the whole box was slow cancels out), with the issue's
targets beside them.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from paths import LOGIN_RUNS, TLS_RUNS

Rows = list[dict[str, float]]
Results = dict[str, dict[str, Rows]]  # run -> path -> one result per round

LOGIN_TITLES = {
    "imap": "IMAP logins (LOGIN, LOGOUT)",
    "pop3": "POP3 logins (USER, PASS, QUIT)",
    "imaps-ec": "IMAPS logins, ECDSA P-256 certificate, full handshake every time",
    "imaps-ec-resume": "IMAPS logins, ECDSA P-256, resuming the last session (tickets)",
    "imaps-rsa": "IMAPS logins, RSA-2048 certificate, full handshake every time",
    "imaps-rsa-resume": "IMAPS logins, RSA-2048, resuming the last session (tickets)",
}


def median(rows: Rows, key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(title: str, header: Sequence[str], lines: list[list[str]]) -> None:
    if not lines:
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print(
        "  "
        + "  ".join(
            h.ljust(w) if i == 0 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    )
    for line in lines:
        print(
            "  "
            + "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def busy(rows: Rows, keys: Sequence[str]) -> str:
    """Cores busy (CPU s / wall s) per process group, median over rounds."""
    parts = []
    for key in keys:
        values = [r[f"{key}_cpu_s"] / r["seconds"] for r in rows if f"{key}_cpu_s" in r]
        parts.append(f"{statistics.median(values):.2f}" if values else "-")
    return "/".join(parts)


def login_tables(results: Results) -> None:
    for run in LOGIN_RUNS:
        by_path = results.get(run, {})
        lines = []
        for path, rows in by_path.items():
            line = [
                path,
                fmt(median(rows, "per_second")),
                fmt(median(rows, "p50_ms"), 1),
                fmt(median(rows, "p99_ms"), 1),
            ]
            for key in (
                "proxy",
                "proxy_user",
                "proxy_sys",
                "auth",
                "db",
                "total",
                "backend",
                "loadgen",
            ):
                line.append(fmt(median(rows, f"{key}_us_per_login")))
            line.append(fmt(median(rows, "dbc_round_trips_per_login"), 2))
            if run in TLS_RUNS:
                line.append(fmt(median(rows, "resumed_pct")))
            line.append(busy(rows, ("proxy", "auth", "db", "backend", "loadgen")))
            lines.append(line)
        header = [
            "path",
            "logins/s",
            "p50 ms",
            "p99 ms",
            "proxy µs",
            "user",
            "sys",
            "auth µs",
            "db µs",
            "total µs",
            "imapd µs",
            "loadgen µs",
            "db trips",
        ]
        if run in TLS_RUNS:
            header.append("resumed %")
        header.append("busy: proxy/auth/db/imapd/loadgen")
        table(f"{LOGIN_TITLES[run]}: CPU per login (median over rounds)", header, lines)


DB_COLUMNS = (
    ("round trips", "round_trips"),
    ("segments", "segments"),
    ("connects", "connections"),
    ("pg sessions", "sessions"),
    ("Questions", "questions"),
    ("SELECT", "com_select"),
    ("pings", "com_admin_commands"),
    ("ROLLBACK", "com_rollback"),
    ("COMMIT", "com_commit"),
    ("prepare", "com_stmt_prepare"),
    ("execute", "com_stmt_execute"),
    ("pg commit", "xact_commit"),
    ("pg rollback", "xact_rollback"),
    ("tup returned", "tup_returned"),
    ("tup fetched", "tup_fetched"),
)


def database_table(results: Results) -> None:
    lines = []
    for run in ("imap", "pop3"):
        for path, rows in results.get(run, {}).items():
            if not any("dbc_round_trips" in r for r in rows):
                continue
            lines.append(
                [f"{path} ({run})"]
                + [fmt(median(rows, f"dbc_{key}_per_login"), 2) for _, key in DB_COLUMNS]
            )
    header = ["path", *(label for label, _ in DB_COLUMNS)]
    table(
        "Database work per login (MariaDB: status counters, round trips = Questions + pings + "
        "prepares; PostgreSQL: pg_stat_database, round trips = the statements below)",
        header,
        lines,
    )


def fetch_table(results: Results) -> None:
    lines = []
    for path, rows in results.get("fetch", {}).items():
        lines.append(
            [
                path,
                fmt(median(rows, "mb_per_s")),
                fmt(median(rows, "p50_ms"), 2),
                fmt(median(rows, "max_ms"), 1),
                fmt(median(rows, "proxy_cpu_s_per_gb"), 2),
                fmt(median(rows, "backend_cpu_s_per_gb"), 2),
                fmt(median(rows, "loadgen_cpu_s_per_gb"), 2),
                busy(rows, ("proxy", "backend", "loadgen")),
            ]
        )
    header = [
        "path",
        "MB/s",
        "p50 ms",
        "max ms",
        "proxy s/GB",
        "imapd s/GB",
        "loadgen s/GB",
        "busy: proxy/imapd/loadgen",
    ]
    table("1 MiB FETCH, one connection: throughput and CPU per GB relayed", header, lines)


def idle_table(results: Results) -> None:
    lines = []
    for path, rows in results.get("idle", {}).items():
        r = rows[0]
        lines.append(
            [
                path,
                f"{r['open']:.0f}",
                f"{r['pss_kib_per_session']:.2f}",
                f"{r['anon_kib_per_session']:.2f}",
                f"{r['anon_kib_per_session_2nd_half']:.2f}",
                f"{r['pss_before_kib'] / 1024:.1f}",
                f"{r['pss_during_kib'] / 1024:.1f}",
                f"{r['pss_after_close_kib'] / 1024:.1f}",
                f"{r['failed']:.0f}/{r['dropped']:.0f}",
            ]
        )
    header = [
        "path",
        "sessions",
        "Pss KiB/s.",
        "Pss_Anon KiB/s.",
        "2nd half",
        "Pss MiB before",
        "with K",
        "after close",
        "failed/dropped",
    ]
    table("Memory per idle logged-in session (proxy process tree)", header, lines)


def syscall_table(syscalls: dict[str, dict[str, float]]) -> None:
    lines = []
    for path, r in syscalls.items():
        top = [(k, v) for k, v in r.items() if k not in ("logins", "total")][:8]
        lines.append([path, f"{r['total']:.1f}", "  ".join(f"{k} {v:.1f}" for k, v in top)])
    table(
        "Syscalls per IMAP login of the proxy processes (strace -c -f, small run)",
        ["path", "per login", "top syscalls per login"],
        lines,
    )


# ---------------------------------------------------------------- ratios


@dataclass(frozen=True)
class Ratio:
    label: str
    run: str
    key: str
    a: str
    b: str | None  # None: the value itself, not a ratio
    target: float | None = None
    at_least: bool = False  # the target is a floor, not a ceiling

    def value(self, results: Results) -> float | None:
        rows_a = results.get(self.run, {}).get(self.a)
        if not rows_a:
            return None
        if self.b is None:
            return median(rows_a, self.key)
        rows_b = results.get(self.run, {}).get(self.b)
        if not rows_b:
            return None
        pairs = zip(rows_a, rows_b, strict=False)
        values = [
            x[self.key] / y[self.key]
            for x, y in pairs
            if self.key in x and self.key in y and y[self.key]
        ]
        return statistics.median(values) if values else None


def standard_ratios() -> list[Ratio]:
    cpu = "proxy_us_per_login"
    out = []
    for run in ("imap", "pop3"):
        name = run.upper()
        out += [
            Ratio(
                f"{name} login CPU, directory (cached) / nginx", run, cpu, "mg-sqlite", "nginx", 1.0
            ),
            Ratio(f"{name} login CPU, auth_http / nginx", run, cpu, "mg-http", "nginx", 1.3),
            Ratio(
                f"{name} login CPU, directory (cached) / minimal proxy",
                run,
                cpu,
                "mg-sqlite",
                "minproxy",
            ),
            Ratio(f"{name} login CPU, auth_http / minimal proxy", run, cpu, "mg-http", "minproxy"),
            Ratio(f"{name} login CPU, minimal proxy / nginx", run, cpu, "minproxy", "nginx"),
            Ratio(f"{name} login CPU, HAProxy (relay only) / nginx", run, cpu, "haproxy", "nginx"),
        ]
    out.append(
        Ratio(
            "IMAP login CPU, SQLite uncached / cached",
            "imap",
            cpu,
            "mg-sqlite-nocache",
            "mg-sqlite",
        )
    )
    for run in TLS_RUNS:
        out += [
            Ratio(f"{run} login CPU, auth_http / nginx", run, cpu, "mg-http", "nginx", 1.1),
            Ratio(
                f"{run} login CPU, directory (cached) / nginx", run, cpu, "mg-sqlite", "nginx", 1.1
            ),
            Ratio(
                f"{run} login CPU, auth_http / HAProxy (TLS + relay)",
                run,
                cpu,
                "mg-http",
                "haproxy",
            ),
            Ratio(f"{run} login CPU, auth_http / minimal proxy", run, cpu, "mg-http", "minproxy"),
        ]
    total = "total_us_per_login"
    for path in ("mg-mariadb-nocache", "mg-pg-nocache", "mg-seed"):
        out.append(
            Ratio(
                f"uncached login, proxy+auth+db CPU, {path} / seed",
                "imap",
                total,
                path,
                "seed",
                0.5,
            )
        )
    for path in ("mg-mariadb-nocache", "mg-pg-nocache", "mg-seed", "seed"):
        out.append(
            Ratio(
                f"database round trips per login, {path}",
                "imap",
                "dbc_round_trips_per_login",
                path,
                None,
                2.0 if path != "seed" else None,
            )
        )
    out += [
        Ratio(
            "relay CPU per GB, mailgate / HAProxy",
            "fetch",
            "proxy_cpu_s_per_gb",
            "mg-http",
            "haproxy",
            1.0,
        ),
        Ratio(
            "relay CPU per GB, mailgate / nginx", "fetch", "proxy_cpu_s_per_gb", "mg-http", "nginx"
        ),
        Ratio(
            "relay CPU per GB, mailgate / minimal proxy",
            "fetch",
            "proxy_cpu_s_per_gb",
            "mg-http",
            "minproxy",
        ),
        Ratio("FETCH MB/s, mailgate / direct", "fetch", "mb_per_s", "mg-http", "direct"),
        Ratio(
            "idle session Pss, mailgate / HAProxy",
            "idle",
            "pss_kib_per_session",
            "mg-http",
            "haproxy",
            1.0,
        ),
        Ratio(
            "idle session Pss_Anon, mailgate / HAProxy",
            "idle",
            "anon_kib_per_session",
            "mg-http",
            "haproxy",
        ),
        Ratio(
            "idle session Pss_Anon, 2nd half only, mailgate / HAProxy",
            "idle",
            "anon_kib_per_session_2nd_half",
            "mg-http",
            "haproxy",
        ),
        Ratio(
            "idle session Pss, mailgate / nginx", "idle", "pss_kib_per_session", "mg-http", "nginx"
        ),
        Ratio(
            'IMAP logins/s, workers = "auto" (2) / workers = 1',
            "imap",
            "per_second",
            "mg-http-w2",
            "mg-http",
            1.8,
            at_least=True,
        ),
    ]
    return out


def compare_ratios(results: Results, label: str) -> list[Ratio]:
    """Each mailgate path of the compared checkout against the same path of the primary."""
    out = []
    for run in (*LOGIN_RUNS, "fetch", "idle"):
        key = {"fetch": "proxy_cpu_s_per_gb", "idle": "anon_kib_per_session"}.get(
            run, "proxy_us_per_login"
        )
        for path in results.get(run, {}):
            if path.endswith(label):
                base = path.removesuffix(label)
                out.append(Ratio(f"{run} {key}, {path} / {base}", run, key, path, base))
    return out


def ratio_table(results: Results, ratios: list[Ratio]) -> None:
    lines = []
    for ratio in ratios:
        value = ratio.value(results)
        if value is None:
            continue
        target = status = ""
        if ratio.target is not None:
            target = ("≥ " if ratio.at_least else "≤ ") + f"{ratio.target:g}"
            met = value >= ratio.target if ratio.at_least else value <= ratio.target
            status = "met" if met else "NOT met"
        lines.append([ratio.label, f"{value:.2f}", target, status])
    table(
        "Ratios (median of per-round ratios; targets from issue 10)",
        ["figure", "ratio", "target", ""],
        lines,
    )


def statements_table(statements: dict[str, dict[str, float]]) -> None:
    lines = []
    for path, counted in statements.items():
        for i, (statement, n) in enumerate(counted.items()):
            lines.append([path if i == 0 else "", f"{n:.2f}", statement])
    table(
        "PostgreSQL statements per IMAP login (log_statement = all, a run of its own)",
        ["path", "per login", "statement (round_trips = all of them)"],
        lines,
    )


def report(
    results: Results,
    syscalls: dict[str, dict[str, float]],
    compare: list[str],
    statements: dict[str, dict[str, float]],
) -> None:
    idle_table(results)
    login_tables(results)
    database_table(results)
    statements_table(statements)
    fetch_table(results)
    if syscalls:
        syscall_table(syscalls)
    ratios = standard_ratios()
    for label in compare:
        ratios += compare_ratios(results, label)
    ratio_table(results, ratios)


def profile_report(
    name: str,
    login: dict[str, float],
    own: list[tuple[str, float]],
    inclusive: list[tuple[str, float]],
) -> None:
    print(
        f"\npy-spy, {name}: {login['logins']:.0f} logins at {login['per_second']:.0f}/s, "
        f"{login['proxy_us_per_login']:.0f} µs CPU per login under the profiler"
    )
    table(
        "  top functions by own time", ["function", "% samples"], [[f, f"{p:.1f}"] for f, p in own]
    )
    table(
        "  top functions by inclusive time",
        ["function", "% samples"],
        [[f, f"{p:.1f}"] for f, p in inclusive],
    )
