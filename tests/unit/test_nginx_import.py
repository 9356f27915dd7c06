"""nginx `mail {}` -> mailgate settings: the exact table and the exact notes.

The fixtures under tests/fixtures/nginx/ are realistic configs: the seed document's block,
a hosting provider's IMAP/POP3 front end split over includes with an SNI certificate, an
SMTP relay and submission setup behind HAProxy, and an older style with `ssl on`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailgate.nginx_conf import parse_text
from mailgate.nginx_import import Conversion, NginxImportError, convert, import_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nginx"


def fixture(name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Conversion, str]:
    """Convert fixtures/nginx/NAME/nginx.conf as `mailgate import-nginx nginx.conf` run
    there would; returns the conversion and the directory paths are made absolute with."""
    monkeypatch.chdir(FIXTURES / name)
    return import_file("nginx.conf"), str(FIXTURES / name)


def text(config: str) -> Conversion:
    return convert(parse_text(config, "t.conf"), base_dir=Path("/etc/nginx"))


def test_the_seed_documents_mail_block(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion, _ = fixture("seed", monkeypatch)
    assert conversion.config == {
        "imap": {"auth": ["plain", "login", "cram-md5"]},
        # nginx's POP3 "plain" is USER/PASS, AUTH PLAIN and AUTH LOGIN.
        "pop3": {"auth": ["user", "plain", "login", "apop", "cram-md5"]},
        "auth_http": {
            "url": "http://127.0.0.1:80/auth",
            "header": {"X-NGX-Auth-Key": "some secret"},
        },
    }
    assert conversion.notes == ()


def test_a_hosting_front_end_over_includes_with_sni(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion, d = fixture("sites", monkeypatch)
    assert conversion.config == {
        "workers": 4,
        "max_sessions": 2048,  # worker_connections 4096: two connections per session
        "hostname": "mail.example.net",
        "log_file": f"{d}/logs/mail.log",
        "log_level": "warning",
        "client_timeout": 60,
        "proxy_timeout": 1800,
        "listener": [
            {"protocol": "imap", "listen": "0.0.0.0:143", "tls": "starttls", "starttls_only": True},
            # listen 993 + listen [::]:993: one dual-stack listener
            {
                "protocol": "imap",
                "listen": "*:993",
                "tls": "implicit",
                "auth": ["login", "plain", "cram-md5"],
            },
            {"protocol": "pop3", "listen": "0.0.0.0:110", "tls": "starttls"},
            {
                "protocol": "pop3",
                "listen": "0.0.0.0:995",
                "tls": "implicit",
                "auth": ["user", "plain", "login", "apop", "cram-md5"],
            },
        ],
        "imap": {
            "capabilities": ["IMAP4rev1", "UIDPLUS", "IDLE", "NAMESPACE", "QUOTA"],
            "auth": ["plain", "login"],
        },
        "pop3": {
            "capabilities": ["TOP", "UIDL", "RESP-CODES"],
            "auth": ["user", "plain", "login", "apop"],
        },
        "tls": {
            "certificate": f"{d}/certs/mail.pem",
            "certificate_key": f"{d}/certs/mail.key",
            "min_protocol": "TLSv1.2",
            "ciphers": "ECDHE+AESGCM:ECDHE+CHACHA20",
            "sni": [
                {
                    "server_name": "imap.brand.example",
                    "certificate": f"{d}/certs/brand.pem",
                    "certificate_key": f"{d}/certs/brand.key",
                }
            ],
        },
        "auth_http": {
            "url": "http://127.0.0.1:9000/auth",
            "timeout": 5,
            "header": {"X-Auth-Key": 's3cret "quoted"', "X-Node": "$hostname"},
        },
    }
    assert conversion.notes == (
        "nginx.conf:31: ssl_session_cache: not configurable: OpenSSL's session defaults apply",
        "snippets/imap-auth.conf:1: imap_auth: nginx accepts the LOGIN command whatever "
        "imap_auth says: kept as 'login' (remove it to refuse)",
        "conf.d/10-imap.conf:17: listen: mailgate cannot listen on 10.0.0.2:993 beside the "
        "wildcard at conf.d/10-imap.conf:9 (nginx shares one socket): ignored, its clients "
        "get that listener's settings",
        'conf.d/10-imap.conf:19: server_name: mailgate has one hostname: "mail.example.net" '
        "from nginx.conf:17 is used",
        "conf.d/10-imap.conf:20: ssl_certificate: mailgate chooses certificates by SNI, not "
        "by listener: clients that do not ask for 'imap.brand.example' get [tls] certificate",
        "conf.d/20-pop3.conf:9: pop3_auth: method 'external' is not supported: left out",
        "conf.d/20-pop3.conf:10: ssl_certificate: a second certificate is chosen by SNI, and "
        "this server has no server_name of its own to choose it by: its clients get [tls] "
        "certificate",
    )


def test_smtp_relay_and_submission_behind_haproxy(monkeypatch: pytest.MonkeyPatch) -> None:
    conversion, d = fixture("submission", monkeypatch)
    relay = {"proxy_protocol": True, "tls": "starttls"}
    trusted = {"trusted_proxies": ["192.0.2.10/32", "2001:db8::/32"]}
    assert conversion.config == {
        "workers": 2,
        "max_sessions": 512,
        "hostname": "smtp.example.org",
        "listener": [
            {"protocol": "smtp", "listen": "0.0.0.0:25", **relay, **trusted},
            {"protocol": "smtp", "listen": "0.0.0.0:2525", **relay, **trusted},
            {
                "protocol": "smtp",
                "listen": "0.0.0.0:587",
                "tls": "starttls",
                "starttls_only": True,
                "auth": ["login", "plain"],
            },
            {
                "protocol": "smtp",
                "listen": "0.0.0.0:465",
                "tls": "implicit",
                "auth": ["login", "plain"],
            },
        ],
        "smtp": {
            "client_timeout": 300,
            "max_errors": 3,
            "capabilities": [
                "SIZE 52428800",
                "8BITMIME",
                "PIPELINING",
                "ENHANCEDSTATUSCODES",
                "DSN",
            ],
            "greeting_delay": 3,
            "auth": ["none"],  # the first server's; the others keep theirs per listener
        },
        "tls": {"certificate": f"{d}/certs/smtp.pem", "certificate_key": f"{d}/certs/smtp.key"},
        "auth_http": {"url": "http://auth.internal:8080/mail/auth", "pass_client_cert": False},
        "backend": {"smtp_mode": "xclient"},
    }
    also = "mailgate has one [smtp] {}: it applies also to the server at nginx.conf:{}, which"
    assert conversion.notes == (
        "nginx.conf:16: resolver: not needed: mailgate resolves names with the system resolver",
        "nginx.conf:17: resolver_timeout: not needed: mailgate resolves names with the system "
        "resolver",
        "nginx.conf:18: smtp_client_buffer: not configurable: mailgate reads SMTP command "
        "lines of up to 1024 bytes before login",
        f"nginx.conf:28: smtp_greeting_delay: {also.format('greeting_delay', 36)} does not "
        "set smtp_greeting_delay",
        f"nginx.conf:28: smtp_greeting_delay: {also.format('greeting_delay', 43)} does not "
        "set smtp_greeting_delay",
        f"nginx.conf:32: max_errors: {also.format('max_errors', 36)} does not set max_errors",
        f"nginx.conf:32: max_errors: {also.format('max_errors', 43)} does not set max_errors",
        f"nginx.conf:33: timeout: {also.format('client_timeout', 36)} does not set timeout",
        f"nginx.conf:33: timeout: {also.format('client_timeout', 43)} does not set timeout",
        "nginx.conf:40: limit_rate: unknown to mailgate: ignored",
        "nginx.conf:44: listen: parameter 'backlog=1024' is not supported: ignored",
        "nginx.conf:46: proxy_protocol: not supported: mailgate sends no PROXY header to "
        "backends ([backend] forward_client passes the client's address with IMAP ID / "
        "XCLIENT)",
    )


def test_an_older_config_with_ssl_on_and_inferred_protocols(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conversion, d = fixture("legacy", monkeypatch)
    assert conversion.config == {
        "workers": 1,
        "log_level": "info",
        "listener": [
            {"protocol": "imap", "listen": "127.0.0.1:143"},
            {"protocol": "pop3", "listen": "127.0.0.1:995", "tls": "implicit"},  # ssl on
            {"protocol": "smtp", "listen": "127.0.0.1:587", "tls": "starttls"},
            {"protocol": "imap", "listen": "127.0.0.1:1143", "tls": "starttls"},
        ],
        "imap": {"auth": ["plain", "login"]},
        "pop3": {"max_errors": 2},
        "smtp": {"client_timeout": 10, "auth": ["plain", "login", "cram-md5"]},
        "tls": {
            "certificate": f"{d}/legacy.pem",
            "certificate_key": f"{d}/legacy.key",
            "verify_client": "optional",
            "client_certificate": f"{d}/client-ca.pem",
        },
        "auth_http": {
            "url": "http://127.0.0.1:8000/auth",
            "pass_client_cert": True,
            "header": {"X-Secret": "b"},
        },
        "backend": {"smtp_mode": "auth"},  # xclient off; proxy_smtp_auth on
    }
    assert conversion.notes == (
        "nginx.conf:7: auth_http_header: mailgate sends a header once: the last value is kept",
        "nginx.conf:9: error_log: syslog: not supported: mailgate logs to stderr or a file",
        "nginx.conf:16: ssl_dhparam: not supported: key exchange is ECDHE (and TLS 1.3) only",
        "nginx.conf:17: imap_client_buffer: not configurable: mailgate reads command lines of "
        "up to 8192 bytes before login",
        "nginx.conf:20: imap_auth: nginx accepts the LOGIN command whatever imap_auth says: "
        "kept as 'login' (remove it to refuse)",
        "nginx.conf:22: proxy_timeout: a zero timeout would fail every wait: ignored",
        "nginx.conf:23: server: no protocol and no standard port to infer it from: server ignored",
        "nginx.conf:24: server: server with no usable listen: ignored",
        "nginx.conf:24: listen: unix sockets are not supported: ignored",
        "nginx.conf:25: ssl_verify_client: 'optional_no_ca' is not supported (on, off, "
        "optional): ignored",
    )


# --- single rules -----------------------------------------------------------------------------


def test_no_mail_block_is_an_error() -> None:
    with pytest.raises(NginxImportError, match="no mail"):
        text("http { server { listen 80; } }")


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("143", "0.0.0.0:143"),
        ("*:143", "0.0.0.0:143"),
        ("192.0.2.1:143", "192.0.2.1:143"),
        ("[::1]:143", "[::1]:143"),
        ("[::]:143", "[::]:143"),
        ("mail.example.com:143", "mail.example.com:143"),
    ],
)
def test_listen_forms(listen: str, expected: str) -> None:
    conversion = text(f"mail {{ auth_http a:1/x; server {{ listen {listen}; protocol imap; }} }}")
    assert conversion.config["listener"] == [{"protocol": "imap", "listen": expected}]
    assert conversion.notes == ()


def test_listen_without_port_and_duplicates_are_reported() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\n"
        "server { listen 127.0.0.1; listen 143; protocol imap; }\n"
        "server { listen *:143; protocol imap; }\n}"
    )
    assert conversion.config["listener"] == [{"protocol": "imap", "listen": "0.0.0.0:143"}]
    assert conversion.notes == (
        "t.conf:2: listen: '127.0.0.1' has no port: ignored",
        "t.conf:3: listen: duplicate listen (first at t.conf:2): ignored",
    )


def test_a_specific_address_before_its_wildcard_gives_way() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\n"
        "server { listen 192.0.2.1:143; protocol imap; imap_auth login plain cram-md5; }\n"
        "server { listen 143; protocol imap; }\n}"
    )
    assert conversion.config["listener"] == [{"protocol": "imap", "listen": "0.0.0.0:143"}]
    assert conversion.notes[0].startswith(
        "t.conf:2: listen: mailgate cannot listen on 192.0.2.1:143 beside the wildcard at t.conf:3"
    )


def test_the_protocol_is_inferred_from_the_port_as_nginx_does() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\n"
        + "".join(f"server {{ listen {p}; }}\n" for p in (143, 993, 110, 995, 25, 465, 587))
        + "}"
    )
    assert [lst["protocol"] for lst in conversion.config["listener"]] == [
        "imap",
        "imap",
        "pop3",
        "pop3",
        "smtp",
        "smtp",
        "smtp",
    ]


@pytest.mark.parametrize(
    ("versions", "expected", "notes"),
    [
        ("TLSv1.2 TLSv1.3", "TLSv1.2", []),
        ("TLSv1.3", "TLSv1.3", []),
        ("TLSv1.2", "TLSv1.2", ["mailgate offers TLSv1.3 too: it sets only the lowest version"]),
        (
            "TLSv1 TLSv1.1 TLSv1.2 TLSv1.3",
            "TLSv1.2",
            ["TLSv1 TLSv1.1 not offered: mailgate's lowest is TLSv1.2 (RFC 8996)"],
        ),
        ("TLSv1", None, ["TLSv1 not offered: mailgate's lowest is TLSv1.2 (RFC 8996)",
                          "no TLSv1.2 or TLSv1.3: mailgate's default (TLSv1.2) is kept"]),
    ],
)  # fmt: skip
def test_ssl_protocols_become_the_lowest_version(
    versions: str, expected: str | None, notes: list[str]
) -> None:
    conversion = text(
        "mail { auth_http a:1/x; ssl_certificate c.pem; ssl_certificate_key c.key;\n"
        f"ssl_protocols {versions};\nserver {{ listen 993 ssl; }} }}"
    )
    assert conversion.config["tls"].get("min_protocol") == expected
    assert list(conversion.notes) == [f"t.conf:2: ssl_protocols: {n}" for n in notes]


@pytest.mark.parametrize(
    ("directives", "backend", "note"),
    [
        ("", {"smtp_mode": "xclient"}, None),
        ("xclient on;", {"smtp_mode": "xclient"}, None),
        ("xclient off; proxy_smtp_auth on;", {"smtp_mode": "auth"}, None),
        (
            "proxy_smtp_auth on;",
            {"smtp_mode": "auth", "forward_client": True},
            "t.conf:2: proxy_smtp_auth: XCLIENT before AUTH needs [backend] forward_client",
        ),
        (
            "xclient off;",
            {"smtp_mode": "xclient"},
            "t.conf:2: xclient: mailgate logs in to SMTP backends with XCLIENT or AUTH",
        ),
    ],
    ids=["default", "xclient on", "auth instead", "xclient and auth", "neither"],
)
def test_xclient_and_proxy_smtp_auth_choose_the_smtp_mode(
    directives: str, backend: dict[str, Any], note: str | None
) -> None:
    conversion = text(f"mail {{ auth_http a:1/x;\n{directives}\nserver {{ listen 25; }} }}")
    assert conversion.config["backend"] == backend
    assert len(conversion.notes) == (1 if note else 0)
    assert all(n.startswith(note or "") for n in conversion.notes)


def test_no_smtp_server_means_no_backend_section() -> None:
    assert "backend" not in text("mail { auth_http a:1/x; server { listen 143; } }").config


def test_server_level_headers_replace_the_mail_level_list_as_in_nginx() -> None:
    conversion = text(
        "mail { auth_http a:1/x; auth_http_header A 1; auth_http_header B 2;\n"
        "server { listen 143; auth_http_header C 3; }\nserver { listen 110; } }"
    )
    assert conversion.config["auth_http"]["header"] == {"C": "3"}
    # The second server inherits A and B; mailgate sends one list: the note is on A.
    assert conversion.notes == (
        "t.conf:1: auth_http_header: mailgate has one [auth_http] header: "
        '{"C": "3"} from t.conf:2 is used',
    )


def test_servers_that_disagree_on_a_global_setting_are_reported() -> None:
    conversion = text(
        "mail {\n"
        "server { listen 143; auth_http a:1/one; auth_http_timeout 3s; }\n"
        "server { listen 110; auth_http a:1/two; auth_http_timeout 3000ms; }\n}"
    )
    assert conversion.config["auth_http"] == {"url": "http://a:1/one", "timeout": 3}
    assert conversion.notes == (
        't.conf:3: auth_http: mailgate has one [auth_http] url: "http://a:1/one" from '
        "t.conf:2 is used",
    )


def test_per_protocol_values_and_the_top_level_default() -> None:
    conversion = text(
        "mail { auth_http a:1/x; timeout 20s; proxy_timeout 2h; max_errors 4;\n"
        "server { listen 143; }\n"
        "server { listen 110; timeout 1m30s; }\n"
        "server { listen 25; proxy_timeout 10m; max_errors 4; } }"
    )
    config = conversion.config
    assert (config["client_timeout"], config["proxy_timeout"], config["max_errors"]) == (
        20,
        7200,
        4,
    )
    assert "imap" not in config
    assert config["pop3"] == {"client_timeout": 90}
    assert config["smtp"] == {"proxy_timeout": 600}
    assert conversion.notes == ()


def test_auth_methods_nginx_accepts_always_and_those_mailgate_lacks() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\nimap_auth cram-md5 external;\npop3_auth apop;\n"
        "smtp_auth none external;\nserver { listen 143; } }"
    )
    assert conversion.config["imap"] == {"auth": ["cram-md5", "login"]}
    assert conversion.config["pop3"] == {"auth": ["apop", "user"]}
    assert conversion.config["smtp"] == {"auth": ["none"]}
    assert conversion.notes == (
        "t.conf:2: imap_auth: method 'external' is not supported: left out",
        "t.conf:2: imap_auth: nginx accepts the LOGIN command whatever imap_auth says: kept "
        "as 'login' (remove it to refuse)",
        "t.conf:3: pop3_auth: nginx accepts USER/PASS whatever pop3_auth says: kept as 'user' "
        "(remove it to refuse)",
        "t.conf:4: smtp_auth: method 'external' is not supported: left out",
    )


def test_client_certificates_and_their_ca() -> None:
    conversion = text(
        "mail { auth_http a:1/x; ssl_certificate c.pem; ssl_certificate_key c.key;\n"
        "ssl_verify_client on;\nssl_trusted_certificate /etc/ssl/clients.pem;\n"
        "server { listen 993 ssl; } }"
    )
    assert conversion.config["tls"] == {
        "certificate": "/etc/nginx/c.pem",
        "certificate_key": "/etc/nginx/c.key",
        "verify_client": "on",
        "client_certificate": "/etc/ssl/clients.pem",
    }
    missing = text(
        "mail { auth_http a:1/x; ssl_certificate c.pem; ssl_certificate_key c.key;\n"
        "ssl_verify_client on;\nserver { listen 993 ssl; } }"
    )
    assert missing.notes == (
        "t.conf:2: ssl_verify_client: needs ssl_client_certificate (the CA to trust): "
        "mailgate check fails",
    )


def test_tls_without_a_certificate_and_servers_without_auth_http_are_reported() -> None:
    conversion = text("mail {\nserver { listen 993 ssl; }\n}")
    assert conversion.notes == (
        "t.conf:1: mail: no auth_http: mailgate check fails until [auth_http] or [directory] "
        "is configured",
        "t.conf:2: server: TLS without ssl_certificate: mailgate check fails",
    )


def test_proxy_protocol_needs_trusted_proxies_and_set_real_ip_from_needs_it() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\nset_real_ip_from 10.0.0.0/8;\n"
        "server { listen 143; }\nserver {\nlisten 110 proxy_protocol;\nset_real_ip_from host; } }"
    )
    assert conversion.config["listener"] == [
        {"protocol": "imap", "listen": "0.0.0.0:143"},
        {"protocol": "pop3", "listen": "0.0.0.0:110", "proxy_protocol": True},
    ]
    assert conversion.notes == (
        "t.conf:2: set_real_ip_from: ignored: it applies only to listen ... proxy_protocol",
        "t.conf:6: set_real_ip_from: 'host' is not an address or CIDR: ignored",
    )


def test_directives_in_the_wrong_place_and_unknown_blocks() -> None:
    conversion = text(
        "mail { auth_http a:1/x;\nlisten 143;\nupstream x { server a; }\n"
        "server { listen 143; location / { } }\nmail_thing on;\n}\nmail { }"
    )
    assert conversion.notes == (
        "t.conf:2: listen: only valid inside server {}: ignored",
        "t.conf:3: upstream: unexpected block: ignored",
        "t.conf:4: location: unexpected block: ignored",
        "t.conf:5: mail_thing: unknown to mailgate: ignored",
        "t.conf:7: mail: a second mail {} block (nginx refuses it): ignored",
    )


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("30", 30), ("30s", 30), ("1m", 60), ("1m30s", 90), ("1h 30m", 5400), ("1500ms", 1.5)],
)
def test_nginx_times(value: str, seconds: float) -> None:
    conversion = text(f'mail {{ auth_http a:1/x; timeout "{value}"; }}')
    assert conversion.config["client_timeout"] == seconds


def test_a_bad_time_is_reported() -> None:
    conversion = text("mail { auth_http a:1/x;\ntimeout soon; }")
    assert "client_timeout" not in conversion.config
    assert conversion.notes == ("t.conf:2: timeout: 'soon' is not an nginx time: ignored",)
