"""Benchmark: one IMAP/POP3 backend reached directly and through every login proxy we compare.

    python bench/run.py              # the full comparison, ~12 minutes: 5 interleaved rounds
    python bench/run.py --quick      # ~1.5 minute smoke run: 2 short rounds
    python bench/run.py --selftest   # one tiny round (< 30 s): does the bench still run?
    python bench/run.py --scale      # 100,000 concurrent idle IMAP sessions through mailgate
    python bench/run.py --compare ../other/src   # another checkout's mailgate, same rounds

Paths: direct, nginx mail (1 worker, auth_http), HAProxy (TCP relay, 1 thread), a minimal
Python login proxy (bench/minproxy.py), mailgate (1 worker) over auth_http and with its
built-in directory (SQLite, MariaDB, PostgreSQL; route cache on and off), mailgate with
workers = "auto", the seed (nginx + embedded Perl mailauth.pm + MariaDB) and mailgate on the
seed's database. Everything listens on 127.0.0.1 on free high ports, lives in one temp dir and
is stopped by PID at the end, on an error and on Ctrl-C/SIGTERM. bench/README.md explains
every path, figure and mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from dbstats import PostgresStats
from lab import ROOT, Lab, compile_tools, make_certificates
from measure import (
    Params,
    fetch_run,
    idle_run,
    login_run,
    postgres_statements,
    profile_login,
    syscalls_per_login,
)
from paths import (
    NGINX_MODULES,
    RUNS,
    TLS_RUNS,
    BenchPath,
    Shared,
    build_paths,
    check_database_tools,
    mailgate_kinds,
    populate_directories,
    start_auth,
    start_databases,
    start_imapd,
    wanted,
)
from report import Results, Rows, profile_report, report

DEFAULT = Params(
    rounds=5,
    logins=3000,
    tls_logins=1000,
    concurrency=32,
    login_seconds=8,
    fetch_seconds=2,
    idle=2000,
    idle_seconds=40,
)
QUICK = Params(
    rounds=2,
    logins=300,
    tls_logins=60,
    concurrency=32,
    login_seconds=2,
    fetch_seconds=0.3,
    idle=300,
    idle_seconds=15,
    settle=0.3,
    warmup=30,
)
# One tiny strict round: its runs are the check, so no warm-up.
SELFTEST = Params(
    rounds=1,
    logins=60,
    tls_logins=20,
    concurrency=8,
    login_seconds=3,
    fetch_seconds=0.2,
    idle=60,
    idle_seconds=10,
    strict=True,
    settle=0.2,
    warmup=0,
)
# The order of the table rows (mailgate's paths follow, in paths.mailgate_kinds order).
ORDER = ("direct", "nginx", "haproxy", "minproxy", "seed")
# Logins through each path before its idle sessions are opened.
IDLE_CHECK_LOGINS = 20
# The self-test's paths: one of each kind of process and configuration (the variants left out
# differ from these by a setting only).
SELFTEST_PATHS = (
    "direct,nginx,haproxy,minproxy,seed,mg-http,mg-sqlite,mg-mariadb-nocache,mg-pg-nocache,mg-seed"
)


def params(args: argparse.Namespace) -> Params:
    p = SELFTEST if args.selftest else QUICK if args.quick else DEFAULT
    overrides = {"rounds": args.rounds, "logins": args.logins, "idle": args.idle}
    return dataclasses.replace(p, **{k: v for k, v in overrides.items() if v is not None})


def checkout_label(src: Path, taken: set[str]) -> str:
    """'@core' for .../core/src: how the compared checkout's paths are told apart."""
    src = src.resolve()
    label = "@" + (src.parent.name if src.name == "src" else src.name)
    while label in taken:
        label += "'"
    taken.add(label)
    return label


def mailgate_sources(args: argparse.Namespace) -> dict[str, Path]:
    primary = Path(args.mailgate_src).resolve()
    srcs, taken = {"": primary}, {""}
    for other in args.compare:
        srcs[checkout_label(Path(other), taken)] = Path(other).resolve()
    for src in srcs.values():
        if not (src / "mailgate" / "__main__.py").exists():
            raise SystemExit(f"{src}: no mailgate package there (give a checkout's src/)")
    return srcs


def needed_databases(patterns: list[str] | None, srcs: dict[str, Path]) -> tuple[bool, bool]:
    names = [kind.name for kind in mailgate_kinds()]
    mariadb = wanted("seed", patterns) or any(
        wanted(n, patterns) for n in names if "mariadb" in n or "mg-seed" in n
    )
    postgres = any(wanted(n, patterns) for n in names if "mg-pg" in n)
    return mariadb, postgres


def warm_up(shared: Shared, paths: list[BenchPath], p: Params) -> None:
    """Every path must log in cleanly on every run it takes before anything is measured."""
    small = dataclasses.replace(p, concurrency=min(8, p.concurrency))
    for path in paths:
        for run in RUNS:
            if not path.takes(run):
                continue
            if run == "fetch":
                r = fetch_run(shared, path, dataclasses.replace(small, fetch_seconds=0.2))
                if not r["fetches"]:
                    raise RuntimeError(f"{path.name}: FETCH failed: {r}")
                continue
            r = login_run(shared, path, run, small, logins=p.warmup)
            if r["failed"] or r["unfinished"] or not r["logins"]:
                raise RuntimeError(f"{path.name} {run}: warm-up logins failed: {r}")
            if run in TLS_RUNS and TLS_RUNS[run][1] == "resume" and not r["resumed"]:
                print(f"  note: {path.name} {run}: the server resumed no TLS session")


def memory(shared: Shared, paths: list[BenchPath], p: Params) -> dict[str, Rows]:
    """Memory per idle session, first: before the warm-up, so that what the proxies freed
    after thousands of logins does not hide what the sessions cost. A few logins first bring up
    what every session uses (the auth service's connection pool, the first backend login)."""
    found: dict[str, Rows] = {}
    check = dataclasses.replace(p, concurrency=min(8, p.concurrency), strict=True)
    for path in paths:
        if p.idle and path.takes("idle"):
            login_run(shared, path, "imap", check, logins=IDLE_CHECK_LOGINS)
            r = idle_run(shared, path, p)
            found[path.name] = [r]
            print(
                f"idle  {path.name:20} {r['open']:.0f} sessions: Pss "
                f"{r['pss_kib_per_session']:.2f}, Pss_Anon {r['anon_kib_per_session']:.2f} "
                "KiB per session"
            )
    return found


def rounds(shared: Shared, paths: list[BenchPath], p: Params, idle: dict[str, Rows]) -> Results:
    results: Results = {run: {} for run in RUNS}
    results["idle"] = idle
    for n in range(p.rounds):
        order = paths[n % len(paths) :] + paths[: n % len(paths)]  # no path always runs first
        for run in RUNS:
            for path in order:
                if not path.takes(run):
                    continue
                if run == "fetch":
                    r = fetch_run(shared, path, p)
                    gb = r.get("proxy_cpu_s_per_gb", 0)
                    line = f"{r['mb_per_s']:8.0f} MB/s  proxy {gb:5.2f} s/GB"
                else:
                    r = login_run(shared, path, run, p)
                    line = (
                        f"{r['per_second']:8.0f}/s    proxy "
                        f"{r.get('proxy_us_per_login', 0):6.0f} µs/login"
                    )
                results[run].setdefault(path.name, []).append(r)
                print(f"round {n + 1} {run:16} {path.name:22} {line}")
    return results


def extras(
    args: argparse.Namespace, shared: Shared, paths: list[BenchPath], p: Params
) -> dict[str, dict[str, float]]:
    syscalls: dict[str, dict[str, float]] = {}
    if args.strace:
        for path in paths:
            if path.proxy and path.takes("imap"):
                syscalls[path.name] = syscalls_per_login(shared, path, args.strace_logins, p)
                print(f"strace {path.name:20} {syscalls[path.name]['total']:.1f} syscalls/login")
    if args.profile:
        by_name = {path.name: path for path in paths}
        for name in ("mg-http", "mg-sqlite"):
            if name in by_name:
                login, own, inclusive = profile_login(
                    shared, by_name[name], p, args.profile_seconds
                )
                profile_report(name, login, own, inclusive)
    return syscalls


def comparison(args: argparse.Namespace, lab: Lab) -> None:
    p = params(args)
    chosen = args.paths or (SELFTEST_PATHS if args.selftest else "")
    patterns = chosen.split(",") if chosen else None
    srcs = mailgate_sources(args)
    want_mariadb, want_postgres = needed_databases(patterns, srcs)
    for missing in check_database_tools(want_mariadb, want_postgres):
        print(f"note: {missing} not installed: its paths are left out", file=sys.stderr)
        want_mariadb &= "MariaDB" not in missing
        want_postgres &= "PostgreSQL" not in missing
    if not shutil.which("haproxy"):
        print("note: haproxy not installed: its path is left out", file=sys.stderr)
    seed = (NGINX_MODULES / "ngx_http_perl_module.so").exists()
    if want_mariadb and not seed:
        print("note: libnginx-mod-http-perl not installed: the seed is left out", file=sys.stderr)
    started = time.monotonic()
    tools = compile_tools(lab.tmp)
    certs = make_certificates(lab.tmp)
    imapd, imap, pop3 = start_imapd(lab, tools["imapd"])
    shared = Shared(lab, tools, certs, imapd, imap, pop3, log_level=args.mailgate_log_level)
    databases_up = start_databases(shared, want_mariadb, want_postgres)
    shared.auth, shared.auth_port = start_auth(lab, imap, pop3)
    shared.sqlite = lab.tmp / "directory.db"
    populate_directories(shared, srcs[""], ("sqlite",))
    paths = build_paths(shared, srcs, patterns, args.nginx_proxy_buffer, databases=False)
    databases_up()
    populate_directories(shared, srcs[""], ("mariadb", "pg"))
    paths += build_paths(shared, srcs, patterns, args.nginx_proxy_buffer, True, seed)
    order = [kind.name for kind in mailgate_kinds()]
    paths.sort(
        key=lambda path: (
            ORDER.index(path.name)
            if path.name in ORDER
            else len(ORDER) + order.index(path.name.split("@")[0])
        )
    )
    print(f"{len(paths)} paths up after {time.monotonic() - started:.0f} s; temp dir {lab.tmp}")
    for path in paths:
        print(f"  {path.name:22} {path.note}")
    idle = memory(shared, paths, p)
    if p.warmup:
        warm_up(shared, paths, p)
    statements = {}
    for path in paths:
        if isinstance(path.stats, PostgresStats) and path.takes("imap"):
            statements[path.name] = postgres_statements(shared, path, min(300, p.logins), p)
    began = time.monotonic()
    results = rounds(shared, paths, p, idle)
    for name, counted in statements.items():  # PostgreSQL's round trips: the counted ones
        for row in results["imap"].get(name, []):
            row["dbc_round_trips_per_login"] = counted["round_trips"]
    syscalls = extras(args, shared, paths, p)
    print(f"measured for {time.monotonic() - began:.0f} s")
    report(results, syscalls, [label for label in srcs if label], statements)
    if args.json:
        raw = {"results": results, "syscalls": syscalls, "postgres_statements": statements}
        Path(args.json).write_text(json.dumps(raw, indent=1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~1.5 minutes: 2 short rounds")
    parser.add_argument("--selftest", action="store_true", help="one tiny round, < 30 s")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--logins", type=int, help="logins per plaintext login run")
    parser.add_argument("--idle", type=int, help="idle sessions to hold (0 skips the test)")
    parser.add_argument(
        "--paths",
        help="comma-separated path names to run, '*' as a suffix "
        "matches a prefix (e.g. nginx,mg-http*)",
    )
    parser.add_argument(
        "--mailgate-src",
        default=str(ROOT / "src"),
        help="the src/ of the mailgate checkout to measure (default: this one)",
    )
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="SRC",
        help="also measure this checkout's src/ as paths NAME@CHECKOUT",
    )
    parser.add_argument(
        "--strace",
        action="store_true",
        help="afterwards, syscalls per login of each proxy (strace -c -f)",
    )
    parser.add_argument("--strace-logins", type=int, default=500)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, py-spy mailgate's "
        "worker during an auth_http and a cached-directory login run",
    )
    parser.add_argument("--profile-seconds", type=float, default=8.0)
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument(
        "--mailgate-log-level",
        default="warning",
        help="nginx's default error_log level logs nothing per login; "
        "'info' makes mailgate log each session",
    )
    parser.add_argument(
        "--nginx-proxy-buffer",
        metavar="SIZE",
        help="nginx mail proxy_buffer (default: nginx's, one memory page)",
    )
    scale = parser.add_argument_group("--scale: many concurrent idle sessions through mailgate")
    scale.add_argument("--scale", action="store_true")
    scale.add_argument("--sessions", type=int, default=100_000)
    scale.add_argument("--workers", type=int, help="mailgate workers (default: from the fd limit)")
    scale.add_argument("--loadgens", type=int, help="load generator processes (default: sized)")
    scale.add_argument("--backends", type=int, help="imapd processes (default: sized)")
    args = parser.parse_args()
    if not shutil.which("nginx") or not (NGINX_MODULES / "ngx_mail_module.so").exists():
        print("nginx not found (Debian: nginx-light libnginx-mod-mail)", file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    lab = Lab(Path(tempfile.mkdtemp(prefix="mailgate-bench-")))
    lab.tmp.chmod(0o755)  # the seed's nginx worker runs as nobody and reads its Perl module
    try:
        if args.scale:
            import scale as scale_mode

            scale_mode.run(args, lab)
        else:
            comparison(args, lab)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, ValueError) as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        lab.stop_all()
        if not args.keep:
            shutil.rmtree(lab.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
