"""One measured run of one path: logins, FETCH throughput, idle memory; and the extras
(syscalls per login under strace, a py-spy profile of mailgate's worker).

CPU of every process group in the path (proxy, auth service, database, backend) is read from
/proc before and after the run; the load generator reports its own.
"""

from __future__ import annotations

import collections
import contextlib
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dbstats import PostgresStats, logged_statements
from lab import CERT_NAMES, Lab, memory_kib, read_json_line, run_json, tree, tree_cpu
from paths import TLS_RUNS, BenchPath, Shared, port_key

CPU_KEYS = ("proxy", "auth", "db", "backend")
Result = dict[str, float]


@dataclass(frozen=True)
class Params:
    rounds: int
    logins: int  # per plaintext login run
    tls_logins: int  # per IMAPS login run (full handshakes cost ~10x a plaintext login)
    concurrency: int
    login_seconds: float  # a login run stops starting sessions after this
    fetch_seconds: float
    idle: int
    idle_seconds: float  # time allowed to open the idle sessions
    strict: bool = False  # a failed login fails the bench (the self-test), not just a warning
    # Seconds to wait after the last idle login before reading PSS: the proxy finishes its
    # bookkeeping (auth connection back to the pool, relay set up) within milliseconds.
    settle: float = 1.0
    warmup: int = 100  # logins of each (path, run) before anything is measured; 0: none


def loadgen_options(path: BenchPath, run: str) -> list[str]:
    opts = ["-P", "pop3"] if run == "pop3" else []
    if run in TLS_RUNS:
        kind, mode = TLS_RUNS[run]
        opts += ["-T", mode, "-n", CERT_NAMES[kind]]
    return opts


def cpu_snapshot(shared: Shared, path: BenchPath) -> Result:
    groups = {"proxy": path.proxy, "auth": path.auth, "db": path.db, "backend": [shared.imapd.pid]}
    exclude = path.stats.exclude if path.stats else frozenset()
    snap: Result = {}
    for key, roots in groups.items():
        if roots:
            user, system = tree_cpu(roots, exclude)
            snap |= {key: user + system, f"{key}_user": user, f"{key}_sys": system}
    return snap


def measured(shared: Shared, path: BenchPath, argv: list[str], timeout: float) -> Result:
    db_before = path.stats.snapshot() if path.stats else None
    before = cpu_snapshot(shared, path)
    result = run_json(argv, timeout)
    after = cpu_snapshot(shared, path)
    for key, value in after.items():
        result[f"{key}_cpu_s"] = value - before[key]
    result["loadgen_cpu_s"] = result.pop("cpu_s")
    if path.stats and db_before:
        time.sleep(path.stats.settle)
        delta = path.stats.delta(db_before, path.stats.snapshot())
        result |= {f"dbc_{k}": v for k, v in delta.items()}
    return result


def login_run(shared: Shared, path: BenchPath, run: str, p: Params, logins: int = 0) -> Result:
    count = logins or (p.tls_logins if run in TLS_RUNS else p.logins)
    argv = [
        str(shared.tools["loadgen"]),
        *loadgen_options(path, run),
        "login",
        str(path.ports[port_key(run)]),
        str(count),
        str(p.concurrency),
        str(p.login_seconds),
    ]
    r = measured(shared, path, argv, p.login_seconds + 40)
    if r["failed"] or r["unfinished"] or not r["logins"]:
        problem = (
            f"{path.name} {run}: {r['logins']:.0f} logins, {r['failed']:.0f} failed, "
            f"{r['unfinished']:.0f} unfinished"
        )
        if p.strict:
            raise RuntimeError(problem)
        print(f"  warning: {problem}")
    n = max(1.0, r["logins"])
    for key in (*CPU_KEYS, "proxy_user", "proxy_sys", "loadgen"):
        if f"{key}_cpu_s" in r:
            r[f"{key}_us_per_login"] = r[f"{key}_cpu_s"] / n * 1e6
    r["total_us_per_login"] = sum(r.get(f"{k}_us_per_login", 0.0) for k in ("proxy", "auth", "db"))
    for key in [k for k in r if k.startswith("dbc_")]:
        r[key + "_per_login"] = r[key] / n
    if r.get("handshakes"):
        r["resumed_pct"] = 100 * r["resumed"] / r["handshakes"]
    return r


def fetch_run(shared: Shared, path: BenchPath, p: Params) -> Result:
    argv = [
        str(shared.tools["loadgen"]),
        "throughput",
        str(path.ports["imap"]),
        str(p.fetch_seconds),
    ]
    r = measured(shared, path, argv, p.fetch_seconds + 30)
    gigabytes = max(r["bytes"], 1) / 1e9
    for key in ("proxy", "backend", "loadgen"):
        if f"{key}_cpu_s" in r:
            r[f"{key}_cpu_s_per_gb"] = r[f"{key}_cpu_s"] / gigabytes
    return r


def open_idle(
    shared: Shared, port: int, count: int, p: Params, options: list[str] | None = None
) -> tuple[subprocess.Popen[str], Result]:
    argv = [
        str(shared.tools["loadgen"]),
        *(options or []),
        "idle",
        str(port),
        str(count),
        str(p.concurrency),
        str(p.idle_seconds),
    ]
    gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        return gen, read_json_line(gen, p.idle_seconds + 30)
    except BaseException:
        gen.kill()
        gen.wait()
        raise


def release(gen: subprocess.Popen[str]) -> Result:
    """Tell a holding loadgen to close its sessions; its last line says how many were dropped."""
    assert gen.stdin is not None
    gen.stdin.close()
    try:
        return read_json_line(gen, 30)
    finally:
        gen.kill()
        gen.wait()


def idle_run(shared: Shared, path: BenchPath, p: Params) -> Result:
    """Proxy memory with K logged-in idle sessions minus memory just before, per session.

    The K sessions are opened in two halves, so the second half's growth (the marginal cost,
    free of one-time allocations and of memory the allocator kept from earlier work) is there
    to check the first figure against.
    """
    time.sleep(p.settle)
    before = memory_kib(path.proxy)
    gens: list[subprocess.Popen[str]] = []
    try:
        gen, first = open_idle(shared, path.ports["imap"], p.idle // 2, p)
        gens.append(gen)
        time.sleep(p.settle)
        middle = memory_kib(path.proxy)
        gen, second = open_idle(shared, path.ports["imap"], p.idle - p.idle // 2, p)
        gens.append(gen)
        time.sleep(p.settle)
        during = memory_kib(path.proxy)
        dropped = sum(release(g)["dropped"] for g in gens)
    finally:
        for g in gens:
            if g.poll() is None:
                g.kill()
                g.wait()
    time.sleep(p.settle)
    after = memory_kib(path.proxy)
    opened = first["open"] + second["open"]
    if opened < p.idle:
        problem = f"{path.name}: only {opened:.0f} of {p.idle} idle sessions opened"
        if p.strict:
            raise RuntimeError(problem)
        print(f"  warning: {problem}")
    result = {"open": opened, "failed": first["failed"] + second["failed"], "dropped": dropped}
    for kind in ("pss", "anon"):
        result |= {
            f"{kind}_before_kib": before[kind],
            f"{kind}_during_kib": during[kind],
            f"{kind}_after_close_kib": after[kind],
            f"{kind}_kib_per_session": (during[kind] - before[kind]) / max(1, opened),
            f"{kind}_kib_per_session_2nd_half": (during[kind] - middle[kind])
            / max(1, second["open"]),
        }
    return result


def postgres_statements(shared: Shared, path: BenchPath, logins: int, p: Params) -> Result:
    """Statements per login as PostgreSQL logs them with log_statement = all, in a run of its
    own (logging costs the server CPU): {"round_trips": n, "<statement>": n, ...}."""
    stats = path.stats
    assert isinstance(stats, PostgresStats)
    stats.log_statements(True)
    try:
        offset = stats.log.stat().st_size
        r = login_run(shared, path, "imap", p, logins=logins)
        time.sleep(0.2)
    finally:
        stats.log_statements(False)
    n = max(1.0, r["logins"])
    found = logged_statements(stats.log, offset, stats.exclude)
    return {"round_trips": sum(found.values()) / n} | {k: v / n for k, v in found.most_common(8)}


# ---------------------------------------------------------------- strace and py-spy


def _interrupt(lab: Lab, proc_name: str) -> None:
    for proc in lab.procs:
        if proc.name == proc_name and proc.alive():
            proc.popen.send_signal(signal.SIGINT)  # both write their results on SIGINT
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(30)


def syscalls_per_login(shared: Shared, path: BenchPath, logins: int, p: Params) -> Result:
    """strace -c -f on every process of the proxy during a small IMAP login run."""
    out = shared.lab.tmp / f"strace-{path.name}.txt"
    argv = ["strace", "-c", "-f", "-q", "-o", str(out)]
    for pid in tree(path.proxy):
        argv += ["-p", str(pid)]
    name = f"strace-{path.name}"
    shared.lab.start(name, argv)
    time.sleep(1.0)  # attaching takes a moment
    try:
        r = login_run(shared, path, "imap", p, logins=logins)
    finally:
        _interrupt(shared.lab, name)
    calls: collections.Counter[str] = collections.Counter()
    for line in out.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            calls[fields[-1]] = int(fields[3])
    n = max(1.0, r["logins"])
    result: Result = {"logins": r["logins"], "total": sum(calls.values()) / n}
    result |= {name: count / n for name, count in calls.most_common()}
    return result


def mailgate_worker(path: BenchPath) -> int:
    """The process serving sessions: mailgate itself with workers = 1, else its busiest child."""
    pids = tree(path.proxy)
    if len(pids) == 1:
        return pids[0]
    return max(pids[1:], key=lambda pid: sum(tree_cpu([pid])))


def profile_login(
    shared: Shared, path: BenchPath, p: Params, seconds: float
) -> tuple[Result, list[tuple[str, float]], list[tuple[str, float]]]:
    """py-spy on mailgate's worker during one IMAP login run of `seconds`: the login figures,
    the top functions by own time and by inclusive time, as % of the samples."""
    spy = shutil.which("py-spy")
    if not spy:
        raise RuntimeError("py-spy not found: pip install py-spy")
    out = shared.lab.tmp / f"py-spy-{path.name}.txt"
    argv = [
        spy,
        "record",
        "-p",
        str(mailgate_worker(path)),
        "-o",
        str(out),
        "-f",
        "raw",
        "-r",
        "250",
        "--nonblocking",
    ]
    name = f"py-spy-{path.name}"
    shared.lab.start(name, argv)
    time.sleep(1.5)  # attaching takes a moment
    try:
        long_run = Params(**{**p.__dict__, "login_seconds": seconds})
        r = login_run(shared, path, "imap", long_run, logins=10**6)
    finally:
        _interrupt(shared.lab, name)
    return r, *top_functions(out)


def _function(frame: str) -> str:
    """'send (mailgate/netio.py:120)' -> 'send (mailgate/netio.py)': one entry per function."""
    frame = re.sub(r":\d+\)$", ")", frame.strip())
    return re.sub(r"\(/.*?/(site-packages|src|lib/python3[.\d]*)/", "(", frame)


def top_functions(
    collapsed: Path, count: int = 25
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        n = int(samples)
        frames = [_function(f) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return [], []

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(f, 100 * n / total) for f, n in counter.most_common(count)]

    return share(own), share(inclusive)
