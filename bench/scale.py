"""--scale: many concurrent idle IMAP sessions through mailgate on one box (default 100,000).

Sizing, from this box's limits (bench/README.md has the reasoning):
- Each process may hold `nofile` descriptors (hard limit; 20,000 here, root cannot raise it).
- mailgate: a proxied session holds two descriptors in its worker, so a worker holds
  (nofile - 256) / 2 sessions (mailgate's own default); SO_REUSEPORT spreads connections by a
  hash, not evenly, so the workers get 10% headroom, and `max_sessions` is set explicitly.
- The load generator: one descriptor per session, and each (source address, destination)
  pair has the ephemeral port range (28,232 ports here): several processes, each binding its
  sockets to its own source address (127.0.0.2, 127.0.0.3 ...: all of 127/8 is on lo) with
  IP_BIND_ADDRESS_NO_PORT.
- The backend: one descriptor per session, and mailgate connects from 127.0.0.1, so each
  backend process listens on its own port (its own destination) and the auth_http endpoint
  spreads the routes over them by the last two hex digits of nginx's $request_id.
"""

from __future__ import annotations

import argparse
import collections
import functools
import math
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

from lab import (
    PYTHON,
    Lab,
    Proc,
    compile_tools,
    free_port,
    greets,
    memory_kib,
    python_env,
    read_json_line,
    run_json,
    tail,
    tree,
    tree_cpu,
    wait_for,
)
from paths import Shared, auth_http_section, mailgate_config, start_auth, wait_mailgate

LOGIN_PROBES = 300  # sequential logins measured before and while the sessions are held
LATENCY_TARGET_MS = 50.0  # issue 10: a normal login stays under this with 100k sessions held
MEMORY_TARGET_MB = 400.0
HOLD = 5.0  # seconds the sessions are held idle before memory is read


def port_range() -> int:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    return high - low + 1


def sizing(args: argparse.Namespace) -> dict[str, int]:
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    per_worker = (nofile - 256) // 2
    per_process = int(0.75 * min(nofile - 200, port_range()))  # headroom for uneven spreads
    return {
        "nofile": nofile,
        "max_sessions": per_worker,
        "workers": args.workers or math.ceil(args.sessions * 1.1 / per_worker),
        "loadgens": args.loadgens or max(2, math.ceil(args.sessions / per_process)),
        "backends": args.backends or max(2, math.ceil(args.sessions / per_process)),
    }


def spread_map(ports: list[int]) -> str:
    """An nginx map: the last two hex digits of $request_id choose the backend port."""
    lines = "".join(f'    "~{i:02x}$" {ports[i % len(ports)]};\n' for i in range(256))
    return f"  map $request_id $bench_scale_port {{\n{lines}  }}\n"


def kernel() -> dict[str, int]:
    """Slab memory (KiB) and TCP sockets in use, from /proc/meminfo and /proc/net/sockstat."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    sockstat = Path("/proc/net/sockstat").read_text().split("TCP:", 1)[1].splitlines()[0].split()
    tcp = dict(zip(sockstat[::2], map(int, sockstat[1::2]), strict=False))
    out = {
        "slab_kib": int(meminfo["Slab"].split()[0]),
        "tcp_inuse": tcp.get("inuse", 0),
        "tcp_mem_pages": tcp.get("mem", 0),
    }
    conntrack = Path("/proc/sys/net/netfilter/nf_conntrack_count")
    if conntrack.exists():
        out["conntrack"] = int(conntrack.read_text())
    return out


def probe(loadgen: Path, port: int) -> dict[str, float]:
    """Sequential logins, one at a time: the latency a normal client sees."""
    return run_json([str(loadgen), "login", str(port), str(LOGIN_PROBES), "1", "60"], 120)


def start_backends(lab: Lab, imapd: Path, count: int) -> tuple[list[Proc], list[int]]:
    procs, ports = [], []
    for i in range(count):
        port = free_port()
        procs.append(lab.start(f"imapd-{i}", [str(imapd), str(port)]))
        ports.append(port)
    for proc, port in zip(procs, ports, strict=True):
        wait_for(functools.partial(greets, port, b"* OK"), proc, "greeting")
    return procs, ports


def open_sessions(
    lab: Lab, loadgen: Path, port: int, per_gen: list[int], seconds: float
) -> tuple[list[subprocess.Popen[str]], list[dict[str, float]]]:
    gens = []
    for i, count in enumerate(per_gen):
        err = (lab.tmp / f"loadgen-{i}.err").open("w")
        argv = [
            str(loadgen),
            "-s",
            f"127.0.0.{2 + i}",
            "idle",
            str(port),
            str(count),
            "16",
            str(seconds),
        ]
        gens.append(
            subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True
            )
        )
    opened = [read_json_line(gen, seconds + 60) for gen in gens]
    return gens, opened


def errors_seen(lab: Lab) -> list[str]:
    counts: collections.Counter[str] = collections.Counter()
    for path in lab.tmp.glob("loadgen-*.err"):
        counts.update(line.strip() for line in path.read_text(errors="replace").splitlines())
    return [f"{n} x {line}" for line, n in counts.most_common(5)]


def run(args: argparse.Namespace, lab: Lab) -> None:
    size = sizing(args)
    sessions = args.sessions
    print(
        f"scale: {sessions:,} sessions; open files per process {size['nofile']:,}, "
        f"ephemeral ports {port_range():,} per (source, destination); mailgate "
        f"{size['workers']} workers x max_sessions {size['max_sessions']:,}, "
        f"{size['loadgens']} load generators, {size['backends']} backends"
    )
    tools = compile_tools(lab.tmp)
    backends, ports = start_backends(lab, tools["imapd"], size["backends"])
    auth, auth_port = start_auth(lab, ports[0], ports[0], spread_map(ports))
    shared = Shared(
        lab,
        tools,
        {},
        backends[0],
        ports[0],
        ports[0],
        auth,
        auth_port,
        log_level=args.mailgate_log_level,
    )
    mg_ports = {"imap": free_port()}
    conf = lab.tmp / "mailgate-scale.toml"
    conf.write_text(
        mailgate_config(
            shared, mg_ports, auth_http_section(shared), str(size["workers"]), size["max_sessions"]
        )
    )
    src = Path(args.mailgate_src).resolve()
    mailgate = lab.start(
        "mailgate", [PYTHON, "-m", "mailgate", "serve", "-c", str(conf)], env=python_env(src)
    )
    wait_mailgate(mailgate, mg_ports, size["workers"])
    loadgen = tools["loadgen"]
    probe(loadgen, mg_ports["imap"])  # warm up every worker's auth pool a little
    time.sleep(2)
    m: dict[str, Any] = {"sessions": sessions, **size}
    m["mem_before"], m["kernel_before"] = memory_kib([mailgate.pid]), kernel()
    m["probe_before"] = probe(loadgen, mg_ports["imap"])
    per_gen = [
        sessions // size["loadgens"] + (i < sessions % size["loadgens"])
        for i in range(size["loadgens"])
    ]
    cpu_before = sum(tree_cpu([mailgate.pid]))
    started = time.monotonic()
    gens: list[subprocess.Popen[str]] = []
    try:
        seconds = max(60.0, sessions / 400)
        gens, m["opened"] = open_sessions(lab, loadgen, mg_ports["imap"], per_gen, seconds)
        m["open_time"] = time.monotonic() - started
        m["login_cpu"] = sum(tree_cpu([mailgate.pid])) - cpu_before
        m["open"] = sum(int(r["open"]) for r in m["opened"])
        print(f"opened {m['open']:,} of {sessions:,} sessions in {m['open_time']:.0f} s")
        cpu_idle = sum(tree_cpu([mailgate.pid]))
        time.sleep(HOLD)
        m["idle_cpu"] = (sum(tree_cpu([mailgate.pid])) - cpu_idle) / HOLD  # cores busy
        m["mem_during"], m["kernel_during"] = memory_kib([mailgate.pid]), kernel()
        workers = [pid for pid in tree([mailgate.pid]) if pid != mailgate.pid]
        m["fds"] = sorted(len(list(Path(f"/proc/{pid}/fd").iterdir())) for pid in workers)
        m["probe_during"] = probe(loadgen, mg_ports["imap"])
        for gen in gens:
            assert gen.stdin is not None
            gen.stdin.close()
        m["dropped"] = sum(int(read_json_line(gen, 60)["dropped"]) for gen in gens)
    finally:
        for gen in gens:
            if gen.poll() is None:
                gen.kill()
            gen.wait()
    time.sleep(2)
    m["mem_after"] = memory_kib([mailgate.pid])
    report(m)
    warnings = [line for line in tail(mailgate.log, 200).splitlines() if line.strip()]
    if m["open"] < sessions:
        print("\nwhere it stopped: mailgate's log (last lines):")
        print("\n".join("  " + line for line in warnings[-10:]) or "  (nothing)")
        print("load generators' errors:")
        print("\n".join("  " + line for line in errors_seen(lab)) or "  (none)")


def report(m: dict[str, Any]) -> None:
    """The scale run's figures, `m` as run() gathered them."""
    sessions, opened, n = m["sessions"], m["opened"], max(1, m["open"])
    before, during, after = m["mem_before"], m["mem_during"], m["mem_after"]
    kern_before, kern_during, fds = m["kernel_before"], m["kernel_during"], m["fds"] or [0]
    total_mb = during["pss"] / 1024
    memory_ok = m["open"] >= sessions and total_mb <= MEMORY_TARGET_MB
    probe = m["probe_during"]
    latency_ok = probe["p99_ms"] < LATENCY_TARGET_MS and not probe["failed"]
    failed = sum(int(r["failed"]) for r in opened)
    lines = [
        ("mailgate", f"{m['workers']} workers, max_sessions {m['max_sessions']:,} each"),
        (
            "sessions open",
            f"{m['open']:,} (failed {failed:,}, dropped while held {m['dropped']:,})",
        ),
        ("descriptors per worker", f"min {fds[0]:,}, max {fds[-1]:,} (2 per session)"),
        (
            "time to open",
            f"{m['open_time']:.0f} s ({m['open'] / max(m['open_time'], 1e-9):,.0f} "
            f"logins/s; mailgate {m['login_cpu'] / n * 1e6:,.0f} µs CPU per login)",
        ),
        (
            "login p50 while opening",
            f"{statistics_p50(opened):.1f} ms (median of the load generators' p50s)",
        ),
        ("mailgate CPU while held", f"{m['idle_cpu']:.3f} cores"),
        (
            "mailgate Pss, all procs",
            f"before {before['pss'] / 1024:,.1f} MiB, with the sessions "
            f"{total_mb:,.1f} MiB, after they closed {after['pss'] / 1024:,.1f} MiB",
        ),
        (
            "",
            f"target <= {MEMORY_TARGET_MB:.0f} MB with all sessions open: "
            + ("met" if memory_ok else "NOT met"),
        ),
        (
            "per session",
            f"Pss {(during['pss'] - before['pss']) / n:.2f} KiB, Pss_Anon "
            f"{(during['anon'] - before['anon']) / n:.2f} KiB",
        ),
        (
            "kernel (whole box)",
            f"slab +{(kern_during['slab_kib'] - kern_before['slab_kib']) / n:.2f}"
            f" KiB per session; TCP sockets {kern_before['tcp_inuse']:,} -> "
            f"{kern_during['tcp_inuse']:,}; conntrack {kern_during.get('conntrack', '-')}",
        ),
    ]
    for label, key in (("a login before", "probe_before"), ("a login while held", "probe_during")):
        r = m[key]
        lines.append(
            (
                label,
                f"p50 {r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max "
                f"{r['max_ms']:.1f} ms ({LOGIN_PROBES} logins one at a time, "
                f"{r['failed']:.0f} failed)",
            )
        )
    lines.append(
        (
            "",
            f"target p99 < {LATENCY_TARGET_MS:.0f} ms while held: "
            + ("met" if latency_ok else "NOT met"),
        )
    )
    print(f"\nScale: {sessions:,} concurrent idle IMAP sessions through mailgate")
    for label, text in lines:
        print(f"  {label:26} {text}")


def statistics_p50(opened: list[dict[str, float]]) -> float:
    values = sorted(r["p50_ms"] for r in opened)
    return values[len(values) // 2] if values else 0.0
