"""Benchmark: the same IMAP backend reached directly, through mailgate, and through nginx mail.

    python bench/run.py            # ~1.5 minutes: 5 interleaved rounds, 2000 idle sessions
    python bench/run.py --quick    # ~25 s: 2 rounds, smaller counts

Everything runs on 127.0.0.1 in one temp dir and is stopped by PID at the end, on error and on
Ctrl-C/SIGTERM: the C backend (bench/imapd.c) and load generator (bench/loadgen.c), compiled
here with `cc -O2`; one nginx serving the auth_http endpoint (fixed headers) for BOTH proxies;
nginx's mail proxy (worker_processes 1); mailgate (workers = 1, uvloop, throttle off).
CPU figures are utime+stime from /proc/PID/stat of the proxy process (nginx: its worker);
memory is Pss and Pss_Anon from /proc/PID/smaps_rollup. bench/README.md explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
# Debian's libnginx-mod-mail installs the mail module here.
NGINX_MAIL_MODULE = "/usr/lib/nginx/modules/ngx_mail_module.so"
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT = 15.0  # a cold mailgate start (imports, uvloop) takes ~1 s on a busy 2-core box
STOP_TIMEOUT = 5.0
# 2 proxy fds per idle session: 4,000 for 2,000 sessions, well inside the 20,000 fd limit.
NGINX_CONNECTIONS = 10000
PATHS = ("direct", "mailgate", "nginx")
# Seconds to wait after the last idle login before reading PSS: the proxy finishes its
# bookkeeping (auth connection back to the pool, relay set up) within milliseconds.
SETTLE = 1.0
Popen = subprocess.Popen[str]


@dataclass
class Params:
    rounds: int
    logins: int
    concurrency: int
    login_seconds: float  # a login run stops starting sessions after this
    fetch_seconds: float
    idle: int
    idle_seconds: float  # time allowed to open the idle sessions


DEFAULT = Params(rounds=5, logins=5000, concurrency=32, login_seconds=15, fetch_seconds=3,
                 idle=2000, idle_seconds=40)  # fmt: skip
QUICK = Params(rounds=2, logins=1500, concurrency=32, login_seconds=5, fetch_seconds=1.5,
               idle=500, idle_seconds=15)  # fmt: skip


# ---------------------------------------------------------------- processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid


@dataclass
class Lab:
    tmp: Path
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], **kw: object) -> Proc:
        log = self.tmp / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(  # type: ignore[call-overload]
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, **kw,
            )  # fmt: skip
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop_all(self) -> None:
        """Signal each process we started (by PID), then SIGKILL its own process group."""
        for proc in reversed(self.procs):
            if proc.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, proc.stop_signal)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: nginx's worker too
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(1)


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], bool], proc: Proc, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{tail(proc.log)}")
        if check():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: {what} not ready after {READY_TIMEOUT} s\n{tail(proc.log)}")


def greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            return sock.recv(256).startswith(b"* OK")
    except OSError:
        return False


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of the whole process (all threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def memory_kib(pid: int) -> dict[str, int]:
    """Pss (all of it) and Pss_Anon (heap and stacks) from /proc/PID/smaps_rollup, in KiB.

    Pss also counts a share of the shared libraries' pages, and that share moves whenever
    another process on the box maps or unmaps the same files (any Python process does for
    libpython): Pss_Anon is the part only this process's own allocations can move.
    """
    rollup = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        rollup[key] = int(value.split()[0])
    return {"pss": rollup["Pss"], "anon": rollup["Pss_Anon"]}


def nginx_worker(master: Proc) -> int:
    children = Path(f"/proc/{master.pid}/task/{master.pid}/children")
    found: list[str] = []

    def spawned() -> bool:
        found[:] = children.read_text().split()
        return bool(found)

    wait_for(spawned, master, "worker process")
    return int(found[0])


# ---------------------------------------------------------------- the peers


def compile_tools(tmp: Path) -> dict[str, Path]:
    cc = os.environ.get("CC", "cc")
    tools = {}
    for name in ("imapd", "loadgen"):
        out = tmp / name
        subprocess.run([cc, "-O2", "-o", str(out), str(HERE / f"{name}.c")], check=True)
        tools[name] = out
    return tools


def start_backend(lab: Lab, imapd: Path) -> tuple[Proc, int]:
    port = free_port()
    proc = lab.start("imapd", [str(imapd), str(port)])
    wait_for(lambda: greets(port), proc, "greeting")
    return proc, port


NGINX_HEAD = """\
{load}daemon off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{
  worker_connections {connections};
}}
"""

AUTH_HTTP = """\
http {{
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  server {{
    listen 127.0.0.1:{port};
    location = /auth {{
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port {backend};
      return 200;
    }}
  }}
}}
"""

MAIL = """\
mail {{
  auth_http 127.0.0.1:{auth}/auth;
{extra}  server {{
    listen 127.0.0.1:{port};
    protocol imap;
  }}
}}
"""


def start_nginx(lab: Lab, name: str, body: str, port: int, load: str = "") -> Proc:
    d = lab.tmp / name
    d.mkdir()
    conf = d / "nginx.conf"
    head = NGINX_HEAD.format(load=load, dir=d, connections=NGINX_CONNECTIONS)
    conf.write_text(head + body.format(dir=d))
    proc = lab.start(name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)])
    proc.stop_signal = signal.SIGTERM  # fast shutdown: drops the idle sessions at once
    wait_for(lambda: listening(port), proc, f"port {port}")
    return proc


def start_auth(lab: Lab, backend_port: int) -> tuple[Proc, int]:
    port = free_port()
    body = AUTH_HTTP.replace("{port}", str(port)).replace("{backend}", str(backend_port))
    return start_nginx(lab, "nginx-auth", body, port), port


def start_nginx_mail(lab: Lab, auth_port: int, module: str, buffer: str) -> tuple[Proc, int]:
    port = free_port()
    extra = f"  proxy_buffer {buffer};\n" if buffer else ""
    body = MAIL.replace("{auth}", str(auth_port)).replace("{port}", str(port))
    body = body.replace("{extra}", extra)
    load = f"load_module {module};\n"
    return start_nginx(lab, "nginx-mail", body, port, load), port


MAILGATE_TOML = """\
workers = 1
log_level = "{log_level}"
shutdown_timeout = 1

[[listener]]
protocol = "imap"
listen = "127.0.0.1:{port}"

[auth_http]
url = "http://127.0.0.1:{auth}/auth"

[throttle]
enabled = false
"""


def start_mailgate(lab: Lab, auth_port: int, log_level: str) -> tuple[Proc, int]:
    port = free_port()
    conf = lab.tmp / "mailgate.toml"
    conf.write_text(MAILGATE_TOML.format(port=port, auth=auth_port, log_level=log_level))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(SRC), os.environ.get(
        "PYTHONPATH")])))  # fmt: skip
    argv = [sys.executable, "-m", "mailgate", "serve", "-c", str(conf)]
    proc = lab.start("mailgate", argv, env=env)
    wait_for(lambda: greets(port), proc, "greeting")
    return proc, port


# ---------------------------------------------------------------- measurements


@dataclass
class Setup:
    lab: Lab
    loadgen: Path
    ports: dict[str, int]  # path -> port the client connects to
    proxy_pid: dict[str, int]  # path -> pid whose CPU/memory is "the proxy" (not for direct)
    auth_pid: int
    backend_pid: int


def loadgen(setup: Setup, *args: object, timeout: float) -> dict[str, float]:
    argv = [str(setup.loadgen), *map(str, args)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if not done.stdout.strip():
        raise RuntimeError(f"loadgen {args} printed nothing: {done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.splitlines()[-1])
    return result


def cpu_snapshot(setup: Setup, path: str) -> dict[str, float]:
    pids = {"backend": setup.backend_pid}
    if path in setup.proxy_pid:
        pids |= {"proxy": setup.proxy_pid[path], "auth": setup.auth_pid}
    snap: dict[str, float] = {}
    for key, pid in pids.items():
        user, system = cpu_seconds(pid)
        snap |= {key: user + system, f"{key}_user": user, f"{key}_sys": system}
    return snap


def measured(setup: Setup, path: str, run: Callable[[], dict[str, float]]) -> dict[str, float]:
    before = cpu_snapshot(setup, path)
    result = run()
    after = cpu_snapshot(setup, path)
    for key, value in after.items():
        result[f"{key}_cpu_s"] = value - before[key]
    result["loadgen_cpu_s"] = result.pop("cpu_s")
    return result


def login_run(setup: Setup, path: str, p: Params) -> dict[str, float]:
    port = setup.ports[path]
    args = ("login", port, p.logins, p.concurrency, p.login_seconds)
    r = measured(setup, path, lambda: loadgen(setup, *args, timeout=p.login_seconds + 30))
    if r["failed"] or r["unfinished"]:
        print(f"  warning: {path}: {r['failed']} failed, {r['unfinished']} unfinished logins")
    for key in ("proxy", "proxy_user", "proxy_sys", "auth", "backend", "loadgen"):
        if f"{key}_cpu_s" in r:
            r[f"{key}_us_per_login"] = r[f"{key}_cpu_s"] / max(1, r["logins"]) * 1e6
    return r


def fetch_run(setup: Setup, path: str, p: Params) -> dict[str, float]:
    port = setup.ports[path]
    args = ("throughput", port, p.fetch_seconds)
    r = measured(setup, path, lambda: loadgen(setup, *args, timeout=p.fetch_seconds + 30))
    gigabytes = r["bytes"] / 1e9
    for key in ("proxy", "backend", "loadgen"):
        if f"{key}_cpu_s" in r:
            r[f"{key}_cpu_s_per_gb"] = r[f"{key}_cpu_s"] / gigabytes
    return r


def read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict[str, float]:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    if not line:
        raise RuntimeError(f"loadgen idle: no answer within {timeout} s")
    result: dict[str, float] = json.loads(line)
    return result


def open_idle(setup: Setup, path: str, count: int, p: Params) -> tuple[Popen, dict[str, float]]:
    argv = [str(setup.loadgen), "idle", str(setup.ports[path]), str(count),
            str(p.concurrency), str(p.idle_seconds)]  # fmt: skip
    gen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        return gen, read_json_line(gen, p.idle_seconds + 20)
    except BaseException:
        gen.kill()
        gen.wait()
        raise


def release(gen: Popen) -> dict[str, float]:
    """Tell a holding loadgen to close its sessions; its last line says how many were dropped."""
    assert gen.stdin is not None
    gen.stdin.close()
    try:
        return read_json_line(gen, 20)
    finally:
        gen.kill()
        gen.wait()


def idle_run(setup: Setup, path: str, p: Params) -> dict[str, float]:
    """Proxy memory with K logged-in idle sessions minus memory just before, per session.

    The K sessions are opened in two halves, so the second half's growth (the marginal cost,
    free of one-time allocations and of memory the allocator kept from earlier work) is there
    to check the first figure against.
    """
    pid = setup.proxy_pid[path]
    time.sleep(SETTLE)
    before = memory_kib(pid)
    gens: list[Popen] = []
    try:
        gen, first = open_idle(setup, path, p.idle // 2, p)
        gens.append(gen)
        time.sleep(SETTLE)
        middle = memory_kib(pid)
        gen, second = open_idle(setup, path, p.idle - p.idle // 2, p)
        gens.append(gen)
        time.sleep(SETTLE)
        during = memory_kib(pid)
        dropped = sum(release(g)["dropped"] for g in gens)
    finally:
        for g in gens:
            if g.poll() is None:
                g.kill()
                g.wait()
    time.sleep(SETTLE)
    after = memory_kib(pid)
    opened = first["open"] + second["open"]
    result = {"open": opened, "failed": first["failed"] + second["failed"], "dropped": dropped}
    for kind in ("pss", "anon"):
        result |= {
            f"{kind}_before_kib": before[kind], f"{kind}_during_kib": during[kind],
            f"{kind}_after_close_kib": after[kind],
            f"{kind}_kib_per_session": (during[kind] - before[kind]) / max(1, opened),
            f"{kind}_kib_per_session_2nd_half":
                (during[kind] - middle[kind]) / max(1, second["open"]),
        }  # fmt: skip
    return result


# ---------------------------------------------------------------- report


def median(rows: list[dict[str, float]], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def ratio(rows_by_path: dict[str, list[dict[str, float]]], key: str, a: str, b: str) -> str:
    """Median over rounds of the per-round ratio a/b (each round's paths ran back to back)."""
    pairs = zip(rows_by_path[a], rows_by_path[b], strict=True)
    values = [x[key] / y[key] for x, y in pairs if key in x and key in y and y[key]]
    return f"{statistics.median(values):.2f}" if values else "-"


def report(results: dict[str, dict[str, list[dict[str, float]]]]) -> None:
    login, fetch, idle = results["login"], results["fetch"], results["idle"]
    rows = [
        ("logins/s", login, "per_second", 0),
        ("login p50 ms", login, "p50_ms", 2),
        ("login p99 ms", login, "p99_ms", 2),
        ("proxy CPU µs/login", login, "proxy_us_per_login", 1),
        ("  of which user space", login, "proxy_user_us_per_login", 1),
        ("  of which kernel", login, "proxy_sys_us_per_login", 1),
        ("auth nginx CPU µs/login", login, "auth_us_per_login", 1),
        ("backend CPU µs/login", login, "backend_us_per_login", 1),
        ("loadgen CPU µs/login", login, "loadgen_us_per_login", 1),
        ("1 MiB FETCH MB/s", fetch, "mb_per_s", 0),
        ("FETCH p50 ms", fetch, "p50_ms", 2),
        ("FETCH max ms", fetch, "max_ms", 1),
        ("proxy CPU s/GB", fetch, "proxy_cpu_s_per_gb", 2),
        ("backend CPU s/GB", fetch, "backend_cpu_s_per_gb", 2),
        ("loadgen CPU s/GB", fetch, "loadgen_cpu_s_per_gb", 2),
        ("idle: Pss KiB/session", idle, "pss_kib_per_session", 2),
        ("idle: Pss_Anon KiB/session", idle, "anon_kib_per_session", 2),
        ("  same, 2nd half only", idle, "anon_kib_per_session_2nd_half", 2),
        ("idle: Pss before, MiB", idle, "pss_before_kib", 1),
        ("idle: Pss with K, MiB", idle, "pss_during_kib", 1),
    ]
    print()
    print(f"{'':26}{'direct':>12}{'mailgate':>12}{'nginx':>12}{'mg/nginx':>10}{'mg/direct':>10}")
    for label, table, key, digits in rows:
        scale = 1 / 1024 if key.endswith("before_kib") or key.endswith("during_kib") else 1
        cells = []
        for path in PATHS:
            value = median(table.get(path, []), key)
            cells.append(fmt(None if value is None else value * scale, digits))
        vs_nginx = ratio(table, key, "mailgate", "nginx") if table.get("nginx") else "-"
        direct_ok = table.get("direct") and key in table["direct"][0]
        vs_direct = ratio(table, key, "mailgate", "direct") if direct_ok else "-"
        print(f"{label:26}{cells[0]:>12}{cells[1]:>12}{cells[2]:>12}{vs_nginx:>10}{vs_direct:>10}")
    print("\nCPU use during the login runs, cores busy (cpu s / wall s), median over rounds:")
    for path in PATHS:
        parts = []
        for key in ("proxy", "auth", "backend", "loadgen"):
            busy = [r[f"{key}_cpu_s"] / r["seconds"] for r in login[path] if f"{key}_cpu_s" in r]
            if busy:
                parts.append(f"{key} {statistics.median(busy):.2f}")
        print(f"  {path:9} " + ", ".join(parts))
    for path in ("mailgate", "nginx"):
        for r in idle.get(path, []):
            print(f"  idle {path}: {int(r['open'])} sessions open, {int(r['failed'])} failed, "
                  f"{int(r['dropped'])} dropped while held; Pss after they closed "
                  f"{r['pss_after_close_kib'] / 1024:.1f} MiB")  # fmt: skip


# ---------------------------------------------------------------- main


@contextlib.contextmanager
def py_spy(setup: Setup, out: str | None, path: str, label: str) -> Iterator[None]:
    """Sample mailgate with py-spy while the block runs (only if asked for and on PATH)."""
    spy = shutil.which("py-spy")
    if not out or path != "mailgate" or not spy:
        yield
        return
    target = Path(out).with_name(f"{Path(out).stem}-{label}{Path(out).suffix}")
    fmt = {".txt": "raw", ".json": "speedscope"}.get(target.suffix, "flamegraph")
    argv = [spy, "record", "-p", str(setup.proxy_pid[path]), "-o", str(target.resolve()),
            "-f", fmt, "-r", "200", "--nonblocking"]  # fmt: skip
    proc = setup.lab.start(f"py-spy-{label}", argv)
    time.sleep(1.0)  # attaching takes a moment
    try:
        yield
    finally:
        proc.popen.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(30)
        print(f"  py-spy profile: {target}")


def check_paths(setup: Setup) -> None:
    """Every path must log in cleanly before anything is measured (also warms them up)."""
    for path in PATHS:
        r = loadgen(setup, "login", setup.ports[path], 200, 8, 10, timeout=40)
        if r["failed"] or r["unfinished"] or r["logins"] != 200:
            raise RuntimeError(f"{path}: warm-up logins failed: {r}")
        t = loadgen(setup, "throughput", setup.ports[path], 0.2, timeout=30)
        if not t["fetches"]:
            raise RuntimeError(f"{path}: FETCH failed: {t}")


def run(args: argparse.Namespace, lab: Lab) -> dict[str, dict[str, list[dict[str, float]]]]:
    p = QUICK if args.quick else DEFAULT
    overrides = {"rounds": args.rounds, "logins": args.logins, "idle": args.idle}
    p = dataclasses.replace(p, **{k: v for k, v in overrides.items() if v is not None})
    tools = compile_tools(lab.tmp)
    backend, backend_port = start_backend(lab, tools["imapd"])
    auth, auth_port = start_auth(lab, backend_port)
    nginx, nginx_port = start_nginx_mail(
        lab, auth_port, args.nginx_mail_module, args.nginx_proxy_buffer
    )
    mailgate, mailgate_port = start_mailgate(lab, auth_port, args.mailgate_log_level)
    setup = Setup(
        lab, tools["loadgen"],
        {"direct": backend_port, "mailgate": mailgate_port, "nginx": nginx_port},
        {"mailgate": mailgate.pid, "nginx": nginx_worker(nginx)},
        nginx_worker(auth), backend.pid,
    )  # fmt: skip
    print(f"ports: {setup.ports}, auth_http on {auth_port}; temp dir {lab.tmp}")
    check_paths(setup)
    results: dict[str, dict[str, list[dict[str, float]]]] = {
        "login": {k: [] for k in PATHS}, "fetch": {k: [] for k in PATHS}, "idle": {}
    }  # fmt: skip
    started = time.monotonic()
    # Memory first, while the proxies hold little but what start-up and warm-up left.
    for path in ("mailgate", "nginx") if p.idle else ():
        r = idle_run(setup, path, p)
        results["idle"][path] = [r]
        print(f"idle {path:8} {int(r['open'])} sessions: Pss {r['pss_kib_per_session']:.2f}, "
              f"Pss_Anon {r['anon_kib_per_session']:.2f} KiB per session")  # fmt: skip
    for n in range(p.rounds):
        order = PATHS[n % 3 :] + PATHS[: n % 3]  # rotate, so no path always runs first
        for path in order:
            with py_spy(setup, args.py_spy if n == 0 else None, path, "login"):
                r = login_run(setup, path, p)
            results["login"][path].append(r)
            print(f"round {n + 1} login {path:8} {r['per_second']:8.0f}/s "
                  f"proxy {r.get('proxy_us_per_login', 0):7.1f} µs/login")  # fmt: skip
        for path in order:
            with py_spy(setup, args.py_spy if n == 0 else None, path, "fetch"):
                r = fetch_run(setup, path, p)
            results["fetch"][path].append(r)
            print(f"round {n + 1} fetch {path:8} {r['mb_per_s']:8.0f} MB/s "
                  f"proxy {r.get('proxy_cpu_s_per_gb', 0):5.2f} s/GB")  # fmt: skip
    print(f"measured for {time.monotonic() - started:.0f} s")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~25 s instead of ~1.5 minutes")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    parser.add_argument("--logins", type=int, help="logins per run (default 5000, quick 1500)")
    parser.add_argument("--idle", type=int, help="idle sessions to hold (0 skips the test)")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, configs)")
    parser.add_argument("--mailgate-log-level", default="warning",
                        help="nginx's default error_log level logs nothing per login; "
                        "'info' makes mailgate log each session")  # fmt: skip
    parser.add_argument("--nginx-mail-module", default=NGINX_MAIL_MODULE)
    parser.add_argument(
        "--nginx-proxy-buffer",
        metavar="SIZE",
        help="nginx mail proxy_buffer (default: nginx's, one memory page)",
    )
    parser.add_argument("--py-spy", metavar="FILE",
                        help="record mailgate with py-spy during round 1's login and FETCH "
                        "runs into FILE-login.EXT and FILE-fetch.EXT (.txt: collapsed stacks, "
                        ".json: speedscope, else a flame graph SVG)")  # fmt: skip
    args = parser.parse_args()
    if not shutil.which("nginx"):
        print("nginx not found (Debian: nginx-light libnginx-mod-mail)", file=sys.stderr)
        return 2

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    lab = Lab(Path(tempfile.mkdtemp(prefix="mailgate-bench-")))
    try:
        results = run(args, lab)
    except KeyboardInterrupt:
        print("interrupted: stopping everything", file=sys.stderr)
        return 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        print(f"bench failed: {e}", file=sys.stderr)
        return 1
    finally:
        lab.stop_all()
        if not args.keep:
            shutil.rmtree(lab.tmp, ignore_errors=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
