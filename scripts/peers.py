"""Start and stop real peers (Dovecot, nginx, HAProxy, MariaDB, PostgreSQL, Redis) for tests.

Every peer runs in the foreground in its own session, listens on 127.0.0.1 only, keeps its files
under the directory it is given, and is stopped by PID. Importable, and a CLI:

    python scripts/peers.py dovecot --dir D --name store1 --imap-port 10143 --pop3-port 10110 \\
        --users alice@example.com:secret
    python scripts/peers.py deliver --dir D --name store1 --user alice@example.com --subject hi
    python scripts/peers.py stop --dir D --name store1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# A cold MariaDB start (install-db included) takes 2-5 s on a 2-core CI machine; 30 s is a hang.
READY_TIMEOUT = 30.0
# Every peer here stops in about a second (Dovecot's master waits 1 s for its children).
STOP_TIMEOUT = 10.0
POLL_INTERVAL = 0.05
MASTER_USER = "mailgate-master"
MASTER_PASSWORD = "master-secret-for-tests"  # test data, never a real credential
# Unix socket paths hold at most 107 bytes; Dovecot adds up to ~25 under its base_dir.
MAX_SOCKET_DIR = 70
MAIL_USER = "mail"  # Debian's system user for mail: owns every maildir written here
NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
DOVECOT_DH = Path("/usr/share/dovecot/dh.pem")


class PeerError(RuntimeError):
    """A peer could not be started; the message carries the tail of its log."""


@dataclass
class Peer:
    name: str
    pid: int
    ports: dict[str, int]
    log_path: Path
    workdir: Path
    config_path: Path | None = None
    stop_signal: int = signal.SIGTERM
    cleanup: list[Path] = field(default_factory=list)  # temp dirs removed by stop()
    info: dict[str, str] = field(default_factory=dict)  # e.g. unix socket paths
    started: int = 0  # start time in clock ticks: guards stop() against a reused PID
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        stat = _proc_stat(self.pid)
        return bool(stat) and stat[0] != "Z" and int(stat[19]) == self.started

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Signal politely, then SIGKILL the peer's whole process group (its own session)."""
        if self.alive():
            _signal(self.pid, self.stop_signal)
        if not _wait_until(lambda: not self.alive(), timeout):
            _signal(-self.pid, signal.SIGKILL)
            _wait_until(lambda: not self.alive(), timeout)
        for path in self.cleanup:
            shutil.rmtree(path, ignore_errors=True)

    def to_json(self) -> str:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "proc"}
        return json.dumps(data, default=str)

    @classmethod
    def from_json(cls, text: str) -> Peer:
        d = json.loads(text)
        paths = {k: Path(d[k]) for k in ("log_path", "workdir")}
        conf = Path(d["config_path"]) if d["config_path"] else None
        return cls(**d | paths | {"config_path": conf, "cleanup": [Path(p) for p in d["cleanup"]]})


# ---------------------------------------------------------------- processes and ports

_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now and not handed out before by this process."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name: [0] state, [19] start time."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_until(check: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(POLL_INTERVAL)
    return check()


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def which(name: str) -> str | None:
    """`name` on PATH, or in the sbin dirs a non-login root shell may lack (dovecot, mariadbd)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    return found or (name if Path(name).is_absolute() and Path(name).is_file() else None)


def _resolve(argv: Sequence[str]) -> list[str]:
    return [which(argv[0]) or argv[0], *argv[1:]]


def _run(argv: Sequence[str], **kwargs: object) -> str:
    done = subprocess.run(  # type: ignore[call-overload]
        _resolve(argv), capture_output=True, text=True, timeout=READY_TIMEOUT * 2, **kwargs
    )
    if done.returncode != 0:
        raise PeerError(f"{argv[0]} failed ({done.returncode}): {done.stderr or done.stdout}")
    return str(done.stdout)


def _launch(name: str, argv: Sequence[str], cwd: Path, log: Path, **kw: object) -> Peer:
    """Start `argv` in its own session (so a terminal's Ctrl-C skips it), output to `log`."""
    with log.open("ab") as out:
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            _resolve(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, **kw,
        )  # fmt: skip
    stat = _proc_stat(proc.pid)
    return Peer(name, proc.pid, {}, log, cwd, started=int(stat[19]) if stat else 0, proc=proc)


def _wait_ready(peer: Peer, ready: Callable[[], bool], timeout: float = READY_TIMEOUT) -> Peer:
    """Return the peer once `ready()`; stop it and raise with its log if it dies or hangs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not peer.alive():
            peer.stop()
            raise PeerError(f"{peer.name} exited during start:\n{_log_tail(peer.log_path)}")
        if ready():
            return peer
        time.sleep(POLL_INTERVAL)
    peer.stop()
    raise PeerError(f"{peer.name} not ready after {timeout} s:\n{_log_tail(peer.log_path)}")


def _ports_ready(peer: Peer) -> Callable[[], bool]:
    return lambda: all(port_open(p) for p in peer.ports.values())


def _socket_dir(preferred: Path, cleanup: list[Path]) -> Path:
    """`preferred`, or a short temp dir when unix socket paths under it would be too long."""
    if len(str(preferred)) <= MAX_SOCKET_DIR:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    cleanup.append(Path(tempfile.mkdtemp(prefix="mailgate-sock-")))
    return cleanup[-1]


def _workdir(workdir: Path, name: str) -> Path:
    root = (workdir / name).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


# ---------------------------------------------------------------- Dovecot

DOVECOT_CONF = """\
instance_name = mailgate-{name}
base_dir = {run}
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = {protocols}
listen = {listen}
default_internal_user = root
default_internal_group = root
# Dovecot never accesses mail as root. Mail processes chroot into the mail dir (so root-only
# parents of the test dir are no obstacle), then run as the system user `mail`.
mail_uid = {mail_user}
mail_gid = {mail_user}
first_valid_uid = 1
first_valid_gid = 1
mail_chroot = {mail}
valid_chroot_dirs = {mail}
mail_location = maildir:~
mail_max_userip_connections = 1000
verbose_proctitle = no
auth_verbose = no
auth_debug = no
auth_mechanisms = plain login cram-md5{oauth2_mechanisms}
# Empty: any character, so that p%ony@example.com is a valid login.
auth_username_chars =
auth_master_user_separator = *
login_trusted_networks = {trusted}
disable_plaintext_auth = no
{tls}
# Tests fail logins on purpose. No reply delay: a first passdb adds `nodelay`, which survives a
# later failure (auth_failure_delay = 0 alone still waits 0.5 s in 2.3). No per-IP penalty:
# anvil gets no auth-penalty socket.
auth_failure_delay = 0
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
passdb {{
  driver = static
  args = noauthenticate nodelay=yes
  master = yes
  result_success = continue
}}
passdb {{
  driver = passwd-file
  args = {root}/masters
  master = yes
  result_success = continue
}}
passdb {{
  driver = static
  args = noauthenticate nodelay=yes
}}
{oauth2_passdb}passdb {{
  driver = passwd-file
  args = {root}/users
}}
userdb {{
  driver = passwd-file
  args = {root}/users
}}
service auth {{
  user = root
}}
{listeners}"""


def dovecot_version() -> tuple[int, int]:
    major, minor = _run(["dovecot", "--version"]).split()[0].split(".")[:2]
    return int(major), int(minor)


def _user_line(user: str, password: str, home: str = "") -> str:
    if any(ch in password + user for ch in ":\n"):
        raise ValueError("passwd-file cannot hold ':' or a newline in a user or password")
    return f"{user}:{{PLAIN}}{password}::::{home}::\n"


def _make_maildir(mail_root: Path, user: str) -> Path:
    """The user's home, a maildir owned by MAIL_USER (Dovecot never accesses mail as root)."""
    local, _, domain = user.lower().partition("@")
    home = mail_root / (domain or "_") / local
    for sub in ("tmp", "new", "cur"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    for path in (home.parent, home, home / "tmp", home / "new", home / "cur"):
        shutil.chown(path, MAIL_USER, MAIL_USER)
    return home


def _write_users(
    root: Path, users: dict[str, str], master: tuple[str, str] | None, mail: Path | None = None
) -> Path:
    """passwd-files with homes relative to the mail chroot; returns the mail dir."""
    mail, state = mail or root / "mail", root / "state"
    mail.mkdir(exist_ok=True)
    state.mkdir(exist_ok=True)
    shutil.chown(mail, MAIL_USER, MAIL_USER)
    homes = {u: f"/{_make_maildir(mail, u).relative_to(mail)}" for u in users}
    (root / "users").write_text("".join(_user_line(u, p, homes[u]) for u, p in users.items()))
    (root / "masters").write_text(_user_line(*master) if master else "")
    return mail


def _dovecot_tls(cert: Path | None, key: Path | None) -> str:
    if not (cert and key):
        return "ssl = no"
    dh = f"ssl_dh = <{DOVECOT_DH}" if DOVECOT_DH.exists() else ""
    return f"ssl = yes\nssl_cert = <{cert}\nssl_key = <{key}\n{dh}"


def _dovecot_listeners(ports: dict[str, int], relay_port: int | None = None) -> str:
    """Listener blocks; port 0 disables one. Login processes stay up (service_count = 0).
    Submission relays to 127.0.0.1:`relay_port` (an MTA such as scripts/postfix.py's)."""
    blocks = []
    for login, names in (("imap", ("imap", "imaps")), ("pop3", ("pop3", "pop3s"))):
        listeners = "".join(
            f"  inet_listener {n} {{\n    port = {ports.get(n, 0)}\n  }}\n" for n in names
        )
        blocks.append(
            f"service {login}-login {{\n{listeners}  service_count = 0\n  client_limit = 1000\n}}\n"
            f"service {login} {{\n  process_limit = 1000\n}}\n"
        )
    if "submission" in ports:
        # Without a relay MTA, login works and sending fails (no server on a free port).
        blocks.append(
            f"submission_relay_host = 127.0.0.1\n"
            f"submission_relay_port = {relay_port or free_port()}\n"
            "service submission-login {\n  inet_listener submission {\n"
            f"    port = {ports['submission']}\n  }}\n}}\n"
        )
    return "".join(blocks)


def start_dovecot(
    workdir: Path,
    name: str,
    *,
    imap_port: int,
    pop3_port: int,
    imaps_port: int | None = None,
    pop3s_port: int | None = None,
    submission_port: int | None = None,
    users: dict[str, str],
    master: tuple[str, str] | None = (MASTER_USER, MASTER_PASSWORD),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    trusted_networks: str = "127.0.0.0/8",
    mail_dir: Path | None = None,
    listen: str = "127.0.0.1",
    extra_conf: str = "",
    oauth2_conf: Path | None = None,
    submission_relay_port: int | None = None,
) -> Peer:
    """One Dovecot with passwd-file users, maildirs in workdir/name/mail/<domain>/<local>
    (or in `mail_dir`: two Dovecots given the same one share their mail storage). `listen`:
    Dovecot's listen (127.0.0.1 must be among it); `extra_conf`: more settings, appended.

    With `oauth2_conf` (a dovecot-oauth2.conf.ext), XOAUTH2 and OAUTHBEARER logins are
    validated by Dovecot's oauth2 passdb; the users still come from the passwd-file userdb.
    """
    if dovecot_version() >= (2, 4):
        raise PeerError("Dovecot 2.4 changed the config syntax; only 2.3 is supported here")
    if (imaps_port or pop3s_port) and not (tls_cert and tls_key):
        raise ValueError("implicit TLS ports need tls_cert and tls_key")
    root, cleanup = _workdir(workdir, name), list[Path]()
    mail = _write_users(root, users, master, mail_dir.resolve() if mail_dir else None)
    named = {"imap": imap_port, "pop3": pop3_port, "imaps": imaps_port, "pop3s": pop3s_port,
             "submission": submission_port}  # fmt: skip
    ports = {k: v for k, v in named.items() if v}
    conf, log = root / "dovecot.conf", root / "dovecot.log"
    conf.write_text(
        DOVECOT_CONF.format(
            name=name,
            root=root,
            run=_socket_dir(root / "run", cleanup),
            mail=mail,
            mail_user=MAIL_USER,
            trusted=trusted_networks,
            tls=_dovecot_tls(tls_cert, tls_key),
            protocols="imap pop3" + " submission" * bool(submission_port),
            listeners=_dovecot_listeners(ports, submission_relay_port),
            oauth2_mechanisms=" xoauth2 oauthbearer" if oauth2_conf else "",
            oauth2_passdb=_oauth2_passdb(oauth2_conf),
            listen=listen,
        )
        + extra_conf
    )
    peer = _launch(name, ["dovecot", "-F", "-c", str(conf)], root, log)
    peer.ports, peer.config_path, peer.cleanup = ports, conf, cleanup
    return _wait_ready(peer, lambda: _greets(imap_port, b"* OK") and _ports_ready(peer)())


def _oauth2_passdb(conf: Path | None) -> str:
    """Dovecot's oauth2 passdb for token logins only; passwords go on to the passwd-file."""
    if conf is None:
        return ""
    return (
        f"passdb {{\n  driver = oauth2\n  mechanisms = xoauth2 oauthbearer\n  args = {conf}\n}}\n"
    )


def _greets(port: int, prefix: bytes) -> bool:
    """True once the server greets: Dovecot's greeting waits for its auth process."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as sock:
            return sock.recv(200).startswith(prefix)
    except OSError:
        return False


def deliver(peer: Peer, user: str, subject: str, body: str = "test message\n") -> Path:
    """Put one message into `user`'s INBOX on this Dovecot (a maildir write, as an MDA does)."""
    home = _make_maildir(peer.workdir / "mail", user)
    date = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    message = (
        f"From: sender@example.net\nTo: {user}\nSubject: {subject}\nDate: {date}\n"
        f"Message-ID: <{uuid.uuid4().hex}@mailgate.test>\n\n{body}"
    )
    tmp = home / "tmp" / f"{time.time():.6f}.{uuid.uuid4().hex}.mailgate"
    tmp.write_text(message)
    shutil.chown(tmp, MAIL_USER, MAIL_USER)
    return tmp.rename(home / "new" / tmp.name)


# ---------------------------------------------------------------- nginx


def _start_nginx(workdir: Path, name: str, body: str, ports: dict[str, int]) -> Peer:
    root = _workdir(workdir, name)
    (root / "tmp").mkdir(exist_ok=True)
    conf, log = root / "nginx.conf", root / "error.log"
    conf.write_text(
        f"load_module {NGINX_MAIL_MODULE};\ndaemon off;\nworker_processes 1;\n"
        f"pid {root}/nginx.pid;\nerror_log {log} info;\nevents {{\n  worker_connections 4096;\n}}\n"
        + body
    )
    peer = _launch(name, ["nginx", "-p", str(root), "-e", str(log), "-c", str(conf)], root, log)
    peer.ports, peer.config_path, peer.stop_signal = ports, conf, signal.SIGQUIT
    return _wait_ready(peer, _ports_ready(peer))


def start_nginx_mail(
    workdir: Path,
    *,
    imap_port: int,
    pop3_port: int,
    auth_url: str,
    smtp_port: int | None = None,
    imaps_port: int | None = None,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    name: str = "nginx-mail",
    extra: str = "",
) -> Peer:
    """nginx as a mail proxy asking auth_http at `auth_url` (host:port/path)."""
    named = {"imap": imap_port, "pop3": pop3_port, "smtp": smtp_port, "imaps": imaps_port}
    ports = {k: v for k, v in named.items() if v}
    tls = f"  ssl_certificate {tls_cert};\n  ssl_certificate_key {tls_key};\n  starttls on;\n"
    servers = "".join(
        f"  server {{\n    listen 127.0.0.1:{port}{' ssl' * (proto == 'imaps')};\n"
        f"    protocol {proto.removesuffix('s')};\n  }}\n"
        for proto, port in ports.items()
    )
    body = (
        "mail {\n  server_name mail.example.com;\n"
        f"  auth_http {auth_url.removeprefix('http://')};\n  proxy_pass_error_message on;\n"
        "  imap_auth plain login cram-md5;\n  pop3_auth plain apop cram-md5;\n"
        f"  smtp_auth plain login cram-md5;\n{tls * bool(tls_cert)}{extra}{servers}}}\n"
    )
    return _start_nginx(workdir, name, body, ports)


def start_nginx_http_auth(
    workdir: Path,
    *,
    port: int,
    backend_port: int,
    backend_host: str = "127.0.0.1",
    status: str = "OK",
    http_status: int = 200,
    name: str = "nginx-auth",
) -> Peer:
    """An auth_http endpoint at /auth answering every request with one fixed route.

    `http_status` is the HTTP status of the answer: many real nginx auth locations answer
    204 (No Content) with the Auth-* headers, which nginx's mail module reads all the same.
    """
    tmp = (workdir / name / "tmp").resolve()
    temps = "".join(
        f"  {k}_temp_path {tmp}/{k};\n"
        for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    headers = {"Auth-Status": status, "Auth-Server": backend_host, "Auth-Port": backend_port}
    adds = "".join(f"      add_header {k} {v};\n" for k, v in headers.items())
    body = (
        f"http {{\n  access_log off;\n{temps}  server {{\n    listen 127.0.0.1:{port};\n"
        f"    location = /auth {{\n{adds}      return {http_status};\n    }}\n  }}\n}}\n"
    )
    return _start_nginx(workdir, name, body, {"http": port})


# ---------------------------------------------------------------- HAProxy

HAPROXY_CONF = """\
global
  log stdout format raw local0 info
  maxconn 4096
defaults
  mode tcp
  log global
  option tcplog
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend {name}
  bind 127.0.0.1:{port}
  default_backend mailgate
backend mailgate
  server mg1 {server}
"""
# HAProxy server keywords for each way of sending the PROXY header.
SEND_PROXY = {"v2": " send-proxy-v2", "v1": " send-proxy", "none": ""}


def start_haproxy(
    workdir: Path,
    *,
    port: int,
    backend_port: int,
    backend_host: str = "127.0.0.1",
    send_proxy: str = "v2",
    check_interval: float | None = 0.2,
    name: str = "haproxy",
) -> Peer:
    """HAProxy in TCP mode on 127.0.0.1:port, sending the PROXY header to one backend.

    With `check_interval` (seconds) it health-checks the backend with the header too
    (`check-send-proxy`): a v2 check arrives as a LOCAL header, then the connection closes.
    """
    root = _workdir(workdir, name)
    server = f"{backend_host}:{backend_port}{SEND_PROXY[send_proxy]}"
    if check_interval is not None:
        server += f" check inter {int(check_interval * 1000)}ms"
        server += " check-send-proxy" * (send_proxy != "none")
    conf, log = root / "haproxy.cfg", root / "haproxy.log"
    conf.write_text(HAPROXY_CONF.format(name=name, port=port, server=server))
    _run(["haproxy", "-c", "-q", "-f", str(conf)])  # a config error is reported here, clearly
    peer = _launch(name, ["haproxy", "-db", "-f", str(conf)], root, log)
    peer.ports, peer.config_path = {"tcp": port}, conf
    return _wait_ready(peer, _ports_ready(peer))


def start_haproxy_config(
    workdir: Path, config: str, ports: dict[str, int], name: str = "haproxy"
) -> Peer:
    """HAProxy with a whole configuration of the caller's (checked first); ready when every
    port in `ports` (on 127.0.0.1) accepts."""
    root = _workdir(workdir, name)
    conf, log = root / "haproxy.cfg", root / "haproxy.log"
    conf.write_text(config)
    _run(["haproxy", "-c", "-q", "-f", str(conf)])
    peer = _launch(name, ["haproxy", "-db", "-f", str(conf)], root, log)
    peer.ports, peer.config_path = dict(ports), conf
    return _wait_ready(peer, _ports_ready(peer))


# ---------------------------------------------------------------- databases


def start_mariadb(workdir: Path, port: int, name: str = "mariadb") -> Peer:
    """MariaDB: root@127.0.0.1 without password over TCP, root over the unix socket."""
    root, cleanup = _workdir(workdir, name), list[Path]()
    data, log = root / "data", root / "mariadb.log"
    sock = _socket_dir(root / "run", cleanup) / "mysqld.sock"
    if not (data / "mysql").exists():
        _run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
              "--skip-test-db", "--auth-root-authentication-method=socket"])  # fmt: skip
    argv = ["mariadbd", "--no-defaults", f"--datadir={data}", f"--port={port}",
            f"--socket={sock}", "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
            f"--pid-file={root}/mariadb.pid", "--skip-log-bin", "--innodb-buffer-pool-size=32M",
            "--max-connections=500"]  # fmt: skip
    peer = _launch(name, argv, root, log)
    peer.ports, peer.cleanup, peer.info = {"mysql": port}, cleanup, {"socket": str(sock)}
    _wait_ready(peer, lambda: port_open(port) and sock.exists())
    mariadb_sql(peer, "CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY '';"
                "GRANT ALL ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION;")  # fmt: skip
    return peer


def mariadb_sql(peer: Peer, sql: str, database: str | None = None) -> str:
    """Run SQL as root over the unix socket; returns tab-separated rows."""
    argv = ["mariadb", "--no-defaults", f"--socket={peer.info['socket']}", "-uroot", "-N", "-B"]
    return _run([*argv, *([database] if database else []), "-e", sql])


def postgres_bin(tool: str) -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"))
    return found[-1] if found else None


def start_postgres(
    workdir: Path,
    port: int,
    name: str = "postgres",
    listen: Sequence[str] = ("127.0.0.1",),
    trust: Sequence[str] = (),
) -> Peer:
    """PostgreSQL, superuser `postgres`, trust auth on 127.0.0.1 (and from the `trust`
    networks, listening on `listen` too).

    The server refuses to run as root, and the postgres user cannot enter a root-only test dir,
    so its data lives in a fresh temp dir owned by postgres, which stop() removes.
    """
    initdb, postgres = postgres_bin("initdb"), postgres_bin("postgres")
    if not (initdb and postgres):
        raise PeerError("PostgreSQL binaries not found under /usr/lib/postgresql/*/bin")
    root, base = _workdir(workdir, name), Path(tempfile.mkdtemp(prefix="mailgate-pg-"))
    base.chmod(0o755)  # the postgres user must enter it; nothing secret inside
    shutil.chown(base, "postgres", "postgres")
    as_pg: dict[str, object] = {"user": "postgres", "group": "postgres", "extra_groups": []}
    data, log = base / "data", root / "postgres.log"
    _run([str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
         cwd=base, **as_pg)  # fmt: skip
    with (data / "pg_hba.conf").open("a") as hba:
        hba.writelines(f"host all all {network} trust\n" for network in trust)
    argv = [str(postgres), "-D", str(data), "-p", str(port), "-k", str(base),
            "-c", f"listen_addresses={','.join(listen)}", "-c", "fsync=off",
            "-c", "max_connections=200", "-c", "shared_buffers=32MB"]  # fmt: skip
    peer = _launch(name, argv, base, log, **as_pg)
    peer.ports, peer.stop_signal, peer.cleanup = {"postgres": port}, signal.SIGINT, [base]
    peer.workdir, peer.info = root, {"socket_dir": str(base), "data": str(data)}
    return _wait_ready(peer, lambda: _psql_ok(port))


def _psql_ok(port: int) -> bool:
    isready = str(postgres_bin("pg_isready") or "pg_isready")
    argv = [isready, "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
    return subprocess.run(argv, check=False, timeout=READY_TIMEOUT).returncode == 0


def postgres_sql(peer: Peer, sql: str, database: str = "postgres") -> str:
    """Run SQL as `postgres` over TCP; returns unaligned rows."""
    argv = ["psql", "-h", "127.0.0.1", "-p", str(peer.ports["postgres"]), "-U", "postgres"]
    return _run([*argv, "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])


def start_redis(
    workdir: Path, port: int, name: str = "redis", bind: Sequence[str] = ("127.0.0.1",)
) -> Peer:
    """Redis without persistence, on `bind` (127.0.0.1 must be among them)."""
    root = _workdir(workdir, name)
    log = root / "redis.log"
    # Bound to the given addresses only; without a password, protected mode would refuse
    # every client not on loopback.
    protected = "yes" if list(bind) == ["127.0.0.1"] else "no"
    argv = ["redis-server", "--port", str(port), "--bind", *bind,
            "--protected-mode", protected, "--save", "",
            "--appendonly", "no", "--daemonize", "no", "--dir", str(root),
            "--logfile", str(log)]  # fmt: skip
    peer = _launch(name, argv, root, log)
    peer.ports = {"redis": port}
    return _wait_ready(peer, _ports_ready(peer))


# ---------------------------------------------------------------- CLI

STARTERS: dict[str, Callable[..., Peer]] = {
    "dovecot": start_dovecot,
    "nginx-mail": start_nginx_mail,
    "nginx-auth": start_nginx_http_auth,
    "haproxy": start_haproxy,
    "mariadb": start_mariadb,
    "postgres": start_postgres,
    "redis": start_redis,
}
PORT_OPTIONS = ("port", "imap-port", "pop3-port", "imaps-port", "pop3s-port", "submission-port",
                "smtp-port", "backend-port")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="start/stop real peers for mailgate tests")
    p.add_argument("kind", choices=[*STARTERS, "stop", "deliver"])
    p.add_argument("--dir", type=Path, required=True, help="working directory of the peers")
    p.add_argument("--name", help="peer name (default: the kind)")
    p.add_argument("--foreground", action="store_true", help="stay until SIGINT/SIGTERM, then stop")
    for option in PORT_OPTIONS:
        p.add_argument(f"--{option}", type=int)
    p.add_argument("--users", nargs="*", default=[], help="user:password ...")
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    p.add_argument("--auth-url", help="nginx-mail: host:port/path of auth_http")
    p.add_argument("--send-proxy", choices=sorted(SEND_PROXY), help="haproxy: header version")
    p.add_argument("--http-status", type=int, help="nginx-auth: HTTP status of the answer")
    p.add_argument("--user", help="deliver: the recipient")
    p.add_argument("--subject", default="test message", help="deliver: the subject")
    return p


def _start_from_args(args: argparse.Namespace) -> Peer:
    starter = STARTERS[args.kind]
    accepted = inspect.signature(starter).parameters
    given = {k: v for k, v in vars(args).items() if k in accepted and v is not None}
    if "users" in accepted:
        given["users"] = dict(pair.split(":", 1) for pair in args.users)
    return starter(args.dir, **given)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.name = args.name or args.kind
    record = args.dir / f"{args.name}.peer.json"
    if args.kind in ("stop", "deliver"):
        peer = Peer.from_json(record.read_text())
        if args.kind == "deliver":
            print(deliver(peer, args.user, args.subject))
            return 0
        peer.stop()
        record.unlink()
        return 0
    peer = _start_from_args(args)
    record.write_text(peer.to_json())
    print(peer.to_json(), flush=True)
    if args.foreground:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            peer.proc.wait() if peer.proc else None
        except KeyboardInterrupt:
            pass
        finally:
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
