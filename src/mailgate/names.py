"""Login names, normalised once: the one spelling of a name that every stage compares.

A client may type `Victim@Example.COM `, `victim@example.com` or a decomposed `vi\u0308ctim`,
and a database compares names with a collation of its own (MariaDB's default ignores trailing
spaces, case and accents; `utf8mb4_unicode_ci` even ignores a zero-width space). If the
throttle, the route cache and the directory each had their own idea of "the same name", an
attacker could spend one budget per spelling. So a name is normalised here, once, and the
result is what lookups bind, what admin stores and what counters count.

The rules, in order:

1. **Trim**: spaces (U+0020) and tabs at either end are removed. Spaces inside are kept as they
   are, not collapsed: RFC 5321 allows them in a quoted local part, and collapsing would make
   two names one that a database keeps apart. No other white space is accepted (rule 3).
2. **UTF-8 only**: a name carrying bytes that were not UTF-8 (decoded with `surrogateescape`,
   so they show as lone surrogates) is refused.
3. **No invisible or control characters**: controls (C0, DEL, C1), format characters
   (zero-width space and joiners, bidi overrides, soft hyphen, BOM), private-use and unassigned
   code points, line and paragraph separators, and every space but U+0020 (no-break space,
   ideographic space ...) are refused: each makes two names look alike, and no mail system
   issues such names (RFC 8265's identifier classes refuse them too).
4. **Unicode NFC**, so a decomposed `vi\u0308ctim` is the precomposed `vïctim` (which is still
   a different name from `victim`: accents are significant).
5. **The domain** (after the last `@`) is always lower-cased, and written with U-labels: an
   A-label (`xn--bcher-kva`) is decoded, so `bücher.example` and `xn--bcher-kva.example` are
   one domain, spelled `bücher.example`. Unicode is the form chosen because the local part of an
   internationalised address is UTF-8 anyway (RFC 6531), it is what users type and what
   `mailgate user list` should show. An `xn--` label that is not the exact A-label of a
   lower-case NFC label is refused rather than guessed at.
6. **The local part** is lower-cased when `lower_local` (mailgate's own schema does, as
   Dovecot's `auth_username_format = %Lu` does); otherwise its case is kept for the database
   to judge (an operator's schema).
7. **Length** in UTF-8 octets (RFC 5321 4.5.3.1): local part at most 64, domain at most 255; a
   name without `@` is a local part. An `@` with nothing before or after it is refused.

`BadName` messages never quote the name: it may be hostile (CR LF for a log, a megabyte).
This module imports only the standard library.
"""

from __future__ import annotations

import unicodedata

__all__ = ["MAX_DOMAIN", "MAX_LOCAL", "BadName", "normalise", "normalise_domain", "split"]

MAX_LOCAL = 64  # RFC 5321 4.5.3.1.1, octets
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2, octets
# Anything longer cannot become a valid name, so it is refused before any Unicode work: a
# name of 64 + 1 + 255 octets has at most that many characters.
MAX_CHARS = MAX_LOCAL + 1 + MAX_DOMAIN
TRIM = " \t"
ACE_PREFIX = "xn--"  # RFC 5890: the prefix of an A-label
# General categories refused anywhere in a name (rule 3); Zs is refused except U+0020.
_REFUSED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class BadName(ValueError):
    """A login name refused before any lookup; the message is safe to log (it has no name)."""


def normalise(raw: str, *, lower_local: bool = True) -> str:
    """The normalised form of a login name (see the module's rules), or raise BadName."""
    name = _clean(raw)
    local, at, domain = name.rpartition("@")
    if not at:
        return _local(name, lower_local)
    if not local or not domain:
        raise BadName("user name with an empty local part or domain")
    return f"{_local(local, lower_local)}@{_domain(domain)}"


def normalise_domain(raw: str) -> str:
    """A domain name alone (admin's `domain add`), by the same rules as a name's domain."""
    name = _clean(raw)
    if not name:
        raise BadName("empty domain")
    return _domain(name)


def split(name: str) -> tuple[str, str]:
    """(local part, domain) of a normalised name; the domain is "" when there is none."""
    local, at, domain = name.rpartition("@")
    return (local, domain) if at else (name, "")


def _clean(raw: str) -> str:
    if len(raw) > MAX_CHARS + 64:  # generous room for trimmed blanks, still a hard cap
        raise BadName(f"user name of {len(raw)} characters")
    name = raw.strip(TRIM)
    if not name:
        raise BadName("empty user name")
    if name.isascii() and name.isprintable():
        return name  # the common case: no refused character, and NFC changes nothing
    _check_characters(name)
    return unicodedata.normalize("NFC", name)


def _check_characters(text: str) -> None:
    for position, char in enumerate(text):
        category = unicodedata.category(char)
        if category in _REFUSED or (category == "Zs" and char != " "):
            # The category and position say what is wrong without repeating the name.
            if category == "Cs":
                raise BadName(f"user name that is not UTF-8 (at position {position})")
            kind = _KINDS.get(category, category)
            raise BadName(f"user name with a {kind} character at position {position}")


_KINDS = {
    "Cc": "control",
    "Cf": "format (invisible)",
    "Co": "private-use",
    "Cn": "unassigned",
    "Zl": "line separator",
    "Zp": "paragraph separator",
    "Zs": "non-ASCII space",
}


def _lower(text: str) -> str:
    # lower(), not casefold(): casefold turns "ß" into "ss", merging names a mailbox keeps
    # apart. NFC again because lower-casing may decompose ("İ" -> "i" + U+0307).
    lowered = text.lower()
    return lowered if lowered.isascii() else unicodedata.normalize("NFC", lowered)


def _local(local: str, lower: bool) -> str:
    local = _lower(local) if lower else local
    if len(local.encode("utf-8")) > MAX_LOCAL:
        raise BadName(f"local part longer than {MAX_LOCAL} octets")
    return local


def _domain(domain: str) -> str:
    domain = _lower(domain)
    if ACE_PREFIX in domain:
        domain = ".".join(_u_label(label) for label in domain.split("."))
    if len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise BadName(f"domain longer than {MAX_DOMAIN} octets")
    return domain


def _u_label(label: str) -> str:
    """A lower-cased label as a U-label: an A-label is decoded, and must round-trip."""
    if not label.startswith(ACE_PREFIX):
        return label
    try:
        decoded = label[len(ACE_PREFIX) :].encode("ascii").decode("punycode")
    except UnicodeError:
        raise BadName("domain label 'xn--...' is not valid punycode") from None
    try:
        _check_characters(decoded)
    except BadName:
        raise BadName("domain label 'xn--...' decodes to a refused character") from None
    u_label = _lower(unicodedata.normalize("NFC", decoded))
    if u_label.isascii() or ACE_PREFIX + u_label.encode("punycode").decode("ascii") != label:
        raise BadName("domain label 'xn--...' is not the A-label of a normalised U-label")
    return u_label
