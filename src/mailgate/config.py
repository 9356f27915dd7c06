"""TOML configuration, validated once at start into frozen settings.

Names mirror nginx's mail directives where one exists (`auth_http`, `auth_http_header`,
`proxy_timeout`, `imap_capabilities` -> `[imap] capabilities`, `starttls only`), so an operator
can port an nginx `mail {}` block line by line. Every error names the key path and what is
wrong; nothing here exits the process (that is `cli.py`'s job).
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from mailgate.networks import EMPTY, NetworkList, parse_network
from mailgate.protocols.spec import SPECS
from mailgate.values import BackendTLS, Secret

PROTOCOLS = tuple(SPECS)
# Default ports of the protocols, used when a route names no port (the seed's table).
DEFAULT_PORTS = {name: spec.port for name, spec in SPECS.items()}
# Bounds of a protocol's max_line: room for a command with two credentials, and at most what
# a pre-auth session may buffer (a line is held whole until its CRLF arrives).
MIN_LINE = 1024
MAX_LINE = 1024 * 1024
# The PROXY header comes in the proxy's first segment; the spec asks receivers to wait at
# least 3 s (one TCP retransmit) before giving up, and 5 s leaves room for a loaded proxy.
DEFAULT_PROXY_PROTOCOL_TIMEOUT = 5.0


class ConfigError(Exception):
    """A setting is missing or wrong. The message names the key path."""


@dataclass(frozen=True, slots=True)
class ListenerSettings:
    protocol: str
    host: str  # "" means every address
    port: int
    tls: str  # "none" | "starttls" | "implicit"
    starttls_only: bool
    auth: tuple[str, ...]  # the protocol's [section].auth unless the listener overrides it
    # PROXY protocol v1/v2 in: every connection must start with a header, and only from
    # these networks; the header must be complete within proxy_protocol_timeout seconds.
    proxy_protocol: bool = False
    trusted_proxies: NetworkList = EMPTY
    proxy_protocol_timeout: float = DEFAULT_PROXY_PROTOCOL_TIMEOUT

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ProtocolSettings:
    auth: tuple[str, ...]
    capabilities: tuple[str, ...]
    greeting: str
    max_errors: int
    # nginx `timeout`: the longest wait for one client read before login.
    client_timeout: float
    # The whole pre-auth phase, so a client trickling bytes cannot hold a slot (Dovecot's
    # login processes give up after 3 minutes; a real client logs in within seconds).
    login_timeout: float
    # Relay idle timeout. IMAP IDLE clients re-issue IDLE every 29 minutes (RFC 2177), so
    # anything under 30 minutes cuts them; nginx's default is 24 hours.
    proxy_timeout: float
    # The longest wait for a reply to reach a client that does not read (nginx's `timeout`
    # covers writes too): past it the session ends.
    send_timeout: float = 30.0
    max_line: int = 64 * 1024  # the longest command line before login (the protocol's default)
    greeting_delay: float = 0.0  # SMTP only: nginx smtp_greeting_delay


@dataclass(frozen=True, slots=True)
class SniCertificate:
    server_name: str
    certificate: Path
    certificate_key: Path


@dataclass(frozen=True, slots=True)
class TlsSettings:
    certificate: Path | None = None
    certificate_key: Path | None = None
    min_protocol: str = "TLSv1.2"  # RFC 8996 deprecates 1.0 and 1.1
    ciphers: str | None = None  # None: OpenSSL's defaults, which are safe for 1.2 and 1.3
    sni: tuple[SniCertificate, ...] = ()
    handshake_timeout: float = 10.0
    # nginx's ssl_verify_client / ssl_client_certificate: ask clients for a certificate
    # signed by this CA ("optional": a client without one still gets in; "on": it does not).
    verify_client: str = "off"
    client_certificate: Path | None = None


@dataclass(frozen=True, slots=True)
class BackendSettings:
    tls: BackendTLS = BackendTLS.NONE
    verify: bool = True  # verify the backend's certificate when TLS is used
    ca_file: Path | None = None
    server_name: str | None = None  # name to verify; default: the route's host
    forward_client: bool = False  # IMAP ID x-originating-ip / POP3 and SMTP XCLIENT
    imap_auth: str = "login"  # "login" | "plain"
    pop3_auth: str = "user"  # "user" | "plain"
    smtp_mode: str = "xclient"  # "xclient" | "auth"
    connect_timeout: float = 5.0
    login_timeout: float = 10.0  # greeting, TLS and login together


@dataclass(frozen=True, slots=True)
class AuthHttpSettings:
    url: str  # "http://host:port/path"; nginx's "host:port/path" form is accepted too
    headers: tuple[tuple[str, str], ...] = ()  # auth_http_header: sent last, in this order
    timeout: float = 5.0  # auth/http.py DEFAULT_TIMEOUT says why
    pass_client_cert: bool = False  # auth_http_pass_client_cert: Auth-SSL-Verify ... -Cert


@dataclass(frozen=True, slots=True)
class DirectoryQueries:
    """An existing schema, as Dovecot's passdb sql: named parameters :user, :domain, :protocol.

    `password` returns one row with a column `password` ({SCHEME}value or a bare crypt string)
    and optional `user` (the login to use on the backend), `active`. `route` returns `host`
    (may be "smtp:10.0.0.5" or "host:port", as postfix transport maps), optional `port`.
    """

    password: str
    route: str


@dataclass(frozen=True, slots=True)
class DirectorySettings:
    url: str  # SQLAlchemy URL; a relative sqlite path is relative to the config file
    queries: DirectoryQueries | None = None  # None: mailgate's own schema
    ports: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    # For a custom schema: log in to backends as a master user (Dovecot user*master form).
    master_user: str | None = None
    master_password: Secret | None = None
    master_separator: str = "*"
    # Custom schemas: how to read a stored password without a {SCHEME} or $id$ prefix
    # (the seed's users.clear column is plain text).
    default_scheme: str = "PLAIN"
    cache_ttl: float = 60.0  # routes; a disabled user or a moved mailbox is seen within this
    cache_size: int = 100_000
    pool_size: int = 5
    query_timeout: float = 3.0


@dataclass(frozen=True, slots=True)
class ThrottleSettings:
    enabled: bool = True
    # Failures counted per client IP and per user within `window`; each failure past `free`
    # doubles the delay from `base_delay` up to `max_delay`. Above `lockout_after` failures
    # the IP or user is refused for `lockout` seconds, whatever the password.
    free: int = 2
    base_delay: float = 1.0
    max_delay: float = 15.0
    lockout_after: int = 20
    lockout: float = 300.0
    window: float = 900.0
    # Distinct users an address may fail to log in as within `window` before its failures
    # get max_delay (password spraying: one guess each for many users). 0 = off.
    per_ip_users: int = 20
    # Logins being decided at once for one user / from one address. A mail client opens up
    # to ~10 connections at start; over the bound a login gets a temporary failure.
    concurrent_per_user: int = 16
    concurrent_per_ip: int = 64


# JWS algorithms a token may be signed with: asymmetric only. "none" and the HMAC family
# (HS256 ...) are never accepted: with HMAC, whoever can read the JWKS could sign tokens.
OAUTH_ALGORITHMS = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA",
    "Ed25519",  # RFC 9864's name for EdDSA with Ed25519
)  # fmt: skip
DEFAULT_OAUTH_ALGORITHMS = ("RS256", "ES256", "PS256", "EdDSA")


@dataclass(frozen=True, slots=True)
class OAuthSettings:
    """[oauth]: how the built-in directory validates OAuth 2.0 bearer tokens (XOAUTH2 and
    OAUTHBEARER logins), and what the error challenge tells a client whose token is refused.

    JWTs are checked locally against the issuer's JWKS (`jwks_url`, or found through
    `issuer` + /.well-known/openid-configuration); other tokens go to RFC 7662 introspection.
    With [auth_http] only `scope` and `issuer` are used, for the error challenge.
    """

    issuer: str | None = None  # the `iss` every token must carry; also the discovery base
    jwks_url: str | None = None  # None: from the issuer's OpenID configuration
    audience: str | None = None  # a JWT's `aud` must contain it; introspection: aud/client_id
    username_claim: str = "email"  # the claim naming the directory user
    algorithms: tuple[str, ...] = DEFAULT_OAUTH_ALGORITHMS
    clock_skew: float = 60.0  # exp/nbf/iat tolerance: clocks of IdPs and proxies drift
    introspection_url: str | None = None
    client_id: str | None = None  # HTTP Basic credentials for introspection
    client_secret: Secret | None = None
    timeout: float = 5.0  # one IdP request (discovery, JWKS or introspection), connect included
    jwks_cache: float = 300.0  # keys are refetched this often, or on an unknown kid
    introspection_cache: float = 60.0  # positive introspection answers; 0 turns it off
    max_token: int = 16384  # protocols/sasl.py MAX_TOKEN says why
    scope: str | None = None  # the error challenge's "scope"
    ca_file: Path | None = None  # CA for the IdP's TLS certificate; None: the system's

    @property
    def validates_jwt(self) -> bool:
        """JWTs are checked locally (the issuer's keys); other tokens need introspection."""
        return self.issuer is not None and self.audience is not None

    @property
    def validates(self) -> bool:
        """Whether any token can be validated (JWKS or introspection configured)."""
        return self.validates_jwt or self.introspection_url is not None

    @property
    def openid_configuration(self) -> str | None:
        """The discovery URL the error challenge points clients to (RFC 7628 3.2.2)."""
        if self.issuer is None:
            return None
        return self.issuer.rstrip("/") + "/.well-known/openid-configuration"


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """Bounds on what one worker accepts, checked from the moment a connection is accepted."""

    # TLS handshakes in progress per worker (implicit TLS and STARTTLS): a handshake costs
    # ~50 KB and stalls are cheap to make, so they get their own bound below max_sessions.
    handshakes: int = 1000
    # ... and per client address (IPv6: per /64), so one address cannot take all of them.
    handshakes_per_ip: int = 32
    # Logged-in sessions at once, per node (per cluster with [cluster] redis_url); 0 = none.
    # Dovecot's mail_max_userip_connections is per user and address.
    per_user: int = 0
    per_user_ip: int = 0
    per_ip: int = 0


# The Redis URL schemes [cluster] redis_url takes (redisconn.py says what each means).
REDIS_SCHEMES = (
    "redis://", "rediss://", "unix://", "redis+sentinel://", "rediss+sentinel://",
    "redis+cluster://", "rediss+cluster://",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Shared state of several mailgate nodes in Redis (docs/scale-out.md)."""

    redis_url: str | None = None  # None: each node counts alone (its workers share)
    node_name: str = ""  # "" = the host name; names this node's leases and sessions
    # A node's leases and sessions live this long without its heartbeat: a node that dies
    # frees its users' sessions within one lease.
    lease: float = 30.0
    # Every key starts with "{prefix}:" (a Redis Cluster hash tag: one slot for all of them),
    # so several mailgate clusters may share one Redis.
    prefix: str = "mailgate"
    # One Redis request waits this long, then the node counts alone until Redis answers again
    # (a login has seconds; Redis answers in well under a millisecond on a LAN).
    timeout: float = 0.5
    # `mailgate user move` and `backend drain`: how long a moving user's sessions get to end
    # after the kick, the pause before the new member takes the user (Dovecot's director
    # waits 2 s), and how many users a drain moves at once.
    move_timeout: float = 30.0
    move_delay: float = 2.0
    move_parallel: int = 10


@dataclass(frozen=True, slots=True)
class AuthServerSettings:
    listen: str = "127.0.0.1:9000"
    # Requests must carry these headers with these values (nginx auth_http_header).
    required_headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class Settings:
    listeners: tuple[ListenerSettings, ...]
    protocols: Mapping[str, ProtocolSettings]
    tls: TlsSettings
    backend: BackendSettings
    auth_http: AuthHttpSettings | None
    directory: DirectorySettings | None
    throttle: ThrottleSettings
    auth_server: AuthServerSettings
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    oauth: OAuthSettings | None = None  # [oauth]; None: no token can be validated
    workers: int = 1
    # Sessions one worker holds at once (nginx: worker_connections); 0 = derived from the
    # open-file limit at start, each proxied session costing two descriptors.
    max_sessions: int = 0
    hostname: str = "localhost"
    shutdown_timeout: float = 30.0
    # After a reload, old workers finish their relayed sessions for at most this long.
    reload_drain_timeout: float = 3600.0
    # The operator's Unix socket (mailgate who, kick, reload ...); None: mailgate.sock beside
    # the configuration file.
    control_socket: Path | None = None
    log_level: str = "info"
    # None: stderr (journald, docker). A file is reopened by logsetup.reopen() for logrotate.
    log_file: Path | None = None
    metrics_listen: str | None = None
    # A load balancer's health check (GET /healthz): 200 while the node serves, 503 from the
    # moment it begins to shut down; it keeps serving `drain_delay` seconds more, for the
    # balancer to notice (HAProxy: fall x inter) before the listeners close.
    health_listen: str | None = None
    drain_delay: float = 3.0
    pid_file: Path | None = None  # written by serve; `mailgate directory flush` signals it
    # Clients on these networks are trusted (issue 8: e.g. exempt from throttling).
    trusted_networks: NetworkList = EMPTY
    source: Path | None = None
    # [[pool]]: groups of mailstores with health checks (backend/pools.py).
    pools: tuple[PoolSettings, ...] = ()


def control_socket_path(settings: Settings) -> Path | None:
    """Where the control socket is: the setting, else mailgate.sock beside the config file."""
    if settings.control_socket is not None:
        return settings.control_socket
    return settings.source.parent / "mailgate.sock" if settings.source is not None else None


# --- loading ----------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Settings:
    path = Path(path)
    try:
        with path.open("rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return parse(raw, base_dir=path.parent, source=path)


def parse(raw: Mapping[str, Any], *, base_dir: Path, source: Path | None = None) -> Settings:
    t = _Table(raw, "", base_dir)
    protocols = {p: _protocol(t.table(p), p, t) for p in PROTOCOLS}
    listeners = tuple(_listener(lt, protocols) for lt in t.tables("listener"))
    tls = _tls(t.table("tls"))
    for lst in listeners:
        if lst.tls != "none" and tls.certificate is None:
            raise ConfigError(f"listener {lst.address}: tls = {lst.tls!r} needs [tls] certificate")
    auth_http = _auth_http(t.table("auth_http")) if "auth_http" in raw else None
    directory = _directory(t.table("directory")) if "directory" in raw else None
    if listeners and auth_http is None and directory is None:
        raise ConfigError("either [auth_http] or [directory] must be configured")
    if auth_http is not None and directory is not None:
        raise ConfigError("[auth_http] and [directory] are exclusive: configure one")
    oauth = (
        _oauth(t.table("oauth"), needs_validation=directory is not None) if "oauth" in raw else None
    )
    settings = Settings(
        listeners=listeners,
        protocols=protocols,
        tls=tls,
        backend=_backend(t.table("backend")),
        auth_http=auth_http,
        directory=directory,
        throttle=_throttle(t.table("throttle")),
        auth_server=_auth_server(t.table("auth_server")),
        limits=_limits(t.table("limits")),
        cluster=_cluster(t.table("cluster"), t.table("throttle").raw.get("redis_url")),
        oauth=oauth,
        workers=_workers(t.get("workers", (int, str), 1)),
        max_sessions=t.integer("max_sessions", 0),
        hostname=t.get("hostname", str, "localhost"),
        shutdown_timeout=t.timeout("shutdown_timeout", 30.0),
        reload_drain_timeout=t.timeout("reload_drain_timeout", 3600.0),
        control_socket=t.path("control_socket"),
        log_level=t.choice("log_level", ("debug", "info", "warning", "error"), "info"),
        log_file=t.path("log_file"),
        metrics_listen=t.get("metrics_listen", str, None),
        health_listen=_health_listen(t),
        drain_delay=t.number("drain_delay", 3.0),
        pid_file=t.path("pid_file"),
        trusted_networks=_networks(t, "trusted_networks"),
        source=source,
        pools=_pools(t),
    )
    t.check_unknown()
    _check_pool_tls(settings)
    return settings


def _protocol(t: _Table, protocol: str, top: _Table) -> ProtocolSettings:
    spec = SPECS[protocol]
    auth = t.str_list("auth", spec.default_auth)
    for method in auth:
        if method not in spec.auth_methods:
            raise ConfigError(f"{t.key('auth')}: unknown method {method!r}")
    max_line = t.integer("max_line", spec.default_max_line)
    if not MIN_LINE <= max_line <= MAX_LINE:
        raise ConfigError(f"{t.key('max_line')}: must be from {MIN_LINE} to {MAX_LINE}")
    settings = ProtocolSettings(
        auth=auth,
        capabilities=t.str_list("capabilities", spec.default_capabilities),
        greeting=_line(t, "greeting", spec.default_greeting),
        max_errors=t.integer("max_errors", top.integer("max_errors", 5)),
        client_timeout=t.timeout("client_timeout", top.timeout("client_timeout", 30.0)),
        login_timeout=t.timeout("login_timeout", top.timeout("login_timeout", 60.0)),
        proxy_timeout=t.timeout("proxy_timeout", top.timeout("proxy_timeout", 3600.0)),
        send_timeout=t.timeout("send_timeout", top.timeout("send_timeout", 30.0)),
        max_line=max_line,
        greeting_delay=t.number("greeting_delay", 0.0),
    )
    t.check_unknown()
    return settings


def _listener(t: _Table, protocols: Mapping[str, ProtocolSettings]) -> ListenerSettings:
    protocol = t.choice("protocol", PROTOCOLS, None)
    host, port = parse_address(t.required("listen", str), t.key("listen"))
    auth = t.str_list("auth", protocols[protocol].auth)
    for method in auth:
        if method not in SPECS[protocol].auth_methods:
            raise ConfigError(f"{t.key('auth')}: unknown method {method!r}")
    tls = t.choice("tls", ("none", "starttls", "implicit"), "none")
    starttls_only = t.get("starttls_only", bool, False)
    if starttls_only and tls != "starttls":
        raise ConfigError(f"{t.key('starttls_only')}: only makes sense with tls = 'starttls'")
    proxy_protocol, trusted_proxies, proxy_timeout = _proxy_protocol(t)
    t.check_unknown()
    return ListenerSettings(
        protocol, host, port, tls, starttls_only, auth, proxy_protocol, trusted_proxies,
        proxy_timeout,
    )  # fmt: skip


def _proxy_protocol(t: _Table) -> tuple[bool, NetworkList, float]:
    """A listener's proxy_protocol, trusted_proxies and proxy_protocol_timeout."""
    enabled = t.get("proxy_protocol", bool, False)
    proxies = _networks(t, "trusted_proxies")
    timeout = t.timeout("proxy_protocol_timeout", DEFAULT_PROXY_PROTOCOL_TIMEOUT)
    if enabled and not proxies:
        # Accepting a header from anyone would let any client choose its own address.
        raise ConfigError(
            f"{t.key('trusted_proxies')}: required with proxy_protocol = true "
            "(the networks of the proxies that may send the header)"
        )
    for key in ("trusted_proxies", "proxy_protocol_timeout"):
        if key in t.raw and not enabled:
            raise ConfigError(f"{t.key(key)}: only makes sense with proxy_protocol = true")
    return enabled, proxies, timeout


def _networks(t: _Table, key: str) -> NetworkList:
    """A list of CIDR networks or bare addresses; a bad entry is named with its index."""
    networks = []
    for index, entry in enumerate(t.str_list(key, ())):
        try:
            networks.append(parse_network(entry))
        except ValueError as e:
            raise ConfigError(f"{t.key(key)}[{index}]: {e}") from None
    return NetworkList(tuple(networks))


def _tls(t: _Table) -> TlsSettings:
    cert, key = t.path("certificate"), t.path("certificate_key")
    if (cert is None) != (key is None):
        raise ConfigError("[tls]: certificate and certificate_key go together")
    sni = tuple(
        SniCertificate(
            s.required("server_name", str),
            s.required_path("certificate"),
            s.required_path("certificate_key"),
        )
        for s in t.tables("sni")
    )
    settings = TlsSettings(
        certificate=cert,
        certificate_key=key,
        min_protocol=t.choice("min_protocol", ("TLSv1.2", "TLSv1.3"), "TLSv1.2"),
        ciphers=t.get("ciphers", str, None),
        sni=sni,
        handshake_timeout=t.timeout("handshake_timeout", 10.0),
        verify_client=t.choice("verify_client", ("off", "optional", "on"), "off"),
        client_certificate=t.path("client_certificate"),
    )
    if settings.verify_client != "off" and settings.client_certificate is None:
        raise ConfigError("tls.verify_client: needs tls.client_certificate (the CA to trust)")
    t.check_unknown()
    return settings


def _backend(t: _Table) -> BackendSettings:
    settings = BackendSettings(
        tls=BackendTLS(t.choice("tls", tuple(m.value for m in BackendTLS), "none")),
        verify=t.get("verify", bool, True),
        ca_file=t.path("ca_file"),
        server_name=t.get("server_name", str, None),
        forward_client=t.get("forward_client", bool, False),
        imap_auth=t.choice("imap_auth", ("login", "plain"), "login"),
        pop3_auth=t.choice("pop3_auth", ("user", "plain"), "user"),
        smtp_mode=t.choice("smtp_mode", ("xclient", "auth"), "xclient"),
        connect_timeout=t.timeout("connect_timeout", 5.0),
        login_timeout=t.timeout("login_timeout", 10.0),
    )
    t.check_unknown()
    return settings


def _auth_http(t: _Table) -> AuthHttpSettings:
    url = t.required("url", str)
    if "://" not in url:
        url = "http://" + url  # nginx accepts "127.0.0.1:80/auth"; so do we
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{t.key('url')}: must be an http:// or https:// URL")
    headers = t.get("header", dict, {})
    for name, value in headers.items():
        if not isinstance(value, str) or "\n" in value or "\r" in value or ":" in name:
            raise ConfigError(f"{t.key('header')}.{name}: must be a one-line string")
    settings = AuthHttpSettings(
        url=url,
        headers=tuple(headers.items()),
        timeout=t.timeout("timeout", 5.0),
        pass_client_cert=t.get("pass_client_cert", bool, False),
    )
    t.check_unknown()
    return settings


def _directory(t: _Table) -> DirectorySettings:
    url = t.required("url", str)
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        url = "sqlite:///" + str(t.base_dir / url.removeprefix("sqlite:///"))
    queries = None
    if "queries" in t.raw:
        q = t.table("queries")
        queries = DirectoryQueries(q.required("password", str), q.required("route", str))
        q.check_unknown()
    ports = dict(DEFAULT_PORTS)
    p = t.table("ports")
    for proto in PROTOCOLS:
        ports[proto] = p.port(proto, DEFAULT_PORTS[proto])
    p.check_unknown()
    master_password = t.get("master_password", str, None)
    settings = DirectorySettings(
        url=url,
        queries=queries,
        ports=ports,
        master_user=t.get("master_user", str, None),
        master_password=Secret(master_password) if master_password is not None else None,
        master_separator=t.get("master_separator", str, "*"),
        default_scheme=t.get("default_scheme", str, "PLAIN").upper(),
        cache_ttl=t.number("cache_ttl", 60.0),
        cache_size=t.integer("cache_size", 100_000),
        pool_size=t.integer("pool_size", 5),
        query_timeout=t.timeout("query_timeout", 3.0),
    )
    t.check_unknown()
    return settings


def _throttle(t: _Table) -> ThrottleSettings:
    d = ThrottleSettings()
    settings = ThrottleSettings(
        enabled=t.get("enabled", bool, d.enabled),
        free=t.integer("free", d.free),
        base_delay=t.number("base_delay", d.base_delay),
        max_delay=t.number("max_delay", d.max_delay),
        lockout_after=t.integer("lockout_after", d.lockout_after),
        lockout=t.number("lockout", d.lockout),
        window=t.timeout("window", d.window),
        per_ip_users=t.integer("per_ip_users", d.per_ip_users),
        concurrent_per_user=t.integer("concurrent_per_user", d.concurrent_per_user),
        concurrent_per_ip=t.integer("concurrent_per_ip", d.concurrent_per_ip),
    )
    t.seen.add("redis_url")  # an alias of [cluster] redis_url, read there
    for name in ("concurrent_per_user", "concurrent_per_ip"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{t.key(name)}: must be at least 1")
    t.check_unknown()
    return settings


def _limits(t: _Table) -> LimitsSettings:
    d = LimitsSettings()
    settings = LimitsSettings(
        handshakes=t.integer("handshakes", d.handshakes),
        handshakes_per_ip=t.integer("handshakes_per_ip", d.handshakes_per_ip),
        per_user=t.integer("per_user", d.per_user),
        per_user_ip=t.integer("per_user_ip", d.per_user_ip),
        per_ip=t.integer("per_ip", d.per_ip),
    )
    for name in ("handshakes", "handshakes_per_ip"):
        if getattr(settings, name) < 1:
            raise ConfigError(f"{t.key(name)}: must be at least 1")
    t.check_unknown()
    return settings


def _cluster(t: _Table, throttle_redis_url: object) -> ClusterSettings:
    d = ClusterSettings()
    url = t.get("redis_url", str, None)
    if url is None and throttle_redis_url is not None:  # [throttle] redis_url, the old name
        if not isinstance(throttle_redis_url, str):
            raise ConfigError("throttle.redis_url: must be str")
        url = throttle_redis_url
    if url is not None and not url.startswith(REDIS_SCHEMES):
        raise ConfigError(
            f"{t.key('redis_url')}: must be a URL starting with one of {', '.join(REDIS_SCHEMES)}"
        )
    settings = ClusterSettings(
        redis_url=url,
        node_name=t.get("node_name", str, d.node_name),
        lease=t.timeout("lease", d.lease),
        prefix=t.get("prefix", str, d.prefix),
        timeout=t.timeout("timeout", d.timeout),
        move_timeout=t.timeout("move_timeout", d.move_timeout),
        move_delay=t.number("move_delay", d.move_delay),
        move_parallel=t.integer("move_parallel", d.move_parallel),
    )
    for key in ("node_name", "prefix"):
        value = getattr(settings, key)
        if any(not c.isprintable() or c in " /{}" for c in value):
            raise ConfigError(f"{t.key(key)}: must be printable, without spaces, '/', '{{' or '}}'")
    if not settings.prefix:
        raise ConfigError(f"{t.key('prefix')}: must not be empty")
    if settings.move_parallel < 1:
        raise ConfigError(f"{t.key('move_parallel')}: must be at least 1")
    if url is not None:
        from mailgate.redisconn import RedisUrlError, parse_url

        try:
            parse_url(url)
        except RedisUrlError as e:
            raise ConfigError(f"{t.key('redis_url')}: {e}") from None
    t.check_unknown()
    return settings


def _health_listen(t: _Table) -> str | None:
    value: str | None = t.get("health_listen", str, None)
    if value is not None:
        parse_address(value, "health_listen")
    return value


def _auth_server(t: _Table) -> AuthServerSettings:
    headers = t.get("required_header", dict, {})
    settings = AuthServerSettings(
        listen=t.get("listen", str, "127.0.0.1:9000"),
        required_headers=tuple((k, str(v)) for k, v in headers.items()),
    )
    parse_address(settings.listen, t.key("listen"))
    t.check_unknown()
    return settings


def _oauth(t: _Table, *, needs_validation: bool) -> OAuthSettings:
    """[oauth]. With the directory, a token must be checkable: `audience` always (a token
    minted for another application of the same IdP must not log in), and `issuer` (JWTs) or
    introspection with its URL and client credentials (opaque tokens), or both."""

    def idp_url(key: str) -> str | None:
        """https, or http to a loopback address (an IdP on the same host, tests)."""
        value: str | None = t.get(key, str, None)
        if value is None:
            return None
        parts = urlsplit(value)
        host = parts.hostname or ""
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if parts.scheme == "http" and loopback:
            return value
        if parts.scheme != "https" or not host:
            raise ConfigError(f"{t.key(key)}: must be https:// (http only to a loopback address)")
        return value

    d = OAuthSettings()
    scope = t.get("scope", str, None)
    if scope is not None and (not scope.isprintable() or '"' in scope or "\\" in scope):
        raise ConfigError(f"{t.key('scope')}: must be printable, without quotes or backslashes")
    algorithms = t.str_list("algorithms", d.algorithms)
    for alg in algorithms:
        if alg.lower() == "none" or alg.upper().startswith("HS"):
            raise ConfigError(
                f"{t.key('algorithms')}: {alg!r} is never accepted (only asymmetric signatures)"
            )
        if alg not in OAUTH_ALGORITHMS:
            raise ConfigError(
                f"{t.key('algorithms')}: must be some of {', '.join(OAUTH_ALGORITHMS)}"
            )
    if not algorithms:
        raise ConfigError(f"{t.key('algorithms')}: must not be empty")
    secret = t.get("client_secret", str, None)
    claim = t.get("username_claim", str, d.username_claim)
    if not claim or not claim.isprintable():
        raise ConfigError(f"{t.key('username_claim')}: must be a claim name")
    settings = OAuthSettings(
        issuer=idp_url("issuer"),
        jwks_url=idp_url("jwks_url"),
        audience=t.get("audience", str, None),
        username_claim=claim,
        algorithms=algorithms,
        clock_skew=t.number("clock_skew", d.clock_skew),
        introspection_url=idp_url("introspection_url"),
        client_id=t.get("client_id", str, None),
        client_secret=Secret(secret) if secret is not None else None,
        timeout=t.timeout("timeout", d.timeout),
        jwks_cache=t.timeout("jwks_cache", d.jwks_cache),
        introspection_cache=t.number("introspection_cache", d.introspection_cache),
        max_token=t.integer("max_token", d.max_token),
        scope=scope,
        ca_file=t.path("ca_file"),
    )
    t.check_unknown()
    if not 1024 <= settings.max_token <= 1024 * 1024:
        raise ConfigError(f"{t.key('max_token')}: must be from 1024 to 1048576 bytes")
    if settings.jwks_url is not None and settings.issuer is None:
        raise ConfigError(f"{t.key('issuer')}: required with jwks_url (every token's iss)")
    if needs_validation and settings.audience is None:
        raise ConfigError(
            f"{t.key('audience')}: required (the client id, or the audience a mapper adds):"
            " without it a token the issuer made for any other application would log in"
        )
    if settings.introspection_url is not None and (
        settings.client_id is None or settings.client_secret is None
    ):
        raise ConfigError(f"{t.key('introspection_url')}: needs client_id and client_secret")
    if needs_validation and not settings.validates:
        raise ConfigError(
            "[oauth]: set issuer and audience (JWTs, keys from the issuer's JWKS) or"
            " introspection_url, client_id and client_secret (opaque tokens)"
        )
    return settings


def _workers(value: int | str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, int) and 1 <= value <= 256:
        return value
    raise ConfigError(f"workers: must be a number from 1 to 256 or 'auto', not {value!r}")


def _line(t: _Table, key: str, default: str) -> str:
    value: str = t.get(key, str, default)
    if any(ord(c) < 32 or ord(c) > 126 for c in value):
        raise ConfigError(f"{t.key(key)}: must be printable ASCII on one line")
    return value


def parse_address(value: str, key: str) -> tuple[str, int]:
    """'127.0.0.1:143', '[::1]:143', '*:143' or ':143' -> (host, port).

    An empty host means every address; port 0 means any free port (tests).
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise ConfigError(f"{key}: expected host:port, got {value!r}")
    host = host.strip("[]")
    return ("" if host in ("*", "") else host), int(port_text)


# --- [[pool]]: mailstores with health checks ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolMemberSettings:
    name: str  # unique in its pool: what `mailgate backend down NAME` and metrics call it
    host: str
    ports: Mapping[str, int]  # every protocol's port: its own, the member's `port`, or default
    weight: float = 1.0  # share of users, relative to the other members


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """A pool of mailstores (backend/pools.py has the rules; docs/configuration.md each key)."""

    name: str
    members: tuple[PoolMemberSettings, ...]
    # Every member can serve every user (shared mailbox storage): a user goes to the first
    # member in their rendezvous order that takes logins. Without it, a user's member is
    # fixed and a member that is down means a fast temporary failure.
    shared_storage: bool = False
    tls: BackendTLS | None = None  # None: the route's, else [backend] tls
    # Active checks: connect, read the greeting (and TLS with check_tls). 0 turns them off.
    check_interval: float = 5.0
    check_timeout: float = 2.0
    check_tls: bool = False
    check_protocol: str = "imap"  # whose port and greeting the check uses
    # Consecutive failures (checks and temporary login failures alike) that mark it down.
    failures_to_down: int = 3
    # Circuit breaker: a down member gets one probe (a check or a login) after this long.
    half_open_after: float = 10.0
    # After an outage, new logins are let back in over this many seconds (a growing share
    # of users), so that every client waiting to reconnect does not arrive at once.
    reconnect_spread: float = 30.0
    # Dovecot's director: each user on one member at a time, chosen by weighted rendezvous
    # over the healthy members and remembered in Redis while the user has sessions and for
    # user_expire seconds after (director_user_expire: 15 min). Needs shared_storage.
    affinity: bool = False
    user_expire: float = 900.0


def _pools(t: _Table) -> tuple[PoolSettings, ...]:
    pools = tuple(_pool(pt) for pt in t.tables("pool"))
    names = [p.name for p in pools]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"pool {name!r}: two [[pool]] tables have this name")
    _check_shared_members(pools)
    return pools


def _pool(t: _Table) -> PoolSettings:
    name = t.required("name", str)
    if not name or not name.isprintable() or " " in name or "/" in name:
        raise ConfigError(f"{t.key('name')}: must be a word without spaces or '/'")
    raw_members = t.get("members", list, [])
    if not raw_members:
        raise ConfigError(f"{t.key('members')}: pool {name!r} has no members")
    members = tuple(
        _pool_member(raw, f"{t.key('members')}[{i}]", t.base_dir)
        for i, raw in enumerate(raw_members)
    )
    seen = [m.name for m in members]
    for member in seen:
        if seen.count(member) > 1:
            raise ConfigError(f"{t.key('members')}: two members are named {member!r}")
    tls = t.get("tls", str, None)
    if tls is not None and tls not in tuple(m.value for m in BackendTLS):
        raise ConfigError(f"{t.key('tls')}: must be one of none, starttls, implicit")
    failures = t.integer("failures_to_down", 3)
    if failures < 1:
        raise ConfigError(f"{t.key('failures_to_down')}: must be at least 1")
    settings = PoolSettings(
        name=name,
        members=members,
        shared_storage=t.get("shared_storage", bool, False),
        tls=BackendTLS(tls) if tls is not None else None,
        check_interval=t.number("check_interval", 5.0),
        check_timeout=t.timeout("check_timeout", 2.0),
        check_tls=t.get("check_tls", bool, False),
        check_protocol=t.choice("check_protocol", PROTOCOLS, "imap"),
        failures_to_down=failures,
        half_open_after=t.timeout("half_open_after", 10.0),
        reconnect_spread=t.number("reconnect_spread", 30.0),
        affinity=t.get("affinity", bool, False),
        user_expire=t.timeout("user_expire", 900.0),
    )
    if settings.affinity and not settings.shared_storage:
        raise ConfigError(
            f"{t.key('affinity')}: needs shared_storage = true (affinity chooses among members "
            "that can all serve every user)"
        )
    if "user_expire" in t.raw and not settings.affinity:
        raise ConfigError(f"{t.key('user_expire')}: only makes sense with affinity = true")
    t.check_unknown()
    return settings


def _pool_member(raw: Any, key: str, base_dir: Path) -> PoolMemberSettings:
    """`"host:port"`, `"host"`, or `{host, port | imap/pop3/smtp, weight, name}`."""
    if isinstance(raw, str):
        host, port = _member_address(raw, key)
        ports = {p: port or DEFAULT_PORTS[p] for p in PROTOCOLS}
        return PoolMemberSettings(raw if port else host, host, ports)
    m = _Table(raw, key, base_dir)
    host = m.required("host", str)
    if not host or not all(c.isalnum() or c in ".-_:" for c in host):
        raise ConfigError(f"{m.key('host')}: must be a host name or an address")
    base = m.port("port", 0) if "port" in m.raw else None
    ports = {p: m.port(p, base or DEFAULT_PORTS[p]) for p in PROTOCOLS}
    weight = m.get("weight", (int, float), 1)
    if not weight > 0:
        raise ConfigError(f"{m.key('weight')}: must be a positive number")
    first = base or next((ports[p] for p in PROTOCOLS if p in m.raw), None)
    default_name = _host_port(host, first) if first else host
    name = m.get("name", str, default_name)
    if not name or not name.isprintable() or " " in name or "/" in name:
        raise ConfigError(f"{m.key('name')}: must be a word without spaces or '/'")
    m.check_unknown()
    return PoolMemberSettings(name, host, ports, float(weight))


def _member_address(value: str, key: str) -> tuple[str, int | None]:
    """'10.0.0.5:143' -> ('10.0.0.5', 143); 'store1' -> ('store1', None); '[::1]:143'."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") if sep else "x"
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:  # a host name, an IPv4 address, or a bare IPv6 address
        host, port_text = value, ""
    if not host or (port_text and not port_text.isdigit()):
        raise ConfigError(f"{key}: expected host or host:port, got {value!r}")
    port = int(port_text) if port_text else None
    if port is not None and not 0 < port < 65536:
        raise ConfigError(f"{key}: {port} is not a port from 1 to 65535")
    return host, port


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _check_shared_members(pools: tuple[PoolSettings, ...]) -> None:
    """An address (host and port) may be a member of one pool only: an auth_http answer that
    names it must get one pool's rules."""
    owner: dict[tuple[str, int], str] = {}
    for pool in pools:
        for member in pool.members:
            for address in {(member.host, port) for port in member.ports.values()}:
                other = owner.setdefault(address, pool.name)
                if other != pool.name:
                    raise ConfigError(
                        f"pool {pool.name!r}: member {_host_port(*address)} is also in pool"
                        f" {other!r}; an address may be in one pool only"
                    )


def _check_pool_tls(settings: Settings) -> None:
    for pool in settings.pools:
        if pool.check_tls and (pool.tls or settings.backend.tls) is BackendTLS.NONE:
            raise ConfigError(
                f"pool {pool.name!r}: check_tls needs TLS towards the members"
                " (the pool's tls, or [backend] tls)"
            )


class _Table:
    """A TOML table that remembers its key path and which keys were read."""

    def __init__(self, raw: Any, path: str, base_dir: Path) -> None:
        if not isinstance(raw, Mapping):
            raise ConfigError(f"{path or 'top level'}: must be a table")
        self.raw, self.where, self.base_dir = raw, path, base_dir
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str, kind: Any, default: Any) -> Any:
        self.seen.add(name)
        if name not in self.raw:
            return default
        value = self.raw[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            names = " or ".join(k.__name__ for k in kinds)
            raise ConfigError(f"{self.key(name)}: must be {names}, not {value!r}")
        return value

    def required(self, name: str, kind: Any) -> Any:
        if name not in self.raw:
            raise ConfigError(f"{self.key(name)}: required")
        return self.get(name, kind, None)

    def number(self, name: str, default: float) -> float:
        value = self.get(name, (int, float), default)
        if value < 0:
            raise ConfigError(f"{self.key(name)}: must not be negative")
        return float(value)

    def timeout(self, name: str, default: float) -> float:
        """A duration that must be positive: a zero timeout would fail every wait."""
        value = self.number(name, default)
        if value <= 0:
            raise ConfigError(f"{self.key(name)}: must be a positive number of seconds")
        return value

    def integer(self, name: str, default: int) -> int:
        value: int = self.get(name, int, default)
        if value < 0:
            raise ConfigError(f"{self.key(name)}: must not be negative")
        return value

    def port(self, name: str, default: int) -> int:
        value = self.integer(name, default)
        if not 0 < value < 65536:
            raise ConfigError(f"{self.key(name)}: must be a port from 1 to 65535")
        return value

    def choice(self, name: str, options: tuple[str, ...], default: str | None) -> Any:
        value = self.get(name, str, default)
        if value is None:
            raise ConfigError(f"{self.key(name)}: required, one of {', '.join(options)}")
        if value not in options:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(options)}")
        return value

    def str_list(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, list(default))
        if not all(isinstance(v, str) and v and v.isprintable() for v in value):
            raise ConfigError(f"{self.key(name)}: must be a list of non-empty strings")
        return tuple(dict.fromkeys(value))

    def path(self, name: str) -> Path | None:
        value = self.get(name, str, None)
        return None if value is None else self.base_dir / value

    def required_path(self, name: str) -> Path:
        value = self.path(name)
        if value is None:
            raise ConfigError(f"{self.key(name)}: required")
        return value

    def table(self, name: str) -> _Table:
        self.seen.add(name)
        return _Table(self.raw.get(name, {}), self.key(name), self.base_dir)

    def tables(self, name: str) -> list[_Table]:
        self.seen.add(name)
        items = self.raw.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(f"{self.key(name)}: must be an array of tables ([[{name}]])")
        return [
            _Table(item, f"{self.key(name)}[{i}]", self.base_dir) for i, item in enumerate(items)
        ]

    def check_unknown(self) -> None:
        unknown = sorted(set(self.raw) - self.seen)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown setting")
