"""`mailgate import-nginx`: turn an nginx `mail {}` block into a mailgate configuration.

Pure: it takes the parsed directives (nginx_conf.load) and returns the TOML table and the
notes, one per directive it could not map exactly, as `file:line: directive: why`.

How nginx's shape becomes mailgate's:

- Directives at `mail {}` level are inherited by every `server {}` that does not set them,
  as nginx merges them. Each server becomes one `[[listener]]` per `listen`.
- nginx sets most things per server; mailgate per protocol ([imap], [pop3], [smtp]) or once
  ([tls], [auth_http], [backend], hostname). A `mail {}`-level `timeout`, `proxy_timeout` or
  `max_errors` becomes the top-level default; a protocol whose servers say otherwise gets its
  own value. Where servers of one protocol disagree on something mailgate holds once, the
  first server's value is used and the others are reported. Login methods may differ per
  listener, and do.
- Only what the file says is mapped: where it says nothing, mailgate's defaults apply, which
  are deliberately not nginx's (auth_http timeout 5 s rather than 60 s, for instance).
- Relative paths are resolved against the main file's directory (nginx's configuration
  prefix), and written out absolute, since the TOML may be saved anywhere.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from mailgate.nginx_conf import Directive, load

PROTOCOLS = ("imap", "pop3", "smtp")
# nginx's ngx_mail_*_module default ports: a server with no `protocol` gets it from these.
DEFAULT_PORTS = {143: "imap", 993: "imap", 110: "pop3", 995: "pop3", 25: "smtp", 465: "smtp"}
DEFAULT_PORTS[587] = "smtp"

# nginx method name -> mailgate's. Some stand for several: nginx's POP3 `plain` is USER/PASS,
# AUTH PLAIN and AUTH LOGIN (ngx_mail_pop3_merge_srv_conf adds LOGIN to PLAIN).
AUTH_NAMES: dict[str, dict[str, tuple[str, ...]]] = {
    "imap": {"login": ("login",), "plain": ("plain",), "cram-md5": ("cram-md5",)},
    "pop3": {"plain": ("user", "plain", "login"), "apop": ("apop",), "cram-md5": ("cram-md5",)},
    "smtp": {
        "login": ("login",),
        "plain": ("plain",),
        "cram-md5": ("cram-md5",),
        "none": ("none",),
    },
}
# What nginx accepts whatever `*_auth` lists: the protocols' base login commands, which
# clients use without looking at capabilities (IMAP LOGIN, POP3 USER/PASS).
ALWAYS_ACCEPTED = {"imap": ("login", "the LOGIN command"), "pop3": ("user", "USER/PASS")}

_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SECONDS |= {"M": 2592000, "y": 31536000}
_TIME = re.compile(r"(\d+)(ms|s|m|h|d|w|M|y)?")
_LOG_LEVELS = {"debug": "debug", "info": "info", "notice": "info", "warn": "warning"}
_LOG_LEVELS |= {"error": "error", "crit": "error", "alert": "error", "emerg": "error"}

# Directives mailgate has no counterpart for, with the reason an operator needs.
UNSUPPORTED = {
    "imap_client_buffer": "not configurable: mailgate reads command lines of up to 8192 bytes "
    "before login",
    "pop3_client_buffer": "not configurable: mailgate reads command lines of up to 8192 bytes "
    "before login",
    "smtp_client_buffer": "not configurable: mailgate reads SMTP command lines of up to 1024 "
    "bytes before login",
    "proxy_buffer": "not configurable: the relay buffers up to 256 KiB each way",
    "imap_auth_salt": "not supported",
    "ssl_session_cache": "not configurable: OpenSSL's session defaults apply",
    "ssl_session_timeout": "not configurable: OpenSSL's session defaults apply",
    "ssl_session_tickets": "not configurable: OpenSSL's session defaults apply",
    "ssl_session_ticket_key": "not configurable: OpenSSL's session defaults apply",
    "ssl_dhparam": "not supported: key exchange is ECDHE (and TLS 1.3) only",
    "ssl_ecdh_curve": "not configurable: OpenSSL's default curves apply",
    "ssl_password_file": "not supported: the private key must not be encrypted",
    "ssl_verify_depth": "not configurable: OpenSSL's default depth applies",
    "ssl_crl": "not supported: client certificates are not checked against a CRL",
    "ssl_conf_command": "not supported",
    "ssl_certificate_compression": "not supported",
    "resolver_timeout": "not needed: mailgate resolves names with the system resolver",
}
# Directives read below (some only for some values).
MAPPED = frozenset(
    {
        "listen", "protocol", "starttls", "ssl", "server_name", "timeout", "proxy_timeout",
        "max_errors", "error_log", "resolver", "proxy", "proxy_pass_error_message",
        "proxy_protocol", "xclient", "proxy_smtp_auth", "set_real_ip_from",
        "ssl_certificate", "ssl_certificate_key", "ssl_protocols", "ssl_ciphers",
        "ssl_prefer_server_ciphers", "ssl_verify_client", "ssl_client_certificate",
        "ssl_trusted_certificate", "auth_http", "auth_http_header", "auth_http_timeout",
        "auth_http_pass_client_cert", "imap_auth", "pop3_auth", "smtp_auth",
        "imap_capabilities", "pop3_capabilities", "smtp_capabilities", "smtp_greeting_delay",
    }
)  # fmt: skip
SERVER_ONLY = frozenset({"listen", "protocol"})
# Top-level blocks that are none of mail's business: their includes are not even opened.
IGNORED_BLOCKS = ("http", "stream")


class NginxImportError(Exception):
    """Nothing to convert: no `mail {}` block."""


@dataclass(frozen=True, slots=True)
class Conversion:
    config: dict[str, Any]
    notes: tuple[str, ...]  # "file:line: directive: why", in file order

    def toml(self) -> str:
        return tomli_w.dumps(self.config)


def import_file(path: str | Path) -> Conversion:
    """Read `path` (following includes) and convert its `mail {}` block."""
    path = Path(path)
    return convert(load(path, skip=IGNORED_BLOCKS), base_dir=path.parent.absolute())


def convert(main: tuple[Directive, ...], *, base_dir: Path) -> Conversion:
    return _Converter(main, base_dir).run()


class _Scope:
    """The simple directives of one level (main, mail or server), and the level it inherits."""

    def __init__(self, body: Iterable[Directive], parent: _Scope | None = None) -> None:
        self.parent = parent
        self.by_name: dict[str, list[Directive]] = {}
        for d in body:
            if d.block is None:
                self.by_name.setdefault(d.name, []).append(d)

    def every(self, name: str) -> list[Directive]:
        """Every occurrence at the nearest level that has one (nginx replaces arrays)."""
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.by_name:
                return scope.by_name[name]
            scope = scope.parent
        return []

    def first(self, name: str) -> Directive | None:
        found = self.every(name)
        return found[0] if found else None


@dataclass(slots=True)
class _Bound:
    """One `listen`: where, and the [[listener]] it becomes."""

    directive: Directive
    host: str  # "0.0.0.0" (nginx's "*"), "::", "*" (both, once merged), or an address
    port: int
    settings: dict[str, Any]
    server: _Server | None = None

    def covers(self, other: _Bound) -> bool:
        """Binding self leaves no room for other on the same port (Linux)."""
        if self.port != other.port or other.host in ("0.0.0.0", "::", "*"):
            return False
        if self.host in ("*", "::"):
            return True  # mailgate's IPv6 wildcard is dual-stack
        return self.host == "0.0.0.0" and _is_ipv4(other.host)


@dataclass(slots=True)
class _Server:
    block: Directive
    scope: _Scope
    protocol: str
    listeners: list[dict[str, Any]]
    tls: bool  # some listener uses TLS (implicit or STARTTLS)


class _Converter:
    def __init__(self, main: tuple[Directive, ...], base_dir: Path) -> None:
        self.main = main
        self.base_dir = base_dir
        self.order: dict[int, int] = {}  # id(directive) -> position in the expanded files
        self.notes: dict[tuple[int, str], tuple[int, int, str]] = {}
        self.used: set[int] = set()  # directives whose value went into the output

    # --- notes --------------------------------------------------------------------------

    def note(self, d: Directive, why: str) -> None:
        key = (id(d), why)
        if key not in self.notes:
            self.notes[key] = (
                self.order.get(id(d), 0),
                len(self.notes),
                f"{d.where}: {d.name}: {why}",
            )

    def sorted_notes(self) -> tuple[str, ...]:
        return tuple(text for _, _, text in sorted(self.notes.values()))

    # --- the whole ----------------------------------------------------------------------

    def run(self) -> Conversion:
        self._number(self.main)
        mails = [d for d in self.main if d.name == "mail" and d.block is not None]
        if not mails:
            raise NginxImportError("no mail {} block")
        for extra in mails[1:]:
            self.note(extra, "a second mail {} block (nginx refuses it): ignored")
        mail = mails[0]
        assert mail.block is not None
        main_scope = _Scope(self.main)
        mail_scope = _Scope(mail.block, main_scope)
        self._survey(mail.block, inside_server=False)
        servers = self._servers(mail.block, mail_scope)
        out: dict[str, Any] = {}
        out |= self._process(main_scope)
        out |= self._top(mail_scope, servers)
        if servers:
            out["listener"] = [lst for s in servers for lst in s.listeners]
        for protocol in PROTOCOLS:
            section = self._protocol(protocol, mail_scope, servers)
            if section:
                out[protocol] = section
        for name, section in (
            ("tls", self._tls(mail_scope, servers)),
            ("auth_http", self._auth_http(mail, mail_scope, servers)),
            ("backend", self._backend(mail_scope, servers)),
        ):
            if section:
                out[name] = section
        self._leftovers(mail.block)
        return Conversion(out, self.sorted_notes())

    def _number(self, body: Iterable[Directive]) -> None:
        for d in body:
            self.order[id(d)] = len(self.order)
            if d.block is not None:
                self._number(d.block)

    def _survey(self, body: Iterable[Directive], *, inside_server: bool) -> None:
        """Report what no mapping below reads: unknown and unsupported directives."""
        for d in body:
            if d.block is not None:
                if d.name == "server" and not inside_server:
                    self._survey(d.block, inside_server=True)
                else:
                    self.note(d, "unexpected block: ignored")
            elif d.name in UNSUPPORTED:
                self.note(d, UNSUPPORTED[d.name])
            elif d.name in SERVER_ONLY and not inside_server:
                self.note(d, "only valid inside server {}: ignored")
            elif d.name not in MAPPED:
                self.note(d, "unknown to mailgate: ignored")

    def _leftovers(self, body: Iterable[Directive]) -> None:
        for d in body:
            if d.block is not None:
                self._leftovers(d.block)
            elif d.name == "set_real_ip_from" and id(d) not in self.used:
                self.note(d, "ignored: it applies only to listen ... proxy_protocol")

    # --- main context and top level ------------------------------------------------------

    def _process(self, main: _Scope) -> dict[str, Any]:
        out: dict[str, Any] = {}
        workers = main.first("worker_processes")
        if workers is not None:
            value = _one_arg(workers)
            if value == "auto" or (value.isdigit() and 1 <= int(value) <= 256):
                out["workers"] = value if value == "auto" else int(value)
            else:
                self.note(workers, f"{value!r} is not 1-256 or auto: ignored")
        for events in (d for d in self.main if d.name == "events" and d.block is not None):
            assert events.block is not None
            conns = _Scope(events.block).first("worker_connections")
            if conns is not None and _one_arg(conns).isdigit():
                # nginx counts the client's and the backend's connection; mailgate sessions.
                out["max_sessions"] = max(int(_one_arg(conns)) // 2, 1)
        return out

    def _top(self, mail: _Scope, servers: list[_Server]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        scopes = [s.scope for s in servers] or [mail]
        hostname = self._one_value(scopes, "server_name", _one_arg, "hostname", servers)
        if hostname is not None:
            out["hostname"] = hostname
        log = self._one_value(scopes, "error_log", self._error_log, "log file", servers)
        if log is not None:
            out |= log
        for key, name, value_of in _COMMON:
            d = mail.by_name.get(name, [None])[0]
            value = value_of(self, d) if d is not None else None
            if value is not None:
                out[key] = value
        for scope in [mail, *(s.scope for s in servers)]:
            self._flag_note(scope, "proxy", False, "proxy off: mailgate always proxies")
            self._flag_note(
                scope,
                "proxy_pass_error_message",
                True,
                "not supported: the backend's error text goes to the log, never to the client",
            )
            self._flag_note(
                scope,
                "proxy_protocol",
                True,
                "not supported: mailgate sends no PROXY header to backends ([backend] "
                "forward_client passes the client's address with IMAP ID / XCLIENT)",
            )
            self._flag_note(
                scope, "ssl_prefer_server_ciphers", False, "mailgate always prefers its ciphers"
            )
            for d in scope.by_name.get("resolver", []):
                if d.args != ("off",):
                    self.note(d, "not needed: mailgate resolves names with the system resolver")
        return out

    def _error_log(self, d: Directive) -> dict[str, Any] | None:
        if not d.args:
            return None
        target, out = d.args[0], {}
        if target.startswith(("syslog:", "memory:")):
            self.note(
                d, f"{target.split(':')[0]}: not supported: mailgate logs to stderr or a file"
            )
        elif target not in ("stderr", "/dev/stderr"):
            out["log_file"] = self._path(target)
        if len(d.args) > 1:
            if d.args[1] in _LOG_LEVELS:
                out["log_level"] = _LOG_LEVELS[d.args[1]]
            else:
                self.note(d, f"unknown level {d.args[1]!r}: ignored")
        return out or None

    # --- servers and listeners -----------------------------------------------------------

    def _servers(self, body: Iterable[Directive], mail: _Scope) -> list[_Server]:
        servers: list[_Server] = []
        bound: list[_Bound] = []
        for block in body:
            if block.name != "server" or block.block is None:
                continue
            scope = _Scope(block.block, mail)
            listens = [b for d in scope.by_name.get("listen", []) if (b := self._listen(d))]
            protocol = self._server_protocol(block, scope, [b.port for b in listens])
            if protocol is None:
                continue
            if not listens:
                self.note(block, "server with no usable listen: ignored")
                continue
            implicit_all = self._flag(scope.first("ssl")) is True
            starttls = scope.first("starttls")
            mode = _one_arg(starttls) if starttls is not None else "off"
            if mode not in ("on", "off", "only") and starttls is not None:
                self.note(starttls, f"{mode!r} is not on, off or only: ignored")
                mode = "off"
            for b in listens:
                b.settings = {"protocol": protocol, "listen": "", **b.settings}
                if implicit_all:
                    b.settings["tls"] = "implicit"
                elif "tls" not in b.settings and mode != "off":
                    b.settings["tls"] = "starttls"
                    if mode == "only":
                        b.settings["starttls_only"] = True
                self._trusted_proxies(scope, b.directive, b.settings)
            tls = any(b.settings.get("tls") for b in listens)
            server = _Server(block, scope, protocol, [], tls)
            auth = self._auth(protocol, scope)
            for b in listens:
                b.server = server
                if auth is not None:
                    b.settings["auth"] = auth  # dropped later where it equals [protocol] auth
            bound.extend(listens)
            servers.append(server)
        for b in self._share_ports(bound):
            assert b.server is not None
            b.server.listeners.append(b.settings)
        return servers

    def _share_ports(self, bound: list[_Bound]) -> list[_Bound]:
        """The listeners mailgate can bind. nginx opens one socket for a wildcard and picks
        the server of a connection to a specific address on the same port by its local
        address; mailgate binds each listener on its own, which the kernel refuses beside a
        wildcard. nginx's `listen 143` and `listen [::]:143` are IPv4 and IPv6 sockets;
        mailgate's "*:143" is both."""
        kept: list[_Bound] = []
        for b in bound:
            same_port = [k for k in kept if k.port == b.port]
            clash = next((k for k in same_port if k.host == b.host), None)
            if clash is not None:
                self.note(
                    b.directive, f"duplicate listen (first at {clash.directive.where}): ignored"
                )
                continue
            other_family = {"0.0.0.0": "::", "::": "0.0.0.0"}.get(b.host)
            twin = next((k for k in same_port if k.host == other_family), None)
            if twin is not None:
                twin.host = "*"  # one dual-stack listener
                if twin.server is not b.server:
                    self.note(
                        b.directive,
                        f"mailgate listens on *:{b.port} once, for IPv4 and IPv6: the server "
                        f"at {twin.directive.where}'s settings apply",
                    )
                continue
            wild = next((k for k in same_port if k.covers(b)), None)
            if wild is not None:
                self.note(
                    b.directive,
                    f"mailgate cannot listen on {b.host}:{b.port} beside the wildcard at "
                    f"{wild.directive.where} (nginx shares one socket): ignored, its clients "
                    "get that listener's settings",
                )
                continue
            for k in [k for k in same_port if b.covers(k)]:
                kept.remove(k)
                self.note(
                    k.directive,
                    f"mailgate cannot listen on {k.host}:{k.port} beside the wildcard at "
                    f"{b.directive.where} (nginx shares one socket): ignored, its clients "
                    "get that listener's settings",
                )
            kept.append(b)
        for b in kept:
            shown = f"[{b.host}]" if ":" in b.host else b.host
            b.settings["listen"] = f"{shown}:{b.port}"
        return kept

    def _listen(self, d: Directive) -> _Bound | None:
        if not d.args:
            self.note(d, "no address: ignored")
            return None
        address, params = d.args[0], d.args[1:]
        if address.startswith("unix:"):
            self.note(d, "unix sockets are not supported: ignored")
            return None
        host, port = _split_address(address)
        if port is None:
            self.note(d, f"{address!r} has no port: ignored")
            return None
        settings: dict[str, Any] = {}
        for param in params:
            if param == "ssl":
                settings["tls"] = "implicit"
            elif param == "proxy_protocol":
                settings["proxy_protocol"] = True
            elif param != "bind":  # mailgate binds every address on its own anyway
                self.note(d, f"parameter {param!r} is not supported: ignored")
        return _Bound(d, "0.0.0.0" if host == "*" else host, port, settings)

    def _server_protocol(self, block: Directive, scope: _Scope, ports: list[int]) -> str | None:
        d = scope.by_name.get("protocol", [None])[0]
        if d is not None:
            name = _one_arg(d)
            if name in PROTOCOLS:
                return name
            self.note(d, f"unknown protocol {name!r}: server ignored")
            return None
        for port in ports:
            if port in DEFAULT_PORTS:
                return DEFAULT_PORTS[port]
        self.note(block, "no protocol and no standard port to infer it from: server ignored")
        return None

    def _trusted_proxies(self, scope: _Scope, listen: Directive, lst: dict[str, Any]) -> None:
        if not lst.get("proxy_protocol"):
            return
        sources = scope.every("set_real_ip_from")
        if not sources:
            self.note(
                listen,
                "proxy_protocol without set_real_ip_from: nginx reads the header but keeps the "
                "proxy's address; mailgate takes it only from trusted_proxies (left unset)",
            )
            return
        trusted = []
        for d in sources:
            self.used.add(id(d))
            value = _one_arg(d)
            try:
                trusted.append(str(ipaddress.ip_network(value, strict=False)))
            except ValueError:
                self.note(d, f"{value!r} is not an address or CIDR: ignored")
        if trusted:
            lst["trusted_proxies"] = trusted

    # --- per-protocol sections -----------------------------------------------------------

    def _auth(self, protocol: str, scope: _Scope) -> list[str] | None:
        d = scope.first(f"{protocol}_auth")
        if d is None:
            return None
        methods: list[str] = []
        for name in d.args:
            ours = AUTH_NAMES[protocol].get(name.lower())
            if ours is None:
                self.note(d, f"method {name!r} is not supported: left out")
            else:
                methods.extend(m for m in ours if m not in methods)
        always = ALWAYS_ACCEPTED.get(protocol)
        if always is not None and always[0] not in methods:
            methods.append(always[0])
            self.note(
                d,
                f"nginx accepts {always[1]} whatever {d.name} says: kept as {always[0]!r} "
                "(remove it to refuse)",
            )
        return methods or None

    def _protocol(self, protocol: str, mail: _Scope, servers: list[_Server]) -> dict[str, Any]:
        mine = [s for s in servers if s.protocol == protocol]
        section: dict[str, Any] = {}
        specs: list[tuple[str, str, Callable[[_Converter, Directive], Any], bool]] = [
            (key, name, value_of, True) for key, name, value_of in _COMMON
        ]
        specs.append(("capabilities", f"{protocol}_capabilities", _Converter._words, False))
        if protocol == "smtp":
            specs.append(("greeting_delay", "smtp_greeting_delay", _Converter._duration, False))
        for key, name, value_of, has_top in specs:
            top_d = mail.by_name.get(name, [None])[0]
            top = value_of(self, top_d) if top_d is not None and has_top else None
            scopes = [s.scope for s in mine] or ([] if has_top else [mail])
            value = self._one_value(
                scopes, name, functools.partial(value_of, self), f"[{protocol}] {key}", mine
            )
            if value is not None and value != top:
                section[key] = value
        auth = self._auth(protocol, mine[0].scope if mine else mail)
        if auth is not None:
            section["auth"] = auth
        for server in mine:
            for lst in server.listeners:
                if lst.get("auth") == auth:
                    lst.pop("auth", None)
        return section

    def _words(self, d: Directive) -> list[str] | None:
        return list(d.args) or None

    def _duration(self, d: Directive) -> float | int | None:
        seconds = _seconds(_one_arg(d))
        if seconds is None:
            self.note(d, f"{_one_arg(d)!r} is not an nginx time: ignored")
        return seconds

    def _timeout(self, d: Directive) -> float | int | None:
        seconds = self._duration(d)
        if seconds == 0:
            self.note(d, "a zero timeout would fail every wait: ignored")
            return None
        return seconds

    def _count(self, d: Directive) -> int | None:
        value = _one_arg(d)
        if not value.isdigit():
            self.note(d, f"{value!r} is not a number: ignored")
            return None
        return int(value)

    # --- TLS -----------------------------------------------------------------------------

    def _tls(self, mail: _Scope, servers: list[_Server]) -> dict[str, Any]:
        tls_servers = [s for s in servers if s.tls]
        scopes = [s.scope for s in tls_servers] or [mail]
        section: dict[str, Any] = {}
        sni: list[dict[str, str]] = []
        names: dict[str, tuple[str, str]] = {}
        where: list[tuple[_Server | None, _Scope]] = [(s, s.scope) for s in tls_servers]
        for server, scope in where or [(None, mail)]:
            pair = self._certificate(scope)
            if pair is None:
                if server is not None:
                    self.note(server.block, "TLS without ssl_certificate: mailgate check fails")
                continue
            cert_d, cert, key = pair
            if "certificate" not in section:
                section["certificate"], section["certificate_key"] = cert, key
                continue
            if (section["certificate"], section["certificate_key"]) == (cert, key):
                continue
            # Its own server_name only: an inherited one is every server's name, and the
            # clients of the [tls] certificate's servers would get this one by asking for it.
            own = scope.by_name.get("server_name", [])
            name = _one_arg(own[0]) if own else ""
            if not name:
                self.note(
                    cert_d,
                    "a second certificate is chosen by SNI, and this server has no "
                    "server_name of its own to choose it by: its clients get [tls] certificate",
                )
            elif name in names and names[name] != (cert, key):
                self.note(cert_d, f"server_name {name!r} already has another certificate: ignored")
            elif name not in names:
                names[name] = (cert, key)
                sni.append({"server_name": name, "certificate": cert, "certificate_key": key})
                self.note(
                    cert_d,
                    f"mailgate chooses certificates by SNI, not by listener: clients that do "
                    f"not ask for {name!r} get [tls] certificate",
                )
        for key, name, value_of in (
            ("min_protocol", "ssl_protocols", _Converter._protocols),
            ("ciphers", "ssl_ciphers", _Converter._one),
            ("verify_client", "ssl_verify_client", _Converter._verify_client),
            ("client_certificate", "ssl_client_certificate", _Converter._file),
        ):
            value = self._one_value(
                scopes, name, functools.partial(value_of, self), f"[tls] {key}", tls_servers
            )
            if value is not None:
                section[key] = value
        trusted = self._one_value(
            scopes, "ssl_trusted_certificate", self._file, "[tls] client_certificate", tls_servers
        )
        if trusted is not None and "client_certificate" not in section:
            section["client_certificate"] = trusted
        elif trusted is not None:
            d = _first_of(scopes, "ssl_trusted_certificate")
            self.note(d, "mailgate trusts one CA file for clients: ssl_client_certificate's")
        if section.get("verify_client", "off") != "off" and "client_certificate" not in section:
            d = _first_of(scopes, "ssl_verify_client")
            self.note(d, "needs ssl_client_certificate (the CA to trust): mailgate check fails")
        if sni:
            section["sni"] = sni
        return section

    def _certificate(self, scope: _Scope) -> tuple[Directive, str, str] | None:
        certs, keys = scope.every("ssl_certificate"), scope.every("ssl_certificate_key")
        if not certs or not keys:
            return None
        for extra in certs[1:]:
            self.note(extra, "mailgate loads one certificate per name: the first is used")
        return certs[0], self._path(_one_arg(certs[0])), self._path(_one_arg(keys[0]))

    def _protocols(self, d: Directive) -> str | None:
        versions = set(d.args)
        for unknown in sorted(
            versions - {"SSLv2", "SSLv3", "TLSv1", "TLSv1.1", "TLSv1.2", "TLSv1.3"}
        ):
            self.note(d, f"unknown protocol {unknown!r}: ignored")
        old = [v for v in ("SSLv2", "SSLv3", "TLSv1", "TLSv1.1") if v in versions]
        if old:
            self.note(d, f"{' '.join(old)} not offered: mailgate's lowest is TLSv1.2 (RFC 8996)")
        if "TLSv1.2" in versions:
            if "TLSv1.3" not in versions:
                self.note(d, "mailgate offers TLSv1.3 too: it sets only the lowest version")
            return "TLSv1.2"
        if "TLSv1.3" in versions:
            return "TLSv1.3"
        self.note(d, "no TLSv1.2 or TLSv1.3: mailgate's default (TLSv1.2) is kept")
        return None

    def _verify_client(self, d: Directive) -> str | None:
        value = _one_arg(d)
        if value in ("on", "off", "optional"):
            return value
        self.note(d, f"{value!r} is not supported (on, off, optional): ignored")
        return None

    def _one(self, d: Directive) -> str | None:
        return _one_arg(d) or None

    def _file(self, d: Directive) -> str | None:
        return self._path(_one_arg(d)) if d.args else None

    def _path(self, value: str) -> str:
        return str(self.base_dir / value)  # an absolute value stays as it is

    # --- auth_http and backend -----------------------------------------------------------

    def _auth_http(
        self, mail_block: Directive, mail: _Scope, servers: list[_Server]
    ) -> dict[str, Any]:
        scopes = [s.scope for s in servers] or [mail]
        section: dict[str, Any] = {}
        url = self._one_value(scopes, "auth_http", self._auth_url, "[auth_http] url", servers)
        if url is None:
            if servers:
                self.note(mail_block, "no auth_http: mailgate check fails until [auth_http] "
                          "or [directory] is configured")  # fmt: skip
            return section
        section["url"] = url
        timeout = self._one_value(
            scopes, "auth_http_timeout", self._timeout, "[auth_http] timeout", servers
        )
        if timeout is not None:
            section["timeout"] = timeout
        cert = self._one_value(
            scopes,
            "auth_http_pass_client_cert",
            self._flag,
            "[auth_http] pass_client_cert",
            servers,
        )
        if cert is not None:
            section["pass_client_cert"] = cert
        headers = self._one_value(
            scopes, "auth_http_header", self._headers, "[auth_http] header", servers, whole=True
        )
        if headers:
            section["header"] = headers
        return section

    def _auth_url(self, d: Directive) -> str | None:
        url = _one_arg(d)
        if url.startswith("unix:"):
            self.note(d, "unix sockets are not supported: ignored")
            return None
        return url if "://" in url else "http://" + url

    def _headers(self, level: list[Directive]) -> dict[str, str] | None:
        headers: dict[str, str] = {}
        for d in level:
            if len(d.args) != 2 or ":" in d.args[0] or "\n" in d.args[1] or "\r" in d.args[1]:
                self.note(d, "needs a header name and a one-line value: ignored")
                continue
            if d.args[0] in headers:
                self.note(d, "mailgate sends a header once: the last value is kept")
            headers[d.args[0]] = d.args[1]
        return headers or None

    def _backend(self, mail: _Scope, servers: list[_Server]) -> dict[str, Any]:
        smtp = [s for s in servers if s.protocol == "smtp"]
        scopes = [s.scope for s in smtp] or [mail]
        xclient = self._one_value(scopes, "xclient", self._flag, "[backend] smtp_mode", smtp)
        auth = self._one_value(scopes, "proxy_smtp_auth", self._flag, "[backend] smtp_mode", smtp)
        if not smtp and xclient is None and auth is None:
            return {}
        xclient = True if xclient is None else xclient  # nginx's default: on
        if auth and xclient:
            d = _first_of(scopes, "xclient", "proxy_smtp_auth")
            self.note(
                d,
                "XCLIENT before AUTH needs [backend] forward_client = true, which also sends "
                "the client's address with IMAP ID and POP3 XCLIENT",
            )
            return {"smtp_mode": "auth", "forward_client": True}
        if auth:
            return {"smtp_mode": "auth"}
        if not xclient:
            d = _first_of(scopes, "xclient")
            self.note(
                d,
                "mailgate logs in to SMTP backends with XCLIENT or AUTH: kept smtp_mode = "
                '"xclient" (the backend must allow it, Postfix: smtpd_authorized_xclient_hosts)',
            )
        return {"smtp_mode": "xclient"}

    # --- helpers -------------------------------------------------------------------------

    def _one_value(
        self,
        scopes: list[_Scope],
        name: str,
        value_of: Callable[[Any], Any],
        target: str,
        servers: list[_Server],
        *,
        whole: bool = False,
    ) -> Any:
        """nginx sets `name` per server, mailgate once: the first value set is used, and
        each server that says otherwise, or nothing, is reported. `whole`: value_of gets
        every occurrence of the nearest level (nginx replaces such lists level by level)."""
        values: list[tuple[Directive | None, Any]] = []
        for scope in scopes:
            found = scope.every(name)
            if not found:
                values.append((None, None))
            else:
                values.append((found[0], value_of(found if whole else found[0])))
        chosen = next(((d, v) for d, v in values if v is not None), None)
        if chosen is None:
            return None
        chosen_d, value = chosen
        assert chosen_d is not None
        for i, (d, v) in enumerate(values):
            if d is None and servers:
                self.note(
                    chosen_d,
                    f"mailgate has one {target}: it applies also to the server at "
                    f"{servers[i].block.where}, which does not set {name}",
                )
            elif d is not None and v is not None and v != value:
                used = f"{_render(value)} from {chosen_d.where}"
                self.note(d, f"mailgate has one {target}: {used} is used")
        return value

    def _flag(self, d: Directive | None) -> bool | None:
        if d is None:
            return None
        value = _one_arg(d)
        if value not in ("on", "off"):
            self.note(d, f"{value!r} is not on or off: ignored")
            return None
        return value == "on"

    def _flag_note(self, scope: _Scope, name: str, when: bool, why: str) -> None:
        for d in scope.by_name.get(name, []):
            if self._flag(d) is when:
                self.note(d, why)


# Settings with a top-level default in mailgate: (key, nginx directive, value function).
_COMMON: tuple[tuple[str, str, Callable[[_Converter, Directive], Any]], ...] = (
    ("client_timeout", "timeout", _Converter._timeout),
    ("proxy_timeout", "proxy_timeout", _Converter._timeout),
    ("max_errors", "max_errors", _Converter._count),
)


def _first_of(scopes: Iterable[_Scope], *names: str) -> Directive:
    """The first directive of these names (one is known to exist), for a note to point at."""
    return next(d for s in scopes for n in names if (d := s.first(n)) is not None)


def _one_arg(d: Directive) -> str:
    return d.args[0] if d.args else ""


def _is_ipv4(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 4
    except ValueError:
        return False  # a host name: its family is known only when it is resolved


def _split_address(address: str) -> tuple[str, int | None]:
    """nginx listen forms: '143', '*:143', '10.0.0.1:143', '[::1]:143', 'name:143'."""
    if address.isdigit():
        return "*", int(address)
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() and rest.startswith(":") else None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or ":" in host:
        return address, None
    return host, int(port)


def _seconds(text: str) -> float | int | None:
    """nginx time: '30s', '1m30s', '500ms', '1h 30m'; a bare number is seconds."""
    compact = text.replace(" ", "")
    if not compact or _TIME.sub("", compact):
        return None
    total = sum(int(n) * _SECONDS[unit or "s"] for n, unit in _TIME.findall(compact))
    return int(total) if float(total).is_integer() else round(total, 3)


def _render(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, bool) else str(value).lower()
