"""Normalization: Unicode tricks, placeholders, personalization removal, words."""

from __future__ import annotations

import re
import sys
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint import normalize as n
from mailguard.core.fingerprint.normalize import (
    EMAIL,
    NUM,
    clean,
    normalize_text,
    recipient_terms,
    reference_clean,
    tokens,
    url_shape,
    words_and_links,
)


def test_case_width_and_compatibility_forms() -> None:
    fullwidth = "\uff37\uff4f\uff52\uff4c\uff44"
    fraktur = "\u210c\U0001d522\U0001d529\U0001d529\U0001d52c"
    text = f"HELLO {fullwidth} \ufb01ne {fraktur} Stra\u00dfe"
    assert tokens(text) == ["hello", "world", "fine", "hello", "strasse"]


def test_invisible_characters_are_removed_not_spaced() -> None:
    assert tokens("Vi\u200bag\u00adra fr\u200dee\ufeff o\u2060ffer") == ["viagra", "free", "offer"]
    assert tokens("tag\U000e0041\U000e0042s") == ["tags"]


def test_diacritics_and_zalgo() -> None:
    assert tokens("café naïve V̈ỉą̷g̴r̵a") == ["cafe", "naive", "viagra"]


def test_homoglyphs() -> None:
    cyrillic = "\u0420\u0430\u0443\u0420\u0430l \u0441\u043e\u0440y"  # "PayPal copy"
    greek = "\u0391\u039c\u0391\u0396\u039f\u039d"  # "AMAZON" in Greek capitals
    assert tokens(f"{cyrillic} {greek}") == ["paypal", "copy", "amazon"]
    assert tokens("\u0397ello \u03b7ot") == ["hello", "not"]  # capital eta is H, small eta is n


def test_typographic_punctuation_separates() -> None:
    typographic = "it\u2019s \u201cquoted\u201d \u2014 done\u2026 ok"
    assert tokens(typographic) == ["it", "s", "quoted", "done", "ok"]
    assert tokens('it\'s "quoted" - done... ok') == ["it", "s", "quoted", "done", "ok"]


def test_numbers_dates_times_and_random_tokens() -> None:
    text = "Order #12,345.67 on 2024-05-01 at 12:30pm, code a8f3k2j9d8s7f6g5, ref X7 or 3rd"
    assert tokens(text) == [
        "order", NUM, "on", NUM, "at", NUM, "code", NUM, "ref", NUM, "or", NUM,
    ]  # fmt: skip
    assert tokens("١٢٣ ٤٥") == [NUM, NUM]  # other scripts' digits too


def test_email_addresses() -> None:
    assert tokens("Write to John.Smith+news@mail.example.com today") == [
        "write",
        "to",
        EMAIL,
        "today",
    ]
    assert tokens("a@b is no address, x@y.z is") == ["a", "b", "is", "no", "address", EMAIL, "is"]


@pytest.mark.parametrize(
    ("url", "shape"),
    [
        (
            "https://www.Shop.Example.com/offers/spring?u=8f3a&utm=mail",
            "shop.example.com/offers/spring",
        ),
        ("http://news.example/u/a8F3k2J9d8", "news.example/u/X"),
        ("https://click.example/ls/click?upn=abcdef#frag", "click.example/ls/click"),
        ("https://u123.mailer.example/o/open.gif", "X.mailer.example/o/open.gif"),
        ("https://user:pw@host.example:8080/a/b/c/d/e/f", "host.example/a/b/c/d"),
        ("https://[2001:db8::1]/x", "X/x"),
        ("https://example.org/aaaaaaaaaaaaaaaaaaaaaaaaaaaaa/", "example.org/X"),
        ("www.example.org/path.", "example.org/path"),
    ],
)
def test_url_shapes(url: str, shape: str) -> None:
    assert url_shape(clean(url)) == shape


def test_urls_become_one_word_each() -> None:
    text = "See https://shop.example/a?x=1, www.shop.example/b and (https://x.example/c)."
    assert tokens(text) == [
        "see", "URL_shop_example_a", "URL_shop_example_b", "and", "URL_x_example_c",
    ]  # fmt: skip
    words, links = words_and_links(text)
    assert words == [b"see", b"and"]
    assert links == [b"URL_shop_example_a", b"URL_shop_example_b", b"URL_x_example_c"]
    assert tokens("not a url: https:// or hxxp://evil.example") == [
        "not", "a", "url", "https", "or", "hxxp", "evil", "example",
    ]  # fmt: skip


def test_recipient_terms() -> None:
    terms = recipient_terms(
        ['"Smith, John" <john.smith@example.org>', "info@example.org", "Maria-José García"]
    )
    assert terms == {"john", "smith", "maria", "jose", "garcia"}
    assert recipient_terms(["<j.w.doe99@example.org>"]) == {"doe"}
    assert recipient_terms(["Will Mark <will@example.org>"]) == frozenset()


def test_personalization_is_removed() -> None:
    terms = recipient_terms(["Jöhn Smith <jsmith@example.org>"])
    one = "Dear John Smith, see https://x.example/u/jsmith/prefs. Bye JOHN"
    two = "Dear Anna Lee, see https://x.example/u/alee/prefs. Bye ANNA"
    assert tokens(one, terms) == tokens(two, recipient_terms(["Anna Lee <alee@example.org>"]))
    assert normalize_text(one, terms) == "dear see URL_x_example_u_X_prefs bye"


def test_separator_characters_are_separators_whatever_unicode_does() -> None:
    for char in sorted(n._SEPARATOR_CHARS):
        out = reference_clean(f"a{char}b")
        assert re.fullmatch(r"a\W*b", out), (hex(ord(char)), out)


def test_invisible_set_covers_all_format_characters() -> None:
    missing = [
        hex(code)
        for code in range(sys.maxunicode + 1)
        if unicodedata.category(chr(code)) == "Cf" and chr(code) not in n._INVISIBLE_CHARS
    ]
    assert missing == []


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_clean_equals_the_unoptimized_pipeline(text: str) -> None:
    assert clean(text) == reference_clean(text)


_TRICKY = st.lists(
    st.sampled_from(
        [
            *"aeoAEOpcx 0123.:/-@_\n",
            *("\u200b", "\u00ad", "\u0301", "\u0430", "\u0391", "\u2019", "\u2026", "\ufb01"),
            *("\ufe0f", "\U0001f600", "https://", "www.", "\ud800", "\u00df", "\u0130"),
            *("\u01c5", "\u0345"),
        ]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(_TRICKY, st.text(max_size=200)))
def test_tokens_never_raise_and_are_words(text: str) -> None:
    words = tokens(text, ["john"])
    assert all(word and not any(c.isspace() for c in word) for word in words)
    assert "john" not in words
    assert clean(text) == reference_clean(text)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=100), st.lists(st.text(max_size=30), max_size=4))
def test_recipient_terms_never_raise(text: str, recipients: list[str]) -> None:
    terms = recipient_terms(recipients)
    assert all(len(term) >= 2 and term.isalpha() for term in terms)
    assert not set(tokens(text, terms)) & terms
