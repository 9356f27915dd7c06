"""Scale-out figures (issue 12): 1, 2 and 3 mailgate nodes behind HAProxy on this box, with
Redis, against one node without Redis, in one run.

    python bench/cluster.py                 # 3 interleaved rounds, ~3 minutes
    python bench/cluster.py --quick         # 1 short round
    python bench/cluster.py --rounds 5 --seconds 10 --concurrency 16 --json out.json

What runs (everything on 127.0.0.1, free ports, one temp dir, stopped by PID at the end):

    loadgen (C) --> HAProxy (mode tcp, send-proxy-v2, roundrobin) --> mailgate node(s) --> imapd x2
                                                                           |
                                                               Redis (one, for every node)

- four configurations, each its own HAProxy frontend over its own nodes, measured in turn in
  every round: `1 node, no Redis` (the ratio's base), `1 node + Redis`, `2 nodes + Redis`,
  `3 nodes + Redis`. Every node: `workers = 1`, the built-in directory on SQLite (one file for
  all, the bench user `{PLAIN}`) with its route cache (every measured login is a cached one),
  the throttle on, `[limits] per_user` on (leases), a `[[pool]]` of two imapd with
  `affinity = true` (claims): everything a login asks of Redis;
- a login is loadgen's: connect, greeting, LOGIN, LOGOUT, close.

Figures per configuration (medians over rounds): logins/s; CPU per login of the mailgate
processes and of redis-server; Redis round trips a login waited for (the login scripts, from
mailgate's own counters: `mailgate stats`), all awaited Redis round trips (with the
heartbeats and the registry), pipelines of batched operations, and Redis commands per login
(Redis's INFO commandstats); each as a ratio to `1 node, no Redis`. The box has 2 cores that
every process here shares: more nodes add processes, not cores, so logins/s cannot grow with
nodes here; what the run shows is what Redis costs per login, and that it stays put with more
nodes. No figure is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))

import peers  # noqa: E402
from lab import (  # noqa: E402
    PYTHON,
    Lab,
    compile_tools,
    free_port,
    greets,
    python_env,
    run_json,
    tree_cpu,
    wait_for,
)

ROOT = HERE.parent
SRC = ROOT / "src"
USER, PASSWORD, DOMAIN = "bench@example.com", "secret", "example.com"
CONFIGS = (("1 node, no Redis", 1, False), ("1 node + Redis", 1, True),
           ("2 nodes + Redis", 2, True), ("3 nodes + Redis", 3, True))  # fmt: skip

POPULATE = """
import asyncio, sys
from mailgate import admin
from mailgate.auth.schema import dispose, make_engine
from mailgate.values import Secret

async def populate(url):
    engine = make_engine(url, 1)
    try:
        await admin.init_schema(engine)
        await admin.add_mailstore(engine, "pooled", "127.0.0.1", pool="stores")
        await admin.add_domain(engine, "example.com", "pooled")
        await admin.add_user(engine, "bench@example.com", Secret("secret"), scheme="PLAIN")
    finally:
        await dispose(engine)

asyncio.run(populate(sys.argv[1]))
"""

HAPROXY = """\
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
{frontends}"""


@dataclass
class Node:
    name: str
    pid: int
    port: int
    control: Path


@dataclass
class Config:
    name: str
    nodes: list[Node]
    redis: bool
    port: int = 0  # HAProxy's frontend
    rows: list[dict[str, float]] = field(default_factory=list)


def to_toml(value: Any, path: str = "") -> str:
    """Enough TOML for the node configs (tables, arrays of tables, scalars, lists)."""
    scalars, tables = [], []
    for key, item in value.items():
        if isinstance(item, dict):
            tables.append(f"\n[{path}{key}]\n" + to_toml(item, f"{path}{key}."))
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            for entry in item:
                tables.append(f"\n[[{path}{key}]]\n" + to_toml(entry, f"{path}{key}."))
        else:
            scalars.append(f"{key} = {json.dumps(item)}")
    return "\n".join(scalars) + "".join(tables) + "\n"


def node_config(lab: Lab, name: str, port: int, redis_port: int | None, imapds: list[int]) -> Path:
    workdir = lab.tmp / name
    workdir.mkdir()
    config: dict[str, Any] = {
        "workers": 1,
        "log_level": "warning",
        "max_sessions": 9000,
        "control_socket": str(workdir / "control.sock"),
        "directory": {"url": f"sqlite:///{lab.tmp / 'directory.db'}", "cache_ttl": 600},
        "limits": {"per_user": 1000},
        "listener": [
            {"protocol": "imap", "listen": f"127.0.0.1:{port}", "proxy_protocol": True,
             "trusted_proxies": ["127.0.0.1/32"]},
        ],
        "pool": [
            {"name": "stores", "shared_storage": True, "affinity": True, "check_interval": 0,
             "members": [{"name": f"imapd{i}", "host": "127.0.0.1", "imap": p}
                         for i, p in enumerate(imapds, 1)]},
        ],
    }  # fmt: skip
    if redis_port is not None:
        config["cluster"] = {"redis_url": f"redis://127.0.0.1:{redis_port}/0", "node_name": name}
    path = workdir / "mailgate.toml"
    path.write_text(to_toml(config))
    return path


def start_node(lab: Lab, name: str, redis_port: int | None, imapds: list[int]) -> Node:
    port = free_port()
    config = node_config(lab, name, port, redis_port, imapds)
    proc = lab.start(
        name, [PYTHON, "-m", "mailgate", "serve", "-c", str(config)], env=python_env(SRC)
    )
    control = config.parent / "control.sock"
    wait_for(lambda: control.exists() and greets(port) is not None, proc, "its control socket")
    return Node(name, proc.pid, port, control)


def control(node: Node, op: str) -> dict[str, Any]:
    sys.path.insert(0, str(SRC))
    from mailgate.control import request

    return request(node.control, {"op": op}, timeout=10)


def redis_info(port: int) -> dict[str, float]:
    """Commands Redis ran (total and EVALSHA) and its CPU seconds, from INFO."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"INFO all\r\n")
        data = b""
        while not data.endswith(b"\r\n\r\n") and b"# Keyspace" not in data:
            data += sock.recv(1 << 16)
        while True:  # the rest of the bulk reply
            sock.settimeout(0.2)
            try:
                more = sock.recv(1 << 16)
            except OSError:
                break
            if not more:
                break
            data += more
    info: dict[str, float] = {}
    for line in data.decode().splitlines():
        key, _, value = line.partition(":")
        if key == "total_commands_processed":
            info["commands"] = float(value)
        elif key == "cmdstat_evalsha":
            info["evalsha"] = float(value.split(",")[0].split("=")[1])
        elif key in ("used_cpu_sys", "used_cpu_user"):
            info["cpu"] = info.get("cpu", 0.0) + float(value)
    info.setdefault("evalsha", 0.0)
    return info


def counters(nodes: list[Node]) -> dict[str, float]:
    summed: dict[str, float] = {}
    for node in nodes:
        for key, value in control(node, "stats").items():
            if key.startswith("redis_") and isinstance(value, int | float):
                summed[key] = summed.get(key, 0.0) + value
    return summed


def measure(
    config: Config, loadgen: Path, redis_port: int, seconds: float, concurrency: int
) -> dict[str, float]:
    pids = [n.pid for n in config.nodes]
    cpu0, info0, count0 = sum(tree_cpu(pids)), redis_info(redis_port), counters(config.nodes)
    argv = [str(loadgen), "login", str(config.port), "100000000", str(concurrency), str(seconds)]
    result = run_json(argv, seconds + 60)
    time.sleep(0.3)  # the last batches and registry updates
    cpu1, info1, count1 = sum(tree_cpu(pids)), redis_info(redis_port), counters(config.nodes)
    n = max(1.0, result["logins"])
    row = {
        "logins_per_s": result["per_second"],
        "p50_ms": result["p50_ms"],
        "p99_ms": result["p99_ms"],
        "failed": result["failed"],
        "mailgate_us_per_login": (cpu1 - cpu0) / n * 1e6,
        "redis_us_per_login": (info1["cpu"] - info0["cpu"]) / n * 1e6 if config.redis else 0.0,
        "waited_rt_per_login": (count1.get("redis_logins", 0) - count0.get("redis_logins", 0)) / n,
        "all_rt_per_login": (
            count1.get("redis_round_trips", 0) - count0.get("redis_round_trips", 0)
        )
        / n,
        "batches_per_login": (count1.get("redis_batches", 0) - count0.get("redis_batches", 0)) / n,
        "commands_per_login": (info1["commands"] - info0["commands"]) / n if config.redis else 0.0,
        "evalsha_per_login": (info1["evalsha"] - info0["evalsha"]) / n if config.redis else 0.0,
    }
    row["total_us_per_login"] = row["mailgate_us_per_login"] + row["redis_us_per_login"]
    return row


FIGURES = (
    ("logins_per_s", "logins/s", "{:.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("mailgate_us_per_login", "mailgate CPU us/login", "{:.0f}"),
    ("redis_us_per_login", "Redis CPU us/login", "{:.0f}"),
    ("total_us_per_login", "mailgate+Redis us/login", "{:.0f}"),
    ("waited_rt_per_login", "RT waited/login", "{:.3f}"),
    ("all_rt_per_login", "RT all awaited/login", "{:.3f}"),
    ("batches_per_login", "batches/login", "{:.3f}"),
    ("commands_per_login", "Redis cmds/login", "{:.2f}"),
    ("evalsha_per_login", "EVALSHA/login", "{:.2f}"),
)


def report(configs: list[Config]) -> dict[str, dict[str, float]]:
    medians = {
        c.name: {k: statistics.median(r[k] for r in c.rows) for k in c.rows[0]} for c in configs
    }
    base = medians[configs[0].name]
    width = max(len(c.name) for c in configs) + 2
    print("\n" + "figure".ljust(26) + "".join(c.name.rjust(width) for c in configs))
    for key, label, fmt in FIGURES:
        print(
            label.ljust(26)
            + "".join(fmt.format(medians[c.name][key]).rjust(width) for c in configs)
        )
    print("\nratios to '" + configs[0].name + "'")
    for key, label, _ in FIGURES[:6]:
        if not base[key]:
            continue
        cells = "".join(f"{medians[c.name][key] / base[key]:.2f}".rjust(width) for c in configs)
        print(label.ljust(26) + cells)
    one, red = medians[configs[0].name], medians[configs[1].name]
    extra = red["total_us_per_login"] - one["total_us_per_login"]
    print(
        f"\nRedis adds {extra:.0f} us of CPU per login on one node "
        f"({red['mailgate_us_per_login'] - one['mailgate_us_per_login']:.0f} in mailgate, "
        f"{red['redis_us_per_login']:.0f} in redis-server) and "
        f"{red['waited_rt_per_login']:.2f} round trips a login waits for"
    )
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="per measured run")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="1 round of 4 s")
    parser.add_argument("--json", help="write the rows and medians here")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 4.0
    import tempfile

    lab = Lab(Path(tempfile.mkdtemp(prefix="mailgate-cluster-bench-")))
    try:
        tools = compile_tools(lab.tmp)
        imapds = []
        for i in (1, 2):
            port = free_port()
            proc = lab.start(f"imapd{i}", [str(tools["imapd"]), str(port)])
            wait_for(lambda port=port: greets(port, b"* OK"), proc, "greeting")
            imapds.append(port)
        redis = peers.start_redis(lab.tmp, free_port())
        lab.adopt(redis)
        redis_port = redis.ports["redis"]
        url = f"sqlite:///{lab.tmp / 'directory.db'}"
        done = lab.start("populate", [PYTHON, "-c", POPULATE, url], env=python_env(SRC))
        done.popen.wait(60)
        alone = start_node(lab, "alone", None, imapds)
        clustered = [start_node(lab, f"node{i}", redis_port, imapds) for i in (1, 2, 3)]
        configs = [
            Config(name, [alone] if not redis else clustered[:count], redis)
            for name, count, redis in CONFIGS
        ]
        frontends = ""
        for index, config in enumerate(configs):
            config.port = free_port()
            servers = "".join(
                f"  server {n.name} 127.0.0.1:{n.port} send-proxy-v2\n" for n in config.nodes
            )
            frontends += (
                f"frontend f{index}\n  bind 127.0.0.1:{config.port}\n  default_backend b{index}\n"
                f"backend b{index}\n  balance roundrobin\n{servers}"
            )
        haproxy = peers.start_haproxy_config(
            lab.tmp,
            HAPROXY.format(frontends=frontends),
            {f"f{i}": c.port for i, c in enumerate(configs)},
        )
        lab.adopt(haproxy)
        print(f"up: {len(configs)} configurations; temp dir {lab.tmp}")
        for config in configs:  # warm-up: route caches, script loads, connection pools
            run_json([str(tools["loadgen"]), "login", str(config.port), "300", "4", "10"], 60)
        for round_no in range(args.rounds):
            order = configs[round_no % len(configs) :] + configs[: round_no % len(configs)]
            for config in order:
                row = measure(config, tools["loadgen"], redis_port, args.seconds, args.concurrency)
                config.rows.append(row)
                print(
                    f"  round {round_no + 1} {config.name:18} {row['logins_per_s']:7.0f} logins/s"
                    f"  {row['total_us_per_login']:5.0f} us/login"
                    f"  {row['waited_rt_per_login']:.3f} RT waited/login",
                    flush=True,
                )
        medians = report(configs)
        if args.json:
            rows = {c.name: c.rows for c in configs}
            Path(args.json).write_text(json.dumps({"rows": rows, "medians": medians}, indent=1))
    finally:
        lab.stop_all()
        if not args.keep:
            import shutil

            shutil.rmtree(lab.tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
