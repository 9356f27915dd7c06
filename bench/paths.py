"""The paths under test and how each one is started.

A path is what the load generator connects to, and the processes whose CPU is "the proxy",
"the auth service" and "the database" for it. Shared by every path: one C backend (imapd,
IMAP and POP3 ports), one nginx serving the fixed-answer auth_http endpoint (for nginx and
mailgate over auth_http), one MariaDB (mailgate's schema and the seed's `postfix` database),
one PostgreSQL, and the two certificates (ECDSA P-256, RSA-2048).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from dbstats import MariaDbStats, PostgresStats, Stats
from lab import (
    CERT_NAMES,
    PYTHON,
    ROOT,
    Lab,
    Proc,
    free_port,
    greets,
    python_env,
    wait_children,
    wait_for,
)

sys.path.insert(0, str(ROOT / "scripts"))
import peers

NGINX_MODULES = Path("/usr/lib/nginx/modules")  # Debian's libnginx-mod-* install here
# nginx and HAProxy connection limits: 2 descriptors per proxied session, inside the
# 20,000 open files a process may have here.
NGINX_CONNECTIONS = 9000
USER, PASSWORD, DOMAIN = "bench@example.com", "secret", "example.com"

# The runs, and which ports they use. Logins: IMAP, POP3, IMAPS with each certificate, with a
# full handshake every time and with resumption (the session the server last handed out).
LOGIN_RUNS = ("imap", "pop3", "imaps-ec", "imaps-ec-resume", "imaps-rsa", "imaps-rsa-resume")
TLS_RUNS = {
    f"imaps-{kind}{suffix}": (kind, mode)
    for kind in CERT_NAMES
    for suffix, mode in (("", "full"), ("-resume", "resume"))
}
RUNS = (*LOGIN_RUNS, "fetch")
ALL_LOGINS = frozenset(LOGIN_RUNS)
PLAIN_AND_FETCH = frozenset({"imap", "pop3", "fetch"})


def port_key(run: str) -> str:
    """The port a run connects to: imaps-ec-resume uses imaps-ec's."""
    return "imaps-" + TLS_RUNS[run][0] if run in TLS_RUNS else "imap" if run == "fetch" else run


@dataclass
class BenchPath:
    name: str
    ports: dict[str, int]  # port_key -> port
    runs: frozenset[str]  # which runs (and "idle") this path takes part in
    proxy: list[int] = field(default_factory=list)  # roots of the proxy's process tree
    auth: list[int] = field(default_factory=list)  # the auth service's, when a process of its own
    db: list[int] = field(default_factory=list)  # the database server's
    stats: Stats | None = None  # database counters (round trips, statements)
    mailgate: Path | None = None  # the src/ this mailgate runs from
    note: str = ""

    def takes(self, run: str) -> bool:
        return run in self.runs


@dataclass
class Shared:
    lab: Lab
    tools: dict[str, Path]
    certs: dict[str, tuple[Path, Path]]
    imapd: Proc
    imap: int  # imapd's ports
    pop3: int
    auth: Proc | None = None
    auth_port: int = 0
    mariadb: peers.Peer | None = None
    postgres: peers.Peer | None = None
    sqlite: Path | None = None
    log_level: str = "warning"


# ---------------------------------------------------------------- shared peers


def start_imapd(lab: Lab, imapd: Path, name: str = "imapd") -> tuple[Proc, int, int]:
    imap, pop3 = free_port(), free_port()
    proc = lab.start(name, [str(imapd), "-p", str(pop3), str(imap)])
    wait_for(lambda: greets(imap, b"* OK") and greets(pop3, b"+OK"), proc, "greeting")
    return proc, imap, pop3


NGINX_HEAD = """\
{load}daemon off;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{
  worker_connections {connections};
}}
"""

HTTP_HEAD = """\
  access_log off;
  client_body_temp_path {dir}/client_body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
"""

# The fixed auth_http answer both nginx and mailgate ask for: every login goes to imapd.
AUTH_HTTP = """\
http {{
{http_head}  map $http_auth_protocol $bench_port {{
    pop3 {pop3};
    default {imap};
  }}
{extra}  server {{
    listen 127.0.0.1:{port};
    location = /auth {{
      add_header Auth-Status OK;
      add_header Auth-Server 127.0.0.1;
      add_header Auth-Port {port_variable};
      return 200;
    }}
  }}
}}
"""


def start_nginx(lab: Lab, name: str, body: str, port: int, modules: tuple[str, ...]) -> Proc:
    d = lab.tmp / name
    d.mkdir(exist_ok=True)
    conf = d / "nginx.conf"
    load = "".join(f"load_module {NGINX_MODULES / m};\n" for m in modules)
    head = NGINX_HEAD.format(load=load, workers=1, dir=d, connections=NGINX_CONNECTIONS)
    conf.write_text(head + body.replace("{dir}", str(d)))
    proc = lab.start(name, ["nginx", "-p", f"{d}/", "-e", str(d / "error.log"), "-c", str(conf)])
    wait_for(lambda: greets(port), proc, f"port {port}")
    return proc


def start_auth(
    lab: Lab, imap: int, pop3: int, port_map: str = "", name: str = "nginx-auth"
) -> tuple[Proc, int]:
    """The auth_http endpoint; `port_map` (an nginx map defining $bench_scale_port) spreads
    routes over several backends instead (the scale mode)."""
    port = free_port()
    body = AUTH_HTTP.format(
        http_head=HTTP_HEAD,
        pop3=pop3,
        imap=imap,
        extra=port_map,
        port=port,
        port_variable="$bench_scale_port" if port_map else "$bench_port",
    )
    return start_nginx(lab, name, body, port, ()), port


def start_databases(shared: Shared, want_mariadb: bool, want_postgres: bool) -> Callable[[], None]:
    """Start MariaDB and PostgreSQL as scripts/peers.py starts them for the tests, in threads
    (install-db and initdb take seconds); returns the function that waits for them."""
    work = shared.lab.tmp / "db"

    def start(starter: Callable[[Path, int], peers.Peer]) -> peers.Peer:
        peer = starter(work, free_port())
        shared.lab.adopt(peer)  # in the thread: stopped even if the main thread was interrupted
        return peer

    pool = ThreadPoolExecutor(2)
    jobs: dict[str, Future[peers.Peer]] = {}
    if want_mariadb:
        jobs["mariadb"] = pool.submit(start, peers.start_mariadb)
    if want_postgres:
        jobs["postgres"] = pool.submit(start, peers.start_postgres)
    pool.shutdown(wait=False)

    def join() -> None:
        for name, job in jobs.items():
            try:
                setattr(shared, name, job.result())
            except peers.PeerError as e:
                raise RuntimeError(f"{name}: {e}") from None

    return join


def check_database_tools(want_mariadb: bool, want_postgres: bool) -> list[str]:
    missing = []
    if want_mariadb and not (peers.which("mariadbd") and peers.which("mariadb-install-db")):
        missing.append("MariaDB (mariadb-server)")
    if want_postgres and not peers.postgres_bin("initdb"):
        missing.append("PostgreSQL (postgresql)")
    return missing


# ---------------------------------------------------------------- nginx mail, HAProxy, minproxy


def tls_ports() -> dict[str, int]:
    return {f"imaps-{kind}": free_port() for kind in CERT_NAMES}


def start_nginx_mail(shared: Shared, buffer: str) -> BenchPath:
    ports = {"imap": free_port(), "pop3": free_port(), **tls_ports()}
    servers = [
        f"  server {{\n    listen 127.0.0.1:{ports['imap']};\n    protocol imap;\n  }}\n",
        f"  server {{\n    listen 127.0.0.1:{ports['pop3']};\n    protocol pop3;\n  }}\n",
    ]
    for kind, (cert, key) in shared.certs.items():
        servers.append(
            f"  server {{\n    listen 127.0.0.1:{ports['imaps-' + kind]} ssl;\n"
            f"    protocol imap;\n    ssl_certificate {cert};\n    ssl_certificate_key {key};\n"
            "  }\n"
        )
    extra = f"  proxy_buffer {buffer};\n" if buffer else ""
    body = (
        f"mail {{\n  auth_http 127.0.0.1:{shared.auth_port}/auth;\n{extra}"
        + "".join(servers)
        + "}\n"
    )
    proc = start_nginx(shared.lab, "nginx-mail", body, ports["imap"], ("ngx_mail_module.so",))
    assert shared.auth is not None
    return BenchPath(
        "nginx",
        ports,
        ALL_LOGINS | {"fetch", "idle"},
        [proc.pid],
        [shared.auth.pid],
        note="nginx mail, worker_processes 1, auth_http",
    )


HAPROXY = """\
global
  nbthread 1
  maxconn {maxconn}
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
{frontends}backend imapd
  server imapd 127.0.0.1:{imap}
backend pop3d
  server pop3d 127.0.0.1:{pop3}
"""


def start_haproxy(shared: Shared) -> BenchPath:
    ports = {"imap": free_port(), "pop3": free_port(), **tls_ports()}
    fronts = []
    for key, port in ports.items():
        tls = f" ssl crt {shared.lab.tmp / key.removeprefix('imaps-')}.pem" * key.startswith(
            "imaps"
        )
        backend = "pop3d" if key == "pop3" else "imapd"
        fronts.append(
            f"frontend {key}\n  bind 127.0.0.1:{port}{tls}\n  default_backend {backend}\n"
        )
    conf = shared.lab.tmp / "haproxy.cfg"
    conf.write_text(
        HAPROXY.format(
            maxconn=NGINX_CONNECTIONS, frontends="".join(fronts), imap=shared.imap, pop3=shared.pop3
        )
    )
    proc = shared.lab.start("haproxy", ["haproxy", "-db", "-f", str(conf)])
    proc.stop_signal = signal.SIGTERM  # hard stop: drops the sessions at once
    wait_for(lambda: greets(ports["imap"], b"* OK"), proc, "greeting")
    return BenchPath(
        "haproxy",
        ports,
        ALL_LOGINS | {"fetch", "idle"},
        [proc.pid],
        note="HAProxy mode tcp, nbthread 1 (TLS terminated for IMAPS)",
    )


def start_minproxy(shared: Shared) -> BenchPath:
    ports = {"imap": free_port(), "pop3": free_port(), **tls_ports()}
    argv = [
        PYTHON,
        str(Path(__file__).with_name("minproxy.py")),
        "--backend-imap",
        str(shared.imap),
        "--backend-pop3",
        str(shared.pop3),
        "--imap",
        str(ports["imap"]),
        "--pop3",
        str(ports["pop3"]),
    ]
    for kind, (cert, key) in shared.certs.items():
        argv += ["--imaps", str(ports["imaps-" + kind]), "--cert", str(cert), "--key", str(key)]
    proc = shared.lab.start("minproxy", argv)
    wait_for(lambda: greets(ports["imap"], b"* OK"), proc, "greeting")
    return BenchPath(
        "minproxy",
        ports,
        ALL_LOGINS | {"fetch", "idle"},
        [proc.pid],
        note="minimal Python login proxy (bench/minproxy.py), Protocols + uvloop",
    )


# ---------------------------------------------------------------- mailgate


MAILGATE_HEAD = """\
workers = {workers}
max_sessions = {max_sessions}
log_level = "{log_level}"
shutdown_timeout = 1

[[listener]]
protocol = "imap"
listen = "127.0.0.1:{imap}"

[throttle]
enabled = false
"""
MAILGATE_POP3 = '\n[[listener]]\nprotocol = "pop3"\nlisten = "127.0.0.1:{pop3}"\n'
MAILGATE_TLS = """
[[listener]]
protocol = "imap"
listen = "127.0.0.1:{imaps}"
tls = "implicit"

[tls]
certificate = "{ec_cert}"
certificate_key = "{ec_key}"

[[tls.sni]]
server_name = "{rsa_name}"
certificate = "{rsa_cert}"
certificate_key = "{rsa_key}"
"""
# Sessions per worker, set explicitly (the default comes from the open-file limit).
MAX_SESSIONS = 9000


def mailgate_config(
    shared: Shared,
    ports: dict[str, int],
    auth: str,
    workers: str = "1",
    max_sessions: int = MAX_SESSIONS,
) -> str:
    workers = workers if workers.isdigit() else f'"{workers}"'
    text = MAILGATE_HEAD.format(
        workers=workers, max_sessions=max_sessions, log_level=shared.log_level, imap=ports["imap"]
    )
    if "pop3" in ports:
        text += MAILGATE_POP3.format(pop3=ports["pop3"])
    if "imaps-ec" in ports:
        (ec_cert, ec_key), (rsa_cert, rsa_key) = shared.certs["ec"], shared.certs["rsa"]
        text += MAILGATE_TLS.format(
            imaps=ports["imaps-ec"],
            ec_cert=ec_cert,
            ec_key=ec_key,
            rsa_name=CERT_NAMES["rsa"],
            rsa_cert=rsa_cert,
            rsa_key=rsa_key,
        )
    return text + "\n" + auth


def start_mailgate(
    shared: Shared, name: str, src: Path, runs: frozenset[str], auth: str, workers: str = "1"
) -> tuple[Proc, dict[str, int]]:
    ports = {"imap": free_port()}
    if "pop3" in runs:
        ports["pop3"] = free_port()
    if runs & set(TLS_RUNS):
        ports["imaps-ec"] = free_port()
        ports["imaps-rsa"] = ports["imaps-ec"]  # one listener; SNI picks the certificate
    conf = shared.lab.tmp / f"{name}.toml"
    conf.write_text(mailgate_config(shared, ports, auth, workers))
    argv = [PYTHON, "-m", "mailgate", "serve", "-c", str(conf)]
    proc = shared.lab.start(name, argv, env=python_env(src))
    return proc, ports


def wait_mailgate(proc: Proc, ports: dict[str, int], workers: int) -> None:
    wait_for(lambda: greets(ports["imap"], b"* OK"), proc, "greeting")
    if workers > 1:
        wait_children(proc, workers)


def auth_http_section(shared: Shared) -> str:
    return f'[auth_http]\nurl = "http://127.0.0.1:{shared.auth_port}/auth"\n'


def database_section(db: str, cache: bool, shared: Shared) -> str:
    return directory_section(directory_urls(shared)[db], cache)


def directory_section(url: str, cache: bool) -> str:
    # {PLAIN} passwords: the figure is the lookup, not a deliberately slow hash.
    return f'[directory]\nurl = "{url}"\ncache_ttl = {60 if cache else 0}\n'


SEED_QUERIES = """
[directory.queries]
password = "SELECT clear AS password FROM users WHERE email = :user LIMIT 1"
route = "SELECT destination_mailstore AS host FROM transport WHERE domain = :domain LIMIT 1"
"""


def directory_urls(shared: Shared) -> dict[str, str]:
    urls = {}
    if shared.sqlite is not None:
        urls["sqlite"] = f"sqlite:///{shared.sqlite}"
    if shared.mariadb is not None:
        urls["mariadb"] = f"mysql://root@127.0.0.1:{shared.mariadb.ports['mysql']}/mailgate"
    if shared.postgres is not None:
        port = shared.postgres.ports["postgres"]
        urls["pg"] = f"postgresql://postgres@127.0.0.1:{port}/mailgate"
    return urls


# mailgate's admin API (what `mailgate directory init`, `mailstore add` ... call), in one
# process for every database: a CLI call per step would import mailgate a dozen times.
POPULATE = """
import asyncio, sys
from mailgate import admin
from mailgate.auth.schema import dispose, make_engine
from mailgate.values import Secret

async def populate(url, imap, pop3, user, password, domain):
    engine = make_engine(url, 1)
    try:
        await admin.init_schema(engine)
        await admin.add_mailstore(engine, "store1", "127.0.0.1", imap_port=imap, pop3_port=pop3)
        await admin.add_domain(engine, domain, "store1")
        await admin.add_user(engine, user, Secret(password), scheme="PLAIN")
    finally:
        await dispose(engine)

imap, pop3, user, password, domain, *urls = sys.argv[1:]
for url in urls:
    asyncio.run(populate(url, int(imap), int(pop3), user, password, domain))
"""


def populate_directories(shared: Shared, src: Path, which: tuple[str, ...]) -> None:
    """mailgate's own schema in each database: one mailstore (imapd), one domain, the bench
    user with a {PLAIN} password."""
    urls = directory_urls(shared)
    if "mariadb" in which and shared.mariadb is not None:
        peers.mariadb_sql(shared.mariadb, "CREATE DATABASE mailgate")
    if "pg" in which and shared.postgres is not None:
        peers.postgres_sql(shared.postgres, "CREATE DATABASE mailgate")
    chosen = [urls[db] for db in which if db in urls]
    if not chosen:
        return
    argv = [
        PYTHON,
        "-c",
        POPULATE,
        str(shared.imap),
        str(shared.pop3),
        USER,
        PASSWORD,
        DOMAIN,
        *chosen,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=python_env(src), timeout=120)
    if done.returncode:
        raise RuntimeError(f"populating {', '.join(which)}: {done.stderr.strip()[-2000:]}")


# ---------------------------------------------------------------- the seed


# The seed's mailauth.pm as the article gives it (bench/mailauth.pm). Only the DSN's host (and
# a port: ours is not 3306) and $protocol_ports (our backend's ports, not 110/143) differ.
MAILAUTH_PM = Path(__file__).with_name("mailauth.pm")

# The seed's nginx.conf excerpt: the Perl auth endpoint and the mail proxy in one nginx.
SEED_NGINX = """\
http {{
{http_head}  perl_modules  perl/lib;
  perl_require  mailauth.pm;

  server {{
    listen 127.0.0.1:{auth};
    location /auth {{
      perl  mailauth::handler;
    }}
  }}
}}

mail {{
  auth_http  127.0.0.1:{auth}/auth;
  auth_http_header X-NGX-Auth-Key "some secret";

  imap_auth plain login cram-md5;
  pop3_auth plain apop cram-md5;
  server {{
    listen 127.0.0.1:{imap};
    protocol imap;
  }}
  server {{
    listen 127.0.0.1:{pop3};
    protocol pop3;
  }}
}}
"""

SEED_SQL = f"""
CREATE DATABASE postfix CHARACTER SET utf8mb4;
CREATE TABLE postfix.users (email VARCHAR(255) NOT NULL, clear VARCHAR(255));
CREATE TABLE postfix.transport (domain VARCHAR(255) NOT NULL, destination_mailstore VARCHAR(255));
INSERT INTO postfix.users VALUES ('{USER}', '{PASSWORD}');
INSERT INTO postfix.transport VALUES ('{DOMAIN}', 'smtp:127.0.0.1');
CREATE USER IF NOT EXISTS 'mail-proxy'@'127.0.0.1' IDENTIFIED BY 'p@ssword';
GRANT SELECT ON postfix.* TO 'mail-proxy'@'127.0.0.1';
"""


def start_seed(shared: Shared, stats: Stats) -> BenchPath:
    """nginx with its embedded Perl running mailauth.pm over MariaDB's postfix database."""
    assert shared.mariadb is not None
    peers.mariadb_sql(shared.mariadb, SEED_SQL)
    d = shared.lab.tmp / "seed"
    (d / "perl" / "lib").mkdir(parents=True)
    pm = (
        MAILAUTH_PM.read_text()
        .replace("@MYSQL_PORT@", str(shared.mariadb.ports["mysql"]))
        .replace("@IMAP_PORT@", str(shared.imap))
        .replace("@POP3_PORT@", str(shared.pop3))
    )
    (d / "perl" / "lib" / "mailauth.pm").write_text(pm)
    ports = {"imap": free_port(), "pop3": free_port()}
    body = SEED_NGINX.format(http_head=HTTP_HEAD, auth=free_port(), **ports)
    modules = ("ngx_mail_module.so", "ngx_http_perl_module.so")
    proc = start_nginx(shared.lab, "seed", body, ports["imap"], modules)
    return BenchPath(
        "seed",
        ports,
        frozenset({"imap", "pop3"}),
        [proc.pid],
        db=[shared.mariadb.pid],
        stats=stats,
        note="the seed: nginx + embedded Perl mailauth.pm + MariaDB postfix "
        "(proxy and auth in one nginx worker)",
    )


def seed_directory(shared: Shared) -> str:
    assert shared.mariadb is not None
    port = shared.mariadb.ports["mysql"]
    url = f"mysql://mail-proxy:p%40ssword@127.0.0.1:{port}/postfix"
    return (
        directory_section(url, cache=False)
        + SEED_QUERIES
        + f"\n[directory.ports]\nimap = {shared.imap}\npop3 = {shared.pop3}\n"
    )


# ---------------------------------------------------------------- all of them


@dataclass(frozen=True)
class MailgateKind:
    name: str
    runs: frozenset[str]
    needs: str  # "", "sqlite", "mariadb", "pg"
    section: Callable[[Shared], str]
    workers: str = "1"
    note: str = ""


def mailgate_kinds() -> list[MailgateKind]:
    kinds = [
        MailgateKind(
            "mg-http",
            ALL_LOGINS | {"fetch", "idle"},
            "",
            auth_http_section,
            note="mailgate, workers = 1, auth_http (the same endpoint as nginx)",
        ),
        MailgateKind(
            "mg-http-w2",
            frozenset({"imap"}),
            "",
            auth_http_section,
            workers="auto",
            note='mailgate, workers = "auto" (2 here), auth_http',
        ),
    ]
    for db, label in (("sqlite", "SQLite"), ("mariadb", "MariaDB"), ("pg", "PostgreSQL")):
        cached_runs = ALL_LOGINS if db == "sqlite" else frozenset({"imap"})
        for cache in (True, False):
            kinds.append(
                MailgateKind(
                    f"mg-{db}" + ("" if cache else "-nocache"),
                    cached_runs if cache else frozenset({"imap"}),
                    db,
                    functools.partial(database_section, db, cache),
                    note=f"mailgate, built-in directory on {label}, "
                    + ("route cache on" if cache else "cache_ttl = 0"),
                )
            )
    kinds.append(
        MailgateKind(
            "mg-seed",
            frozenset({"imap", "pop3"}),
            "mariadb",
            seed_directory,
            note="mailgate, [directory.queries] on the seed's postfix database, cache_ttl = 0",
        )
    )
    return kinds


def wanted(name: str, patterns: list[str] | None) -> bool:
    if not patterns:
        return True
    return any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns)


def build_paths(
    shared: Shared,
    srcs: dict[str, Path],
    patterns: list[str] | None,
    nginx_buffer: str,
    databases: bool,
    seed: bool = True,
) -> list[BenchPath]:
    """Start every wanted path that needs no database server (databases=False), or every one
    that does; mailgates start side by side, then are waited for."""
    paths: list[BenchPath] = []
    if not databases:
        if wanted("direct", patterns):
            paths.append(
                BenchPath(
                    "direct",
                    {"imap": shared.imap, "pop3": shared.pop3},
                    PLAIN_AND_FETCH,
                    note="loadgen -> imapd",
                )
            )
        if wanted("nginx", patterns):
            paths.append(start_nginx_mail(shared, nginx_buffer))
        if wanted("haproxy", patterns) and shutil.which("haproxy"):
            paths.append(start_haproxy(shared))
        if wanted("minproxy", patterns):
            paths.append(start_minproxy(shared))
    mariadb_stats = postgres_stats = None
    if databases and shared.mariadb is not None:
        mariadb_stats = MariaDbStats(shared.lab, shared.mariadb)
        if seed and wanted("seed", patterns):
            paths.append(start_seed(shared, mariadb_stats))
    if databases and shared.postgres is not None:
        postgres_stats = PostgresStats(shared.lab, shared.postgres)
    starting: list[tuple[BenchPath, Proc, int]] = []
    available = directory_urls(shared)
    for label, src in srcs.items():
        for kind in mailgate_kinds():
            name = kind.name + label
            server = kind.needs in ("mariadb", "pg")
            # A pattern picks the compared checkout's path too (mg-http: mg-http@core).
            if server != databases or not (wanted(name, patterns) or wanted(kind.name, patterns)):
                continue
            if kind.needs and kind.needs not in available:
                continue
            proc, ports = start_mailgate(
                shared, name, src, kind.runs, kind.section(shared), kind.workers
            )
            path = BenchPath(name, ports, kind.runs, [proc.pid], mailgate=src, note=kind.note)
            if kind.section is auth_http_section:
                assert shared.auth is not None
                path.auth = [shared.auth.pid]
            if kind.needs == "mariadb":
                assert shared.mariadb is not None
                path.db, path.stats = [shared.mariadb.pid], mariadb_stats
            elif kind.needs == "pg":
                assert shared.postgres is not None
                path.db, path.stats = [shared.postgres.pid], postgres_stats
            workers = 1 if kind.workers == "1" else os.cpu_count() or 1  # mailgate's "auto"
            starting.append((path, proc, workers))
    for path, proc, workers in starting:
        wait_mailgate(proc, path.ports, workers)
        paths.append(path)
    return paths
