"""Admin subcommands: `directory`, `mailstore`, `domain`, `user` and `auth test`.

Parsing and printing only; the work is in `mailgate.admin` (writes) and
`mailgate.auth.directory` (`auth test`). Passwords are read from a terminal prompt or, with
`--password-stdin`, from the first line of standard input: never from argv, where `ps` and
shell history would show them. `directory flush` signals a running server (via `pid_file`) to
forget its cached logins. Exit codes: 0 ok, 1 the operation failed, 2 usage or config.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import getpass
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from mailgate import admin, clusteradmin
from mailgate.auth.directory import SqlDirectory
from mailgate.auth.schema import (
    OAUTH_LOGINS,
    SMTP_LOGINS,
    TLS_MODES,
    SchemaError,
    dispose,
    make_engine,
)
from mailgate.config import PROTOCOLS, ConfigError, DirectorySettings, Settings
from mailgate.values import ClientInfo, Credentials, Method, Reject, Route, Secret

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# One line of standard input: far above any password (sasl.MAX_FIELD is 1 KiB).
MAX_STDIN_LINE = 4096
# A pid file holds one decimal number and a newline; Linux pids have at most 7 digits.
MAX_PID_FILE = 64
# What `mailgate serve` acts on by flushing the route cache in every worker (server.py).
FLUSH_SIGNAL = signal.SIGUSR1

LoadSettings = Callable[[str], Settings]
Handler = Callable[[argparse.Namespace], int]
Command = Callable[[argparse.Namespace, DirectorySettings], Coroutine[Any, Any, int]]


class UsageError(Exception):
    """The command line cannot be acted on (exit 2)."""


def register(subparsers: Any, load_settings: LoadSettings) -> None:
    """Add the admin commands to the top-level subparsers (argparse's _SubParsersAction)."""

    def leaf(parent: Any, name: str, help_text: str, run: Command) -> Any:
        p = parent.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the subcommand; SUPPRESS keeps a top-level -c when not given here.
        p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
        p.set_defaults(func=_handler(run, load_settings))
        return p

    def group(name: str, help_text: str) -> Any:
        p = subparsers.add_parser(name, help=help_text, description=help_text)
        return p.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    d = group("directory", "create or upgrade the [directory] tables; flush a server's cache")
    leaf(d, "init", "create the tables in an empty database", _directory_init)
    leaf(d, "upgrade", "apply schema migrations", _directory_upgrade)
    p = d.add_parser(
        "flush",
        help="make a running `mailgate serve` forget its cached logins",
        description="Signal the server named by pid_file to flush its route cache in every "
        "worker, so a disabled user, a new password or a moved mailbox counts at the next login.",
    )
    p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
    p.set_defaults(func=lambda args: _directory_flush(args, load_settings))

    m = group("mailstore", "backend mail servers")
    p = leaf(m, "add", "add a mailstore", _mailstore_add)
    p.add_argument("name")
    p.add_argument("--host", required=True, help="host name or IP address")
    for proto in PROTOCOLS:
        p.add_argument(f"--{proto}-port", type=int, help="default: [directory.ports]")
    p.add_argument("--tls", choices=TLS_MODES, default="none")
    p.add_argument("--master-user", help="log in to this mailstore as user*MASTER (Dovecot)")
    p.add_argument("--master-password-stdin", action="store_true")
    p.add_argument(
        "--smtp-login",
        choices=SMTP_LOGINS,
        help="hand SMTP sessions over by XCLIENT or AUTH (default: [backend] smtp_mode)",
    )
    p.add_argument("--pool", help="a [[pool]] of the config that chooses the host instead")
    p.add_argument("--oauth-login", choices=OAUTH_LOGINS, help=_OAUTH_LOGIN_HELP)
    leaf(m, "list", "list mailstores", _mailstore_list)
    p = leaf(m, "set-pool", "send a mailstore's logins to a [[pool]]", _mailstore_set_pool)
    p.add_argument("name")
    p.add_argument("pool", nargs="?", help="omit to send them to the mailstore's host again")
    p = leaf(m, "set-oauth-login", "how OAuth logins reach a mailstore", _mailstore_oauth_login)
    p.add_argument("name")
    p.add_argument("mode", choices=(*OAUTH_LOGINS, "default"), help=_OAUTH_LOGIN_HELP)
    for name, run in (("remove", _mailstore_remove), ("enable", _mailstore_enable)):
        leaf(m, name, f"{name} a mailstore", run).add_argument("name")
    leaf(m, "disable", "refuse logins to a mailstore", _mailstore_disable).add_argument("name")

    dm = group("domain", "mail domains and their mailstore")
    p = leaf(dm, "add", "add a domain", _domain_add)
    p.add_argument("name")
    p.add_argument("--mailstore", required=True)
    leaf(dm, "list", "list domains", _domain_list)
    for name, run in (
        ("remove", _domain_remove),
        ("enable", _domain_enable),
        ("disable", _domain_disable),
    ):
        leaf(dm, name, f"{name} a domain", run).add_argument("name")

    u = group("user", "mail users")
    p = leaf(u, "add", "add a user", _user_add)
    p.add_argument("address")
    p.add_argument("--mailstore", help="default: the domain's mailstore")
    _password_options(p)
    p = leaf(u, "passwd", "set a user's password", _user_passwd)
    p.add_argument("address")
    _password_options(p)
    for name, run in (
        ("disable", _user_disable),
        ("enable", _user_enable),
        ("remove", _user_remove),
    ):
        leaf(u, name, f"{name} a user", run).add_argument("address")
    p = u.add_parser(
        "move",
        help="send a user's logins to another mailstore",
        description="MAILSTORE (or --to MAILSTORE) is a directory mailstore, or a member of a"
        " pool with affinity = true ([cluster]: the user's sessions on every node are ended and"
        " their next logins go there; docs/scale-out.md).",
    )
    p.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS)
    p.add_argument("address")
    p.add_argument("mailstore", nargs="?")
    p.add_argument("--to", dest="to", metavar="MAILSTORE", help="the same as MAILSTORE")
    p.set_defaults(func=_user_move_handler(load_settings))
    p = leaf(u, "list", "list users", _user_list)
    p.add_argument("--domain")
    p = leaf(
        u,
        "set-oauth-only",
        "refuse (on) or accept again (off) the user's main password; tokens and app passwords"
        " still log in",
        _user_oauth_only,
    )
    p.add_argument("address")
    p.add_argument("state", choices=("on", "off"))
    _register_app_passwords(u, leaf)

    a = group("auth", "check logins")
    p = leaf(a, "test", "try a login against the directory, as doveadm auth test", _auth_test)
    p.add_argument("user")
    p.add_argument("--protocol", choices=PROTOCOLS, default="imap")
    p.add_argument("--client-ip", default="127.0.0.1")
    p.add_argument("--password-stdin", action="store_true")


_OAUTH_LOGIN_HELP = (
    "master: log OAuth users in as user*MASTER; token: pass the client's token on for the"
    " mailstore to validate (Dovecot's oauth2 passdb); default: master if the mailstore has"
    " a master user, else token"
)


def _register_app_passwords(users: Any, leaf: Callable[..., Any]) -> None:
    ap = users.add_parser(
        "app-password",
        help="extra passwords per user, for mail clients that cannot do OAuth",
        description="App passwords: each has a label, the protocols it may log in to and an"
        " optional expiry; only its hash is stored.",
    ).add_subparsers(dest="app_password_command", required=True, metavar="COMMAND")
    p = leaf(ap, "add", "add an app password (a random one is printed once)", _app_password_add)
    p.add_argument("address")
    p.add_argument("--label", required=True, help="a name for it, shown in the session log")
    p.add_argument("--protocols", required=True, help="comma-separated: imap,pop3,smtp")
    p.add_argument("--expires", metavar="DATE", help="YYYY-MM-DD (through that day, UTC)")
    p.add_argument(
        "--password-stdin", action="store_true", help="take it from stdin instead of making one"
    )
    p.add_argument("--scheme", default=admin.DEFAULT_SCHEME, help="e.g. ARGON2ID")
    leaf(ap, "list", "list a user's app passwords", _app_password_list).add_argument("address")
    p = leaf(ap, "revoke", "remove an app password", _app_password_revoke)
    p.add_argument("address")
    p.add_argument("label")


def _password_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--password-stdin", action="store_true", help="read it from stdin's 1st line")
    p.add_argument("--scheme", default=admin.DEFAULT_SCHEME, help="e.g. ARGON2ID, PLAIN")


# --- running a command ------------------------------------------------------------------------


def _handler(run: Command, load_settings: LoadSettings, *, publish: bool = True) -> Handler:
    def handle(args: argparse.Namespace) -> int:
        try:
            settings = _directory_settings(args, load_settings)
            code = asyncio.run(run(args, settings))
            if code == EXIT_OK and publish:
                _published(args, load_settings)
            return code
        except UsageError as e:
            return _fail(str(e), EXIT_USAGE)
        except ConfigError as e:
            return _fail(f"configuration error: {e}", EXIT_USAGE)
        except (admin.AdminError, SchemaError) as e:
            return _fail(str(e), EXIT_FAILED)
        except (EOFError, KeyboardInterrupt):
            return _fail("interrupted", EXIT_FAILED)
        except Exception as e:  # a database error: say which, without bound values
            return _fail(f"database error: {_describe(e)}", EXIT_FAILED)

    return handle


def _published(args: argparse.Namespace, load_settings: LoadSettings) -> None:
    """[cluster]: a change is published, for every node's route cache to forget it now."""
    settings = load_settings(args.config)
    scope = clusteradmin.changed_scope(args)
    if not settings.cluster.redis_url or scope is None:
        return
    problem = clusteradmin.publish_change(settings, scope)
    if problem is not None:
        print(f"mailgate: {problem}", file=sys.stderr)


def _user_move_handler(load_settings: LoadSettings) -> Handler:
    """A member of an affinity pool is a move in the cluster (Redis: no directory needed);
    anything else is the directory's mailstore for the user."""
    directory_move = _handler(_user_move, load_settings)
    check_move = _handler(_user_move_check, load_settings, publish=False)
    cluster_move = _handler(_user_move, load_settings, publish=False)  # run_directory_move does

    def handle(args: argparse.Namespace) -> int:
        target = args.to or args.mailstore
        if not target or (args.to and args.mailstore and args.to != args.mailstore):
            return _fail("user move needs one MAILSTORE (or --to MAILSTORE)", EXIT_USAGE)
        args.mailstore = target
        try:
            settings = load_settings(getattr(args, "config", None) or "")
        except ConfigError as e:
            return _fail(f"configuration error: {e}", EXIT_USAGE)
        if settings.cluster.redis_url and not isinstance(
            clusteradmin.find_member(settings, target), str
        ):
            return clusteradmin.run_move(settings, args.address, target)
        if settings.cluster.redis_url:  # sessions end everywhere, caches forget at once
            checked = check_move(args)  # a typo must not end anybody's sessions
            if checked != EXIT_OK:
                return checked
            return clusteradmin.run_directory_move(
                settings, args.address, lambda: cluster_move(args)
            )
        return directory_move(args)

    return handle


def _directory_settings(args: argparse.Namespace, load_settings: LoadSettings) -> DirectorySettings:
    path = getattr(args, "config", None)
    if not path:
        raise UsageError("-c FILE is required: the configuration with the [directory] section")
    directory = load_settings(path).directory
    if directory is None:
        raise ConfigError(f"{path}: no [directory] section; these commands need one")
    return directory


async def _admin(settings: DirectorySettings, op: Callable[..., Awaitable[Any]]) -> Any:
    """Run one admin operation on a fresh engine (one connection is enough)."""
    if settings.queries is not None:
        raise admin.AdminError(
            "[directory] uses its own queries: mailgate manages only its own schema; "
            "change users in your database"
        )
    engine = make_engine(settings.url, 1)
    try:
        return await op(engine)
    finally:
        await dispose(engine)


def _fail(message: str, code: int) -> int:
    print(f"mailgate: {message}", file=sys.stderr)
    return code


def _describe(e: BaseException) -> str:
    orig = getattr(e, "orig", None)
    return f"{type(orig).__name__}: {orig}" if orig is not None else f"{type(e).__name__}: {e}"


def _read_secret(from_stdin: bool, prompt: str, *, confirm: bool, flag: str) -> Secret:
    if from_stdin:
        line = sys.stdin.readline(MAX_STDIN_LINE + 1)
        if len(line) > MAX_STDIN_LINE:
            raise UsageError("the password line on stdin is too long")
        return Secret(line.removesuffix("\n").removesuffix("\r"))
    if not sys.stdin.isatty():
        raise UsageError(f"no terminal to ask for the password: use {flag}")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != first:
        raise admin.AdminError("the passwords do not match")
    return Secret(first)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(headers)] + [["-" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


# --- directory --------------------------------------------------------------------------------


async def _directory_init(args: argparse.Namespace, s: DirectorySettings) -> int:
    version = await _admin(s, admin.init_schema)
    print(f"directory schema version {version} created")
    return EXIT_OK


async def _directory_upgrade(args: argparse.Namespace, s: DirectorySettings) -> int:
    before, after = await _admin(s, admin.upgrade_schema)
    print(f"directory schema at version {after}" + (f" (was {before})" if before != after else ""))
    return EXIT_OK


def _directory_flush(args: argparse.Namespace, load_settings: LoadSettings) -> int:
    """SIGUSR1 to the pid in `pid_file`, once it is known to be mailgate's: a stale file after
    a crash may name a process that took the pid over, and SIGUSR1 would kill it."""
    path = getattr(args, "config", None)
    if not path:
        return _fail("-c FILE is required: the configuration of the running server", EXIT_USAGE)
    try:
        settings = load_settings(path)
    except ConfigError as e:
        return _fail(f"configuration error: {e}", EXIT_USAGE)
    if settings.directory is None:
        return _fail(
            f"{path}: no [directory] section: there is no route cache to flush", EXIT_USAGE
        )
    if settings.pid_file is None:
        return _fail(
            f"{path}: pid_file is not set; set it (mailgate serve writes it) to use flush",
            EXIT_USAGE,
        )
    try:
        pid = _read_pid(settings.pid_file)
        _check_is_mailgate(pid)
        os.kill(pid, FLUSH_SIGNAL)
    except FileNotFoundError:
        return _fail(f"{settings.pid_file}: no such file: is mailgate serve running?", EXIT_FAILED)
    except ProcessLookupError:
        return _fail(
            f"process {pid} named in {settings.pid_file} is gone: mailgate serve is not running "
            "(a stale pid file)",
            EXIT_FAILED,
        )
    except PermissionError:
        return _fail(
            f"not allowed to signal process {pid}: run flush as the user mailgate runs as",
            EXIT_FAILED,
        )
    except (OSError, ValueError) as e:
        return _fail(str(e), EXIT_FAILED)
    print(f"route cache flush sent to mailgate (pid {pid})")
    return EXIT_OK


def _read_pid(pid_file: Path) -> int:
    try:
        with pid_file.open("rb") as f:
            text = f.read(MAX_PID_FILE + 1).decode("ascii", "replace").strip()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise OSError(f"{pid_file}: cannot read: {e.strerror}") from None
    if not text.isdigit() or len(text) > MAX_PID_FILE or int(text) <= 1:
        raise ValueError(f"{pid_file}: does not hold a process id")
    return int(text)


def _check_is_mailgate(pid: int) -> None:
    """Raise ProcessLookupError if `pid` is gone, ValueError if it runs something else.

    Where there is no /proc (not Linux), only the signal itself can tell that the pid is gone.
    """
    if not Path("/proc/self/cmdline").exists():
        return
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError:
        return  # e.g. hidepid: let the signal decide
    names = {Path(os.fsdecode(a)).name for a in argv}
    if "serve" not in names or not names & {"mailgate", "mailgate.__main__"}:
        raise ValueError(
            f"process {pid} is not `mailgate serve` (a stale pid file?); not signalled"
        )


# --- mailstores -------------------------------------------------------------------------------


async def _mailstore_add(args: argparse.Namespace, s: DirectorySettings) -> int:
    master = None
    if args.master_user is not None:
        flag = "--master-password-stdin"
        master = _read_secret(
            args.master_password_stdin, "Master password: ", confirm=True, flag=flag
        )
    elif args.master_password_stdin:
        raise UsageError("--master-password-stdin needs --master-user")
    await _admin(
        s,
        lambda e: admin.add_mailstore(
            e,
            args.name,
            args.host,
            imap_port=args.imap_port,
            pop3_port=args.pop3_port,
            smtp_port=args.smtp_port,
            tls=args.tls,
            master_user=args.master_user,
            master_password=master,
            smtp_login=args.smtp_login,
            pool=args.pool,
            oauth_login=args.oauth_login,
        ),
    )
    print(f"mailstore {args.name} added")
    return EXIT_OK


async def _mailstore_list(args: argparse.Namespace, s: DirectorySettings) -> int:
    found = await _admin(s, admin.list_mailstores)
    _table(
        (
            "NAME",
            "HOST",
            "IMAP",
            "POP3",
            "SMTP",
            "TLS",
            "MASTER",
            "ACTIVE",
            "DOMAINS",
            "MOVED",
            "SMTP-LOGIN",
            "POOL",
            "OAUTH-LOGIN",
        ),
        [
            (
                m.name,
                m.host,
                m.imap_port,
                m.pop3_port,
                m.smtp_port,
                m.tls,
                m.master_user,
                _yes(m.active),
                m.domains,
                m.users,
                m.smtp_login,
                m.pool,
                m.oauth_login,
            )
            for m in found
        ],
    )
    return EXIT_OK


async def _mailstore_set_pool(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_mailstore_pool(e, args.name, args.pool))
    where = f"pool {args.pool}" if args.pool else "its host"
    print(f"mailstore {args.name}: logins go to {where}")
    return EXIT_OK


async def _mailstore_oauth_login(args: argparse.Namespace, s: DirectorySettings) -> int:
    mode = None if args.mode == "default" else args.mode
    await _admin(s, lambda e: admin.set_mailstore_oauth_login(e, args.name, mode))
    print(f"mailstore {args.name}: oauth login {args.mode}")
    return EXIT_OK


async def _mailstore_remove(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.remove_mailstore(e, args.name))
    print(f"mailstore {args.name} removed")
    return EXIT_OK


async def _mailstore_enable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_mailstore_active(e, args.name, True))
    print(f"mailstore {args.name} enabled")
    return EXIT_OK


async def _mailstore_disable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_mailstore_active(e, args.name, False))
    print(f"mailstore {args.name} disabled")
    return EXIT_OK


# --- domains ----------------------------------------------------------------------------------


async def _domain_add(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.add_domain(e, args.name, args.mailstore))
    print(f"domain {args.name.lower()} added on {args.mailstore}")
    return EXIT_OK


async def _domain_list(args: argparse.Namespace, s: DirectorySettings) -> int:
    found = await _admin(s, admin.list_domains)
    _table(
        ("DOMAIN", "MAILSTORE", "ACTIVE", "USERS"),
        [(d.name, d.mailstore, _yes(d.active), d.users) for d in found],
    )
    return EXIT_OK


async def _domain_remove(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.remove_domain(e, args.name))
    print(f"domain {args.name.lower()} removed")
    return EXIT_OK


async def _domain_enable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_domain_active(e, args.name, True))
    print(f"domain {args.name.lower()} enabled")
    return EXIT_OK


async def _domain_disable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_domain_active(e, args.name, False))
    print(f"domain {args.name.lower()} disabled")
    return EXIT_OK


# --- users ------------------------------------------------------------------------------------


async def _user_add(args: argparse.Namespace, s: DirectorySettings) -> int:
    password = _read_secret(
        args.password_stdin, "Password: ", confirm=True, flag="--password-stdin"
    )
    await _admin(
        s,
        lambda e: admin.add_user(
            e, args.address, password, mailstore=args.mailstore, scheme=args.scheme
        ),
    )
    print(f"user {args.address.lower()} added")
    return EXIT_OK


async def _user_passwd(args: argparse.Namespace, s: DirectorySettings) -> int:
    password = _read_secret(
        args.password_stdin, "New password: ", confirm=True, flag="--password-stdin"
    )
    await _admin(s, lambda e: admin.set_password(e, args.address, password, scheme=args.scheme))
    print(f"password of {args.address.lower()} changed")
    return EXIT_OK


async def _user_enable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_user_active(e, args.address, True))
    print(f"user {args.address.lower()} enabled")
    return EXIT_OK


async def _user_disable(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.set_user_active(e, args.address, False))
    print(f"user {args.address.lower()} disabled")
    return EXIT_OK


async def _user_move(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.move_user(e, args.address, args.mailstore))
    print(f"user {args.address.lower()} now logs in on {args.mailstore}")
    return EXIT_OK


async def _user_move_check(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.check_move(e, args.address, args.mailstore))
    return EXIT_OK


async def _user_remove(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.remove_user(e, args.address))
    print(f"user {args.address.lower()} removed")
    return EXIT_OK


async def _user_list(args: argparse.Namespace, s: DirectorySettings) -> int:
    found = await _admin(s, lambda e: admin.list_users(e, args.domain))
    _table(
        ("ADDRESS", "MAILSTORE", "MOVED", "ACTIVE", "SCHEME", "OAUTH-ONLY"),
        [
            (u.address, u.mailstore, _yes(u.moved), _yes(u.active), u.scheme, _yes(u.oauth_only))
            for u in found
        ],
    )
    return EXIT_OK


async def _user_oauth_only(args: argparse.Namespace, s: DirectorySettings) -> int:
    on = args.state == "on"
    await _admin(s, lambda e: admin.set_oauth_only(e, args.address, on))
    state = "refused: OAuth and app passwords only" if on else "accepted again"
    print(f"main password of {args.address.lower()} {state}")
    return EXIT_OK


# --- app passwords ----------------------------------------------------------------------------


def _expiry(text: str | None) -> dt.datetime | None:
    """--expires YYYY-MM-DD: usable through that day, i.e. until 00:00 UTC the day after."""
    if text is None:
        return None
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--expires {text[:40]!r}: expected a date, YYYY-MM-DD") from None
    return dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.UTC)


def _when(value: dt.datetime | None) -> str | None:
    return None if value is None else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M")


async def _app_password_add(args: argparse.Namespace, s: DirectorySettings) -> int:
    expires = _expiry(args.expires)
    given = None
    if args.password_stdin:
        given = _read_secret(True, "", confirm=False, flag="--password-stdin")
    protocols = args.protocols.split(",")
    password = await _admin(
        s,
        lambda e: admin.add_app_password(
            e,
            args.address,
            args.label,
            protocols,
            password=given,
            expires_at=expires,
            scheme=args.scheme,
        ),
    )
    until = f", until {_when(expires)} UTC" if expires else ""
    print(f"app password {args.label} added for {args.address.lower()}{until}")
    if given is None:  # made here: this is the only time anyone sees it
        print(f"password: {password.reveal()}")
        print("(shown once; only its hash is stored)")
    return EXIT_OK


async def _app_password_list(args: argparse.Namespace, s: DirectorySettings) -> int:
    found = await _admin(s, lambda e: admin.list_app_passwords(e, args.address))
    _table(
        ("LABEL", "PROTOCOLS", "EXPIRES", "CREATED", "LAST-USED"),
        [
            (
                a.label,
                ",".join(a.protocols),
                (_when(a.expires_at) or "never") + (" (expired)" if a.expired else ""),
                _when(a.created_at),
                _when(a.last_used_at) or "never",
            )
            for a in found
        ],
    )
    return EXIT_OK


async def _app_password_revoke(args: argparse.Namespace, s: DirectorySettings) -> int:
    await _admin(s, lambda e: admin.revoke_app_password(e, args.address, args.label))
    print(f"app password {args.label} of {args.address.lower()} revoked")
    return EXIT_OK


# --- auth test --------------------------------------------------------------------------------


async def _auth_test(args: argparse.Namespace, s: DirectorySettings) -> int:
    """Print the decision as `doveadm auth test` does: passdb result, then the details."""
    password = _read_secret(
        args.password_stdin, "Password: ", confirm=False, flag="--password-stdin"
    )
    directory = SqlDirectory(s)
    try:
        creds = Credentials(Method.PLAIN, args.user, password)
        verdict = await directory.explain(creds, ClientInfo(args.client_ip, 0, args.protocol))
    finally:
        await directory.close()
    decision = verdict.decision
    if isinstance(decision, Route):
        print(f"passdb: {verdict.user} auth succeeded")
        tls = decision.tls.value if decision.tls else "[backend] tls"
        print(f"  backend: {decision.host}:{decision.port} ({args.protocol}, tls {tls})")
        print(f"  mailstore: {decision.mailstore or '-'}")
        print(f"  login user: {decision.user}")
        if decision.credential_label is not None:
            print(f"  app password: {decision.credential_label}")
        return EXIT_OK
    outcome = "failed" if isinstance(decision, Reject) else "failed temporarily"
    print(f"passdb: {verdict.user} auth {outcome}")
    print(f"  why: {verdict.reason}")
    return EXIT_FAILED
