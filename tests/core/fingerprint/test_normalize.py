"""Normalization: Unicode tricks, placeholders, personalization removal, words."""

from __future__ import annotations

import re
import sys
import unicodedata
from operator import itemgetter

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


# Text that is not ASCII after cleaning: letters of other scripts (kept by the per-character
# cleaning), digits of other scripts, marks and jamo (which make cleaning take its general
# path), non-ASCII white space and punctuation, lone surrogates, and ASCII punctuation that the
# tokenizer's rules are about (sentence ends, digit joins, hyphen chains).
_MIXED = st.lists(
    st.sampled_from(
        [
            *'ab Z09_-.!?,:/\t\n"#',
            *("\u00e9", "\u65e5\u672c", "\u0434\u0430", "\u03b1", "\u0663", "\u00b2", "\u2460"),
            *("\u2173", "\u0d70", "\u0903", "\u0301", "\u1100\u1161", "\uac00", "\uff76\uff9e"),
            *("\u2028", "\x85", "\x1c", "\u3001", "\u00ab", "\u2603", "\ud800", "\u00df"),
            *("--", "..", "1.2", "-1-", " 0 ", "a0b", "URL_x", "EMAIL", "\u0130", "\u03a3"),
        ]
    ),
    min_size=1,
    max_size=40,
).map("".join)


@settings(max_examples=400, deadline=None)
@given(_MIXED, st.booleans(), st.booleans())
def test_byte_tokenizer_for_non_ascii_text_equals_the_regular_expressions(
    text: str, breaks: bool, exclude_some: bool
) -> None:
    cleaned = clean(text)
    assert cleaned == reference_clean(text)
    if cleaned.isascii():
        cleaned += " \u00e9"
    exclude = frozenset({b"ab", "\u00e9".encode()}) if exclude_some else frozenset()
    assert n._mixed_words(cleaned, exclude, breaks) == n.reference_unicode_words(
        cleaned, exclude, breaks
    )


def test_non_ascii_text_takes_the_byte_path() -> None:
    # The load test's lines: mostly ASCII, a few words of German, French and Japanese.
    line = "Gr\u00fc\u00dfe aus dem Lasttest, \u00e7a va? \u65e5\u672c\u8a9e 12:30. Next line.\n"
    text = line * 3
    words, _ = words_and_links(text, breaks=True)
    assert words[:9] == [
        b"grusse", b"aus", b"dem", b"lasttest", b"ca", b"va", b"\x01",
        "\u65e5\u672c\u8a9e".encode(), b"0",
    ]  # fmt: skip
    assert words == n.reference_unicode_words(clean(text), frozenset(), True)


@pytest.mark.parametrize(
    "text",
    [
        "\u65e5\u672c\u8a9e TEXT \u00c9t\u00e9",  # kept alone
        "\u1100\u1161 \u1100 \u1161",  # conjoining jamo compose under NFKC
        "\uac00\u11a8",  # syllable + final jamo
        "\uff76\uff9e",  # halfwidth katakana + voiced mark: composes to U+30AC
        "\u3131\u314f",  # compatibility jamo: NFKD gives conjoining jamo
        "\u039f\u0394\u039f\u03a3 \u03a3",  # capital sigma (str.lower knows final sigma)
        "e\u0301 \u0130stanbul \u1e9e",
    ],
)
def test_per_character_cleaning_only_when_characters_cannot_combine(text: str) -> None:
    assert clean(text) == reference_clean(text)
    assert clean("abc " + text + " xyz") == reference_clean("abc " + text + " xyz")


# Corner cases where an ASCII-only tokenizer (before fingerprint VERSION 2) differed from the
# regular expressions; all text now follows the regular expressions.
@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("call now--50 off", [b"call", b"now", b"0", b"off"]),  # "--" joins nothing
        ("code a0b", [b"code", b"0"]),  # a word with a digit is NUM, even if it is only 0
        ('he said "stop." then', [b"he", b"said", b"stop", b"then"]),  # not before space
        ("the end.", [b"the", b"end", b"\x01"]),  # the end of the text ends a sentence
    ],
)
def test_ascii_corner_cases_follow_the_regular_expressions(text: str, words: list[bytes]) -> None:
    assert words_and_links(text, breaks=True)[0] == words
    assert n.reference_unicode_words(text, frozenset(), True) == words


_ASCII_TEXT = st.lists(
    st.sampled_from([*"aZ_09 .!?,:/-#\"'()\t\n\r\x0b\x1c", "--", "..", "1.2", "a0b", ". ", "x-1"]),
    max_size=40,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_ASCII_TEXT, st.booleans())
def test_byte_tokenizer_equals_the_regular_expressions_on_ascii_text(
    text: str, breaks: bool
) -> None:
    cleaned = clean(text)
    assert n._mixed_words(cleaned, frozenset(), breaks) == n.reference_unicode_words(
        cleaned, frozenset(), breaks
    )


_LINES_TEXT = st.lists(
    st.one_of(
        _TRICKY,
        st.sampled_from(
            [
                "Dear John Smith,\n",
                "Visit https://shop.example/john/offer?u=1. Now!\n",
                "write to john@example.org or www.example.com/x\n",
                "12:30, 1.5 kg -- call now--50 off.\n",
                "\u0413\u0440\u0435\u0446\u0438\u044f, \u00e7a va?\r\n",
                "\n\n",
                "e\u0301\u0301 \u1100\u1161\n",
                "\x01\x04\x05 end.",
            ]
        ),
    ),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_LINES_TEXT, st.booleans())
def test_body_words_by_line_equal_the_whole_text(text: str, exclude_john: bool) -> None:
    exclude = frozenset({b"john", b"smith"}) if exclude_john else frozenset()
    words, links = words_and_links(text, exclude, breaks=True)
    n._LINES.clear()
    n._TEXTS.clear()
    spaced, line_links = n.body_words(text, exclude)
    assert spaced == b" " + b" ".join(words) + b" " if words else spaced == b" "
    assert line_links == links
    # Cached (the lines of this text, and of another one) gives the same again: the whole
    # text cached, and only its lines.
    n.body_words("unrelated line.\n" + text[::-1], exclude)
    assert n.body_words(text, exclude) == (spaced, line_links)
    n._TEXTS.clear()
    assert n.body_words(text, exclude) == (spaced, line_links)


@settings(max_examples=200, deadline=None)
@given(
    _LINES_TEXT,
    st.lists(
        st.sampled_from(
            [
                b"john",
                b"smith",
                b"dear",
                b"0",
                b"\x01",
                b"",
                b" ",
                b"john smith",
                b"now",
                b"va",
                b"x\ty",
            ]
        ),
        max_size=4,
    ),
)
def test_words_removed_from_a_cached_text_are_those_removed_from_a_new_one(
    text: str, names: list[bytes]
) -> None:
    exclude = frozenset(names)
    n._TEXTS.clear()
    cold = n.body_words(text, exclude)
    assert n.body_words(text, exclude) == cold  # cached: its vocabulary decides
    n._TEXTS.clear()
    n.body_words(text)  # cached without exclusions
    assert n.body_words(text, exclude) == cold


def test_the_window_is_chosen_by_the_words_left_after_recipients_are_removed() -> None:
    text = "john john " + "w " * 999 + " " * 40_000 + "tail."
    exclude = frozenset({b"john"})
    n._TEXTS.clear()
    cold = n.body_words(text, exclude)
    assert b"tail" in cold[0]  # 999 words left in the window: squeezed, it reaches the tail
    assert b"tail" not in n.body_words(text)[0]  # 1,001 words: the window as it is
    assert n.body_words(text, exclude) == cold


_ASCII_WORDS = st.lists(
    st.tuples(
        st.from_regex(r"[a-z]{1,6}|[1-9][0-9]{0,3}|[a-z]{1,3}[1-9][a-z]{0,2}", fullmatch=True),
        st.sampled_from([" ", ", ", "\n", "-", ".", "/", ": ", ". ", "! ", "? ", " (", ") "]),
    ),
    max_size=30,
).map(lambda pairs: "".join(word + sep for word, sep in pairs) + " ")


@settings(max_examples=300, deadline=None)
@given(_ASCII_WORDS)
def test_ascii_path_and_regular_expressions_agree_on_ordinary_text(text: str) -> None:
    # Words, numbers with a non-zero digit, single separators; sentence ends before spaces.
    assert text.isascii()
    assert words_and_links(text, breaks=True)[0] == n.reference_unicode_words(text, breaks=True)
    assert tokens(text) == [w.decode() for w in n.reference_unicode_words(text) if w != b"\x01"]


@settings(max_examples=60, deadline=None)
@given(
    _LINES_TEXT,
    st.integers(0, 1200),
    st.sampled_from(["", " " * 40_000, "\n" * 33_000]),
    st.sampled_from([frozenset(), frozenset({b"john"}), frozenset({b"w", b"smith"})]),
)
def test_long_texts_windows_kept_by_the_text_object_give_the_windowed_words(
    text: str, repeat: int, padding: str, exclude: frozenset[bytes]
) -> None:
    long = padding + "john w " * repeat + text + "x " * 17_000 + text
    expected = n._windowed(
        long, lambda window: n._window_body_words(window, exclude), itemgetter(2)
    )[:2]
    n._WINDOWS.clear()
    assert n.body_words(long, exclude) == expected  # cold
    assert n.body_words(long, exclude) == expected  # its windows kept
    assert n.body_words(long, frozenset()) == n.body_words((long + "#")[:-1], frozenset())
