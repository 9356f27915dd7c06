"""Database round trips and statements per login, read off the database servers themselves.

Round trips on MariaDB: requests that each get a reply, from the server's global status
counters: Questions (statements: SELECT, ROLLBACK, SET ...) + Com_admin_commands (COM_PING and
the like, which Questions leaves out) + Com_stmt_prepare. Exact, whoever the client is.

Round trips on PostgreSQL, which counts no statements: one extra small login run per path
with `log_statement = all` (set with ALTER SYSTEM and a reload, then reset), counting the
statements the server logged (`statement:` for simple queries, `execute` for each
extended-protocol Bind/Execute/Sync) per login. Logging costs the server CPU, so that run is
not one of the measured ones. Also shown, for both servers: the data segments the server
received on its TCP connections (`ss -ti` data_segs_in, local port = the server's) during the
measured runs; a client sends each request in one write, so that is one segment per round
trip, but connections that close during a run are missed (a pool's overflow connections),
which `connects`/`sessions` per login shows.

Statements: MariaDB's counters (Questions, Com_select, Com_admin_commands = pings,
Com_rollback, Connections ...) and PostgreSQL's pg_stat_database (xact_commit, xact_rollback,
tup_returned, tup_fetched, sessions) for mailgate's database. Both are read over one
persistent session on the server's unix socket (so it adds no TCP segments); what each
reading adds itself is measured at start and subtracted. PostgreSQL's backends publish their
counters at most once a second, so its "after" reading waits `settle` seconds; its reader's
backend process is left out of the database's CPU.
"""

from __future__ import annotations

import collections
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from lab import Lab

MARKER = "__bench_end__"
MARIADB_COUNTERS = (
    "Questions",
    "Com_select",
    "Com_admin_commands",
    "Com_rollback",
    "Com_commit",
    "Com_begin",
    "Com_stmt_prepare",
    "Com_stmt_execute",
    "Com_set_option",
    "Connections",
)
POSTGRES_COUNTERS = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "sessions")
# PostgreSQL's PGSTAT_MIN_INTERVAL is 1 s: a backend publishes its counters at most that often.
POSTGRES_SETTLE = 1.2


@dataclass(frozen=True)
class Snapshot:
    counters: dict[str, float]
    segments: dict[str, int]  # peer address -> data segments received from it


class Stats(Protocol):
    exclude: frozenset[int]  # pids to leave out of the database's CPU
    settle: float

    def snapshot(self) -> Snapshot: ...

    def delta(self, before: Snapshot, after: Snapshot) -> dict[str, float]: ...


class _Session:
    """One long-lived command-line client: a query in, its rows out, up to a marker row."""

    def __init__(self, lab: Lab, argv: list[str], marker_sql: str) -> None:
        self.marker_sql = marker_sql
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        lab.adopt(self)

    def rows(self, sql: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(sql + "\n" + self.marker_sql + "\n")
        self.proc.stdin.flush()
        rows: list[str] = []
        for line in self.proc.stdout:
            if line.strip() == MARKER:
                return rows
            rows.append(line.rstrip("\n"))
        raise RuntimeError("database session ended")

    def stop(self, timeout: float = 5.0) -> None:
        self.proc.kill()
        self.proc.wait(timeout)


def server_segments(port: int) -> dict[str, int]:
    """data_segs_in of every established TCP socket with local port `port`, by peer."""
    argv = ["ss", "-tinH", "state", "established", "(", "sport", "=", f":{port}", ")"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    found, peer = {}, ""
    for line in out.splitlines():
        if line and not line[0].isspace():
            peer = line.split()[-1]
        elif peer:
            m = re.search(r"\bdata_segs_in:(\d+)", line)
            found[peer] = int(m[1]) if m else 0
    return found


class _Counters:
    port: int
    exclude: frozenset[int] = frozenset()
    settle = 0.0
    overhead: dict[str, float]

    def read(self) -> dict[str, float]:
        raise NotImplementedError

    def calibrate(self) -> None:
        first = self.read()
        self.read()
        third = self.read()
        self.overhead = {k: (third[k] - first[k]) / 2 for k in first}

    def snapshot(self) -> Snapshot:
        return Snapshot(self.read(), server_segments(self.port))

    def delta(self, before: Snapshot, after: Snapshot) -> dict[str, float]:
        out = {k: after.counters[k] - before.counters[k] - self.overhead[k] for k in after.counters}
        out["segments"] = sum(
            n - before.segments.get(peer, 0) for peer, n in after.segments.items()
        )
        out["round_trips"] = self.round_trips(out)
        return out

    def round_trips(self, delta: dict[str, float]) -> float:
        return delta["segments"]


class MariaDbStats(_Counters):
    def __init__(self, lab: Lab, peer: object) -> None:
        info, ports = peer.info, peer.ports  # type: ignore[attr-defined]
        self.port = ports["mysql"]
        argv = [
            "mariadb",
            "--no-defaults",
            f"--socket={info['socket']}",
            "-uroot",
            "-N",
            "-B",
            "--unbuffered",
        ]
        self.session = _Session(lab, argv, f"SELECT '{MARKER}';")
        self.calibrate()

    def round_trips(self, delta: dict[str, float]) -> float:
        return delta["questions"] + delta["com_admin_commands"] + delta["com_stmt_prepare"]

    def read(self) -> dict[str, float]:
        names = ", ".join(f"'{n}'" for n in MARIADB_COUNTERS)
        rows = self.session.rows(f"SHOW GLOBAL STATUS WHERE Variable_name IN ({names});")
        values = dict(row.split("\t") for row in rows)
        return {k.lower(): float(values.get(k, 0)) for k in MARIADB_COUNTERS}


class PostgresStats(_Counters):
    settle = POSTGRES_SETTLE

    def __init__(self, lab: Lab, peer: object, database: str = "mailgate") -> None:
        info, ports = peer.info, peer.ports  # type: ignore[attr-defined]
        self.port, self.database = ports["postgres"], database
        self.log: Path = peer.log_path  # type: ignore[attr-defined]
        argv = [
            "psql",
            "-h",
            info["socket_dir"],
            "-p",
            str(self.port),
            "-U",
            "postgres",
            "-d",
            "postgres",
            "-At",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
        ]
        self.session = _Session(lab, argv, f"SELECT '{MARKER}';")
        self.exclude = frozenset({int(self.session.rows("SELECT pg_backend_pid();")[0])})
        self.calibrate()

    def log_statements(self, on: bool) -> None:
        """log_statement = all (or back to the default) on every backend, within a moment."""
        setting = "SET log_statement = 'all'" if on else "RESET log_statement"
        self.session.rows(f"ALTER SYSTEM {setting};")
        self.session.rows("SELECT pg_reload_conf();")
        time.sleep(0.3)  # each backend rereads the config before its next command

    def read(self) -> dict[str, float]:
        sums = ", ".join(f"coalesce(sum({c}), 0)" for c in POSTGRES_COUNTERS)
        rows = self.session.rows(
            f"SELECT {sums} FROM pg_stat_database WHERE datname = '{self.database}';"
        )
        return dict(zip(POSTGRES_COUNTERS, map(float, rows[0].split("|")), strict=True))


LOGGED = re.compile(r"\[(\d+)\] LOG:  (?:statement|execute [^:]*): (.*)")
# SQLAlchemy's asyncpg pool ping is BEGIN, an empty query ";", ROLLBACK; PostgreSQL does not
# log an empty query, so a BEGIN followed at once by its end stands for one.
INFERRED_PING = "(empty query: a pool ping, not logged, inferred)"


def logged_statements(log: Path, offset: int, exclude: frozenset[int]) -> collections.Counter[str]:
    """Statements PostgreSQL logged past `offset` of its log, except those of `exclude`d pids."""
    with log.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    found: collections.Counter[str] = collections.Counter()
    last: dict[int, str] = {}
    for line in text.splitlines():
        m = LOGGED.search(line)
        if not m or int(m[1]) in exclude:
            continue
        pid, statement = int(m[1]), " ".join(m[2].split())[:70]
        if last.get(pid) == "BEGIN;" and statement in ("ROLLBACK;", "COMMIT;"):
            found[INFERRED_PING] += 1
        found[statement] += 1
        last[pid] = statement
    return found
