"""Start and stop a real Postfix (and a Dovecot it delivers to over LMTP) for SMTP tests.

Postfix runs from a temp dir of its own: its main.cf and master.cf are generated there, it
listens on 127.0.0.1 only, trusts XCLIENT from 127.0.0.0/8, accepts mail for the virtual
domains it is given, and hands every message over LMTP to a Dovecot. Nothing leaves the
machine: any other destination bounces. Its master runs in the foreground and is stopped by
PID like every peer in peers.py. Importable, and a CLI:

    python scripts/postfix.py mailstore --dir D --imap-port 10143 --lmtp-port 10024 \\
        --auth-port 10025 --users alice@example.com:secret
    python scripts/postfix.py postfix --dir D --smtp-port 10587 --lmtp-port 10024 \\
        --sasl-port 10025 --users alice@example.com
    python scripts/postfix.py stop --dir D --name postfix
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

POSTFIX_DAEMONS = Path("/usr/lib/postfix/sbin")  # Debian's daemon_directory
POSTFIX_USER = "postfix"  # Debian's mail_owner
POSTFIX_GROUP = "postdrop"  # Debian's setgid_group
# Postfix's log daemon writes asynchronously; a line shows up within milliseconds.
LOG_WAIT = 10.0

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/spool
data_directory = {base}/data
mail_owner = {user}
setgid_group = {group}
maillog_file = {log}
maillog_file_prefixes = {base}
myhostname = {hostname}
mydomain = {domain}
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# No DNS: no reverse lookups of clients, no MX lookups (nothing is sent off this machine).
smtpd_peername_lookup = no
smtp_dns_support_level = disabled
lmtp_dns_support_level = disabled
# The proxy in front of us may tell us who its client is.
smtpd_authorized_xclient_hosts = 127.0.0.0/8
smtpd_client_port_logging = yes
smtpd_sasl_auth_enable = {sasl}
smtpd_sasl_type = dovecot
smtpd_sasl_path = inet:127.0.0.1:{sasl_port}
smtpd_sasl_authenticated_header = yes
smtpd_relay_restrictions = permit_sasl_authenticated reject_unauth_destination
virtual_mailbox_domains = {domains}
virtual_mailbox_maps = texthash:{etc}/mailboxes
virtual_transport = lmtp:inet:127.0.0.1:{lmtp_port}
default_transport = error:5.7.1 tests deliver nowhere else
relay_transport = error:5.7.1 tests deliver nowhere else
alias_maps =
alias_database =
local_recipient_maps =
biff = no
# Tests look for a delivery within seconds, never after a retry.
queue_run_delay = 1s
minimal_backoff_time = 1s
maximal_backoff_time = 2s
"""

# Only the services this setup uses, none in a chroot (the temp dir has no copy of /etc).
MASTER_CF = """\
127.0.0.1:{smtp_port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
lmtp      unix  - - n - - lmtp
smtp      unix  - - n - - smtp
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

# Added to peers.DOVECOT_CONF: LMTP for Postfix's deliveries, and the auth service on TCP for
# Postfix's SASL (smtpd_sasl_type = dovecot).
DOVECOT_EXTRA = """\
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {lmtp_port}
  }}
}}
service auth {{
  inet_listener {{
    address = 127.0.0.1
    port = {auth_port}
  }}
}}
"""


def start_mailstore(
    *,
    imap_port: int,
    lmtp_port: int,
    auth_port: int,
    users: dict[str, str],
    name: str = "mailstore",
    pop3_port: int | None = None,
) -> peers.Peer:
    """A Dovecot like peers.start_dovecot (IMAP, POP3 with `pop3_port`, same users and
    maildirs, the master user) that also takes mail over LMTP on `lmtp_port` and answers
    Postfix's SASL queries on `auth_port`.

    LMTP does not chroot (it serves many users at once), so the `mail` user must reach the
    maildirs by their full path: like Postfix, this Dovecot lives in a fresh temp dir
    (peer.workdir) which stop() removes.
    """
    if peers.dovecot_version() >= (2, 4):
        raise peers.PeerError("Dovecot 2.4 changed the config syntax; only 2.3 is supported here")
    root = Path(tempfile.mkdtemp(prefix=f"mailgate-{name}-")).resolve()
    root.chmod(0o755)  # the mail user must pass through; the password files are 0600
    cleanup = [root]
    mail = peers._write_users(root, users, (peers.MASTER_USER, peers.MASTER_PASSWORD))
    for secret in ("users", "masters"):
        (root / secret).chmod(0o600)
    ports = {"imap": imap_port, "lmtp": lmtp_port, "auth": auth_port}
    served = {"imap": imap_port, **({"pop3": pop3_port} if pop3_port else {})}
    ports |= served
    conf, log = root / "dovecot.conf", root / "dovecot.log"
    conf.write_text(
        peers.DOVECOT_CONF.format(
            name=name,
            root=root,
            run=peers._socket_dir(root / "run", cleanup),
            mail=mail,
            mail_user=peers.MAIL_USER,
            trusted="127.0.0.0/8",
            listen="127.0.0.1",
            tls="ssl = no",
            protocols="imap lmtp" + " pop3" * bool(pop3_port),
            listeners=peers._dovecot_listeners(served)
            + DOVECOT_EXTRA.format(lmtp_port=lmtp_port, auth_port=auth_port),
            oauth2_mechanisms="",
            oauth2_passdb="",
        )
    )
    peer = peers._launch(name, ["dovecot", "-F", "-c", str(conf)], root, log)
    peer.ports, peer.config_path, peer.cleanup = ports, conf, cleanup
    return peers._wait_ready(
        peer, lambda: peers._greets(imap_port, b"* OK") and peers._ports_ready(peer)()
    )


def start_postfix(
    *,
    smtp_port: int,
    lmtp_port: int,
    users: Iterable[str],
    sasl_port: int | None = None,
    hostname: str = "mx.postfix.test",
    name: str = "postfix",
) -> peers.Peer:
    """Postfix on 127.0.0.1:smtp_port delivering the virtual mailboxes `users` (their domains
    are its virtual domains) over LMTP to 127.0.0.1:lmtp_port. With `sasl_port`, AUTH is
    offered and checked by Dovecot's auth service there.

    Its daemons drop to the postfix user, who cannot enter a root-only test dir, so Postfix
    lives in a fresh temp dir (peer.workdir) which stop() removes; read its log before that.
    """
    if not peers.which("postfix"):
        raise peers.PeerError("postfix not installed (apt package postfix)")
    users = sorted(set(users))
    domains = sorted({user.partition("@")[2] for user in users})
    base = Path(tempfile.mkdtemp(prefix=f"mailgate-{name}-")).resolve()
    base.chmod(0o755)  # the postfix user must enter it; nothing secret inside
    # The config dir apart from the spool: `postfix check` wants every file in it root's.
    etc, log = base / "etc", base / "postfix.log"
    for sub in (etc, base / "spool", base / "data"):
        sub.mkdir()
    shutil.chown(base / "data", POSTFIX_USER, POSTFIX_USER)
    (etc / "main.cf").write_text(
        MAIN_CF.format(
            base=base,
            user=POSTFIX_USER,
            group=POSTFIX_GROUP,
            log=log,
            hostname=hostname,
            domain=hostname.partition(".")[2],
            sasl="yes" if sasl_port else "no",
            sasl_port=sasl_port or 0,
            domains=" ".join(domains),
            lmtp_port=lmtp_port,
            etc=etc,
        )
    )
    (etc / "master.cf").write_text(MASTER_CF.format(smtp_port=smtp_port))
    (etc / "mailboxes").write_text("".join(f"{user} ok\n" for user in users))
    # `postfix check` creates the queue directories with their owners and modes.
    peers._run(["postfix", "-c", str(etc), "check"])
    # `master -s` stays in the foreground, so the Peer's PID is the master's own.
    argv = [str(POSTFIX_DAEMONS / "master"), "-c", str(etc), "-s"]
    peer = peers._launch(name, argv, base, base / "master.out")
    peer.ports, peer.config_path, peer.cleanup = {"smtp": smtp_port}, etc / "main.cf", [base]
    peer.log_path = log
    peer.info = {"hostname": hostname}
    return peers._wait_ready(peer, lambda: peers._greets(smtp_port, b"220 "))


def wait_for_log(peer: peers.Peer, needle: str, timeout: float = LOG_WAIT) -> list[str]:
    """Every line of the peer's log that contains `needle`, once there is one."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = [line for line in peer.log_path.read_text().splitlines() if needle in line]
        except FileNotFoundError:
            found = []
        if found or time.monotonic() > deadline:
            return found
        time.sleep(peers.POLL_INTERVAL)


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="start/stop Postfix and its LMTP mail store")
    p.add_argument("kind", choices=["mailstore", "postfix", "stop"])
    p.add_argument("--dir", type=Path, required=True, help="where the peer records go")
    p.add_argument("--name", help="peer name (default: the kind)")
    for option in ("imap-port", "lmtp-port", "auth-port", "smtp-port", "sasl-port"):
        p.add_argument(f"--{option}", type=int)
    p.add_argument("--users", nargs="*", default=[], help="user:password ... (postfix: user)")
    args = p.parse_args(argv)
    name = args.name or args.kind
    args.dir.mkdir(parents=True, exist_ok=True)
    record = args.dir / f"{name}.peer.json"
    if args.kind == "stop":
        peers.Peer.from_json(record.read_text()).stop()
        record.unlink()
        return 0
    users = dict(pair.partition(":")[::2] for pair in args.users)
    if args.kind == "mailstore":
        peer = start_mailstore(
            imap_port=args.imap_port, lmtp_port=args.lmtp_port, auth_port=args.auth_port,
            users=users, name=name,
        )  # fmt: skip
    else:
        peer = start_postfix(
            smtp_port=args.smtp_port, lmtp_port=args.lmtp_port, users=users,
            sasl_port=args.sasl_port, name=name,
        )  # fmt: skip
    record.write_text(peer.to_json())
    print(peer.to_json(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
