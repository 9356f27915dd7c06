"""Every SSLContext mailgate uses is built here, once, at start.

Server side: one context per listener set, with SNI choosing among extra certificates.
Backend side: a client context that verifies the mailstore's certificate unless the
operator turns verification off (nginx cannot do TLS to the backend at all).
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

from mailgate.config import BackendSettings, ConfigError, TlsSettings
from mailgate.values import TlsInfo

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}


def _server_base(settings: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[settings.min_protocol]
    if settings.ciphers:
        ctx.set_ciphers(settings.ciphers)
    # No renegotiation (a DoS lever), no compression (CRIME), server picks the cipher.
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if settings.verify_client != "off" and settings.client_certificate is not None:
        ca = settings.client_certificate
        try:
            ctx.load_verify_locations(cafile=str(ca))
        except (OSError, ssl.SSLError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"tls.client_certificate: cannot load {ca}: {reason}") from None
        required = settings.verify_client == "on"
        ctx.verify_mode = ssl.CERT_REQUIRED if required else ssl.CERT_OPTIONAL
    return ctx


def server_context(settings: TlsSettings) -> ssl.SSLContext | None:
    """The listeners' context, or None when no certificate is configured."""
    if settings.certificate is None or settings.certificate_key is None:
        return None
    ctx = _server_base(settings)
    _load(ctx, settings.certificate, settings.certificate_key, "tls")
    by_name: dict[str, ssl.SSLContext] = {}
    for i, sni in enumerate(settings.sni):
        extra = _server_base(settings)
        _load(extra, sni.certificate, sni.certificate_key, f"tls.sni[{i}]")
        by_name[sni.server_name.lower()] = extra
    if by_name:

        def choose(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
            chosen = by_name.get((name or "").lower())
            if chosen is not None:
                sslobj.context = chosen

        ctx.sni_callback = choose
    return ctx


def _load(ctx: ssl.SSLContext, cert: Path, key: Path, where: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"{where}.certificate: cannot load {cert} / {key}: {reason}") from None


def backend_context(settings: BackendSettings) -> ssl.SSLContext:
    cafile = str(settings.ca_file) if settings.ca_file else None
    try:
        ctx = ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"backend.ca_file: cannot load {cafile}: {reason}") from None
    if not settings.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_info(transport: asyncio.BaseTransport) -> TlsInfo | None:
    """What auth_http's Auth-SSL-* headers need, read off a TLS transport."""
    sslobj: Any = transport.get_extra_info("ssl_object")
    if sslobj is None:
        return None
    cipher = sslobj.cipher()
    der = sslobj.getpeercert(binary_form=True)
    if not der:
        return TlsInfo(protocol=sslobj.version() or "", cipher=cipher[0] if cipher else "")
    cert = sslobj.getpeercert() or {}
    return TlsInfo(
        protocol=sslobj.version() or "",
        cipher=cipher[0] if cipher else "",
        client_verify="SUCCESS",
        client_subject=_dn(cert.get("subject", ())),
        client_issuer=_dn(cert.get("issuer", ())),
        client_serial=cert.get("serialNumber"),
        client_fingerprint=hashlib.sha1(der).hexdigest(),  # noqa: S324 - nginx sends SHA-1
        client_cert_pem=ssl.DER_cert_to_PEM_cert(der),
    )


# RFC 4514 short names, as nginx's $ssl_client_s_dn spells them.
_SHORT = {
    "commonName": "CN",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "stateOrProvinceName": "ST",
    "localityName": "L",
    "domainComponent": "DC",
    "streetAddress": "STREET",
    "userId": "UID",
}


def _dn(rdns: Any) -> str:
    """A distinguished name in RFC 4514 form, most specific first (CN=alice,O=Example)."""
    return ",".join(f"{_SHORT.get(k, k)}={_escape_dn(v)}" for rdn in reversed(rdns) for k, v in rdn)


def _escape_dn(value: str) -> str:
    for c in '\\,+"<>;=':
        value = value.replace(c, "\\" + c)
    return value
