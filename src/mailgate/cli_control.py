"""Commands that talk to a running mailgate through its control socket: reload, who, kick,
stats, throttle show|clear, backend list|up|down|drain. Parsing and printing only; the wire
is control.py's."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mailgate.config import ConfigError, Settings, control_socket_path
from mailgate.control import ControlError, request

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
LoadSettings = Callable[[str], Settings]


def register(sub: Any, load_settings: LoadSettings) -> None:
    def command(name: str, help_text: str, run: Callable[[argparse.Namespace, Any], int]) -> Any:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
        p.set_defaults(func=lambda args: _run(args, load_settings, run))
        return p

    command("reload", "read the configuration again; exit 0 once it is live", _reload)
    who = command("who", "list the logged-in sessions", _who)
    who.add_argument("--user", help="only this user's sessions")
    who.add_argument("--backend", help="only sessions on this backend (host:port or mailstore)")
    who.add_argument("--json", action="store_true", help="a JSON list of objects")
    kick = command("kick", "end sessions with the protocol's goodbye", _kick)
    kick.add_argument("user", nargs="?", help="end this user's sessions")
    kick.add_argument("--backend", help="end every session on this backend")
    command("stats", "what the node holds now", _stats)
    throttle = command("throttle", "the brute-force throttle's counters", _throttle)
    throttle.add_argument("action", choices=("show", "clear"))
    throttle.add_argument("target", nargs="?", metavar="IP|USER")
    backend = command(
        "backend", "backend pools: list members, take one up, down or drain", _backend
    )
    backend.add_argument("action", choices=("list", "up", "down", "drain"))
    backend.add_argument("name", nargs="?", metavar="NAME")
    backend.add_argument("--json", action="store_true", help="the members as a JSON list")
    backend.add_argument(
        "--parallel",
        type=int,
        metavar="N",
        help="drain, [cluster], affinity pools: move N users at a time ([cluster] move_parallel)",
    )
    backend.add_argument(
        "--no-move",
        action="store_true",
        help="drain only: leave the users where they are (they move as they reconnect)",
    )


def _run(args: argparse.Namespace, load_settings: LoadSettings, run: Callable[..., int]) -> int:
    try:
        args.settings = None
        args.settings = load_settings(args.config)
        path = control_socket_path(args.settings)
    except ConfigError:
        if run is not _reload:
            raise
        # A reload of a file that does not load: the running mailgate reads it itself, logs
        # what is wrong and answers with it; only its socket has to be found.
        path = _socket_of_unloadable(Path(args.config))
    if path is None:
        print("mailgate: no control_socket configured", file=sys.stderr)
        return EXIT_USAGE
    try:
        return run(args, path)
    except ControlError as e:
        print(f"mailgate: {e}", file=sys.stderr)
        return EXIT_FAILED


def _socket_of_unloadable(config: Path) -> Path:
    try:
        raw = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        raw = {}
    value = raw.get("control_socket")
    return config.parent / value if isinstance(value, str) else config.parent / "mailgate.sock"


def _reload(args: argparse.Namespace, path: Any) -> int:
    answer = request(path, {"op": "reload"})
    print(answer.get("message", "reloaded"))
    return EXIT_OK


def _who(args: argparse.Namespace, path: Any) -> int:
    answer = request(path, {"op": "who", "user": args.user, "backend": args.backend})
    sessions: list[dict[str, Any]] = answer["sessions"]
    if answer.get("note"):
        print(f"mailgate: {answer['note']}", file=sys.stderr)
    if args.json:
        json.dump(sessions, sys.stdout, indent=2)
        print()
        return EXIT_OK
    rows: list[tuple[str, ...]] = [
        (
            s["user"] or "-",
            s["protocol"],
            s["client"],
            s["backend"],
            s["tls"] or "no",
            dt.datetime.fromtimestamp(s["since"]).strftime("%Y-%m-%d %H:%M:%S"),
            str(s["bytes_in"]),
            str(s["bytes_out"]),
        )
        for s in sessions
    ]
    headers: tuple[str, ...] = ("USER", "PROTOCOL", "CLIENT", "BACKEND", "TLS", "SINCE")
    headers += ("IN", "OUT")
    if any("node" in s for s in sessions):  # [cluster]: every node's sessions (bytes: ours)
        headers = ("NODE", *headers)
        rows = [(str(s.get("node", "-")), *row) for s, row in zip(sessions, rows, strict=True)]
    _table(headers, rows)
    return EXIT_OK


def _kick(args: argparse.Namespace, path: Any) -> int:
    if not args.user and not args.backend:
        print("mailgate: kick needs a USER or --backend B", file=sys.stderr)
        return EXIT_USAGE
    answer = request(path, {"op": "kick", "user": args.user, "backend": args.backend})
    if answer.get("note"):
        print(f"mailgate: {answer['note']}", file=sys.stderr)
    print(f"kicked {answer['kicked']} sessions")
    return EXIT_OK


def _stats(args: argparse.Namespace, path: Any) -> int:
    answer = request(path, {"op": "stats"})
    for key in ("generation", "workers", "draining", "relayed", "logging_in", "connections"):
        print(f"{key}: {answer[key]}")
    print(f"handshakes: {answer['handshakes']}")
    print(f"throttled keys: {answer['throttled']}")
    if "node" in answer:  # [cluster]
        print(f"node: {answer['node']}; cluster: {', '.join(answer.get('cluster_nodes', []))}")
    if "redis_up" in answer:
        up, workers = answer["redis_up"], answer["workers"]
        print(f"redis: {up} of {workers} workers count in the cluster")
        print(f"redis round trips: {answer['redis_round_trips']} ({answer['redis_logins']} logins)")
    if "cluster" in answer:
        print(f"cluster: {answer['cluster']}")
    return EXIT_OK


def _throttle(args: argparse.Namespace, path: Any) -> int:
    if args.action == "clear":
        if not args.target:
            print("mailgate: throttle clear needs an IP or a USER", file=sys.stderr)
            return EXIT_USAGE
        answer = request(path, {"op": "throttle-clear", "key": args.target})
        print(f"{'cleared' if answer['cleared'] else 'nothing to clear for'} {answer['key']}")
        return EXIT_OK
    answer = request(path, {"op": "throttle-show", "key": args.target})
    rows = [
        (
            str(e["key"]),
            str(e["failures"]),
            str(e["in_flight"]),
            f"{e['locked_for']:.0f}s" if e["locked_for"] else "-",
            f"{e['window_left']:.0f}s",
            str(e["users_tried"]),
        )
        for e in answer["entries"]
    ]
    _table(("KEY", "FAILURES", "IN FLIGHT", "LOCKED", "WINDOW LEFT", "USERS TRIED"), rows)
    return EXIT_OK


def _backend(args: argparse.Namespace, path: Any) -> int:
    if args.action != "list" and not args.name:
        print(f"mailgate: backend {args.action} needs a NAME", file=sys.stderr)
        return EXIT_USAGE
    answer = request(path, {"op": "backend", "action": args.action, "name": args.name})
    members = answer.get("members")
    if members is not None and args.json:
        json.dump(members, sys.stdout, indent=2)
        print()
        return EXIT_OK
    if answer.get("note"):
        print(f"mailgate: {answer['note']}", file=sys.stderr)
    if members is None:
        print(f"{args.action}: {', '.join(str(e) for e in answer.get('events', [])) or 'done'}")
        return EXIT_OK
    rows = [
        (
            f"{m['pool']}/{m['member']}",
            str(m.get("host", "")),
            str(m.get("state", "")),
            str(m.get("admin", "")),
            str(m.get("failures", 0)),
            str(m.get("weight", "")),
            str(m.get("sessions", 0)),
        )
        for m in members
    ]
    _table(("MEMBER", "HOST", "STATE", "ADMIN", "FAILURES", "WEIGHT", "SESSIONS"), rows)
    settings = args.settings
    cluster = settings is not None and settings.cluster.redis_url
    if args.action == "drain" and cluster and not args.no_move:
        from mailgate import clusteradmin  # affinity pools: the users assigned there move now

        for m in members:
            code = clusteradmin.run_drain(settings, f"{m['pool']}/{m['member']}", args.parallel)
            if code != EXIT_OK:
                return code
    return EXIT_OK


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    for row in (headers, *rows):
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )
