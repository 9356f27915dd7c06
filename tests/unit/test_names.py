"""names.normalise: one spelling per name, refusals with messages that never quote the name."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailgate import names
from mailgate.names import BadName, normalise, normalise_domain, split

ONE_NAME = [
    "victim@example.com",
    "victim@example.com   ",
    "\tvictim@example.com\t ",
    "VICTIM@Example.COM",
    "victim@example.coM ",
    "Victim@EXAMPLE.com",
]


@pytest.mark.parametrize("spelling", ONE_NAME)
def test_case_and_surrounding_blanks_make_one_name(spelling: str) -> None:
    assert normalise(spelling) == "victim@example.com"


def test_nfc_joins_decomposed_spellings_and_accents_stay_significant() -> None:
    decomposed, precomposed = "vi\u0308ctim@example.com", "v\u00efctim@example.com"
    assert normalise(decomposed) == normalise(precomposed.upper()) == precomposed
    assert normalise(precomposed) != normalise("victim@example.com")
    assert normalise("Stra\u00dfe@example.com") == "stra\u00dfe@example.com"  # no casefold to ss
    assert normalise("\u0130@example.com") == "i\u0307@example.com"  # lower() may decompose


def test_inner_spaces_are_kept_not_collapsed() -> None:
    assert normalise('"john  smith"@example.com') == '"john  smith"@example.com'
    assert normalise("a b@example.com") != normalise("ab@example.com")


def test_local_case_is_kept_when_asked() -> None:
    assert normalise("Fred@EXAMPLE.com ", lower_local=False) == "Fred@example.com"
    assert normalise("FRED", lower_local=False) == "FRED"
    assert normalise("FRED") == "fred"


@pytest.mark.parametrize(
    "domain",
    ["xn--bcher-kva.example", "XN--BCHER-KVA.EXAMPLE", "B\u00dcCHER.example", "bu\u0308cher.x"],
)
def test_a_labels_and_u_labels_are_one_domain_spelled_in_unicode(domain: str) -> None:
    expected = "b\u00fccher." + domain.rpartition(".")[2].lower()
    assert normalise("leser@" + domain) == "leser@" + expected
    assert normalise_domain(domain) == expected


@pytest.mark.parametrize(
    "domain",
    [
        "xn--abc-.example",  # decodes to plain ASCII: not an A-label
        "xn--.example",
        "xn--bcher-kvb.example",  # not the A-label of a lower-case NFC label
        "xn--b\u00fccher.example",  # not ASCII after xn--
        "xn--ab-h1t.example",  # "ab" + a zero-width space
    ],
)
def test_bad_a_labels_are_refused(domain: str) -> None:
    with pytest.raises(BadName, match="xn--"):
        normalise("leser@" + domain)


REFUSED = {
    "vi\u200bctim@example.com": "format",  # zero-width space
    "victim\u200d@example.com": "format",  # zero-width joiner
    "victim@exam\u202eelp.com": "format",  # right-to-left override
    "victim@example.com\ufeff": "format",  # BOM
    "victim\u00ad@example.com": "format",  # soft hyphen
    "victim@example.com\u00a0": "non-ASCII space",
    "victim\u3000@example.com": "non-ASCII space",
    "victim@example.com\u2028": "line separator",
    "victim@example.com\r\nX-Injected: 1": "control",
    "vic\ttim@example.com": "control",
    "victim\x00@example.com": "control",
    "victim\x7f@example.com": "control",
    "victim\x85@example.com": "control",  # C1 NEL
    "victim\ue000@example.com": "private-use",
    "victim\U000e0001@example.com": "format",  # language tag
    "\udcffvictim@example.com": "not UTF-8",  # a byte surrogateescape carried
}


@pytest.mark.parametrize(("name", "kind"), REFUSED.items())
def test_invisible_control_and_non_utf8_characters_are_refused(name: str, kind: str) -> None:
    with pytest.raises(BadName, match=kind) as refused:
        normalise(name)
    assert name.strip() not in str(refused.value)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        (" \t ", "empty"),
        ("@example.com", "empty local part"),
        ("victim@", "empty local part or domain"),
        ("x" * 65 + "@example.com", "local part longer than 64 octets"),
        ("\u00e9" * 33 + "@example.com", "local part longer than 64 octets"),  # 66 octets
        ("x" * 65, "local part longer than 64 octets"),  # a name without @ is a local part
        ("x@" + "a." * 127 + "ab", "domain longer than 255 octets"),
        ("x" * 10_000, "characters"),  # refused before any Unicode work
    ],
)
def test_empty_and_overlong_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(BadName, match=why) as refused:
        normalise(name)
    assert len(str(refused.value)) < 80  # never the name itself


def test_the_longest_names_rfc_5321_allows_pass() -> None:
    local, domain = "x" * 64, ".".join(["a" * 63] * 3) + "." + "b" * 61
    assert len(domain) == 253
    assert normalise(f"{local}@{domain}") == f"{local}@{domain}"


def test_split() -> None:
    assert split("a@b@example.com") == ("a@b", "example.com")
    assert split("alice") == ("alice", "")


# A mix of what clients send and what attackers try: ASCII, letters with accents (both
# forms), combining marks, invisible and control characters, @ and blanks.
NAME_TEXT = st.text(
    alphabet=st.sampled_from(
        "aZz09.+-_@ \t\u00e9\u00ef\u0308\u0301\u00c5\u212b\u0130\u00df\u200b\u00a0\x00\r"
        "\u202e\u3000\ufeff\u4e2d\udcff"
    )
    | st.characters(),
    max_size=40,
)


@given(NAME_TEXT)
def test_normalising_twice_changes_nothing_and_only_badname_escapes(raw: str) -> None:
    try:
        once = normalise(raw)
    except BadName:
        return
    assert normalise(once) == once
    assert once == unicodedata.normalize("NFC", once)
    assert once == once.strip(names.TRIM)
    assert all(unicodedata.category(c)[0] != "C" for c in once)
    assert split(once)[1] == split(once)[1].lower()


@given(NAME_TEXT)
def test_padded_and_decomposed_spellings_normalise_alike(raw: str) -> None:
    try:
        expected = normalise(raw)
    except BadName:
        return
    for variant in (" " + raw + "\t ", unicodedata.normalize("NFD", raw)):
        assert normalise(variant) == expected
