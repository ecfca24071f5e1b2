"""Text normalization for fingerprints: undo personalization and evasion, then split into words.

Responsible for: turning the visible text of a message into the token sequence that fingerprints
are computed from, so that copies of one message that differ only in personalization or in
cosmetic tricks give the same tokens.  In order:

1. Unicode: typographic punctuation and exotic spaces become spaces; invisible characters
   (format characters such as zero-width spaces and joiners, the soft hyphen, bidi controls,
   variation selectors, Hangul fillers) are removed; NFKD, then combining diacritical marks are
   dropped (``Víagra`` is ``Viagra``); common Cyrillic, Greek and Armenian lookalikes are mapped
   to the Latin letters they imitate; case folding; NFKC.
2. Placeholders: a URL becomes one token naming its host and path *shape* (query and fragment
   dropped, path segments and host labels that look per-recipient -- containing a digit, 24+
   characters long, or one of the recipient's names -- become ``X``), for example
   ``URL_shop_example_u_X``; an e-mail address becomes ``EMAIL``; any word containing a digit
   (numbers, prices, dates, times, order numbers, random hash-buster tokens) becomes ``NUM``,
   which is ``"0"``.  Digit groups joined by ``. , : / -`` count as one word, and so does a
   hyphenated code with a digit in it (``03mq-eqes``).
3. Words: maximal runs of word characters; whitespace is collapsed by construction.  For
   fingerprints (:func:`words_and_links`) URLs are returned apart, and ``BREAK`` can mark the
   end of each sentence.
4. Personalization: words naming the recipient (from :func:`recipient_terms`) are removed.

Only the first ``MAX_CHARS`` characters of a text count (of a longer text whose first
``MAX_CHARS`` hold few words, those after invisible characters are dropped and white space
squeezed: :func:`squeezed`).  Text whose characters cannot
combine with their neighbours (Latin, CJK, most scripts) is cleaned character by character,
and all text is tokenized with whole-text byte operations (``bytes.translate``, ``replace``,
``split``), not a Python step per word, by the rules of :func:`reference_unicode_words` (the
tests check that both give the same words, for ASCII and other text).  A sentence ends at
``.``, ``!`` or ``?`` before white space or the end of the text.  No step looks across a line
break (a URL, an address, a number or a word never contains white space, a sentence end is
decided by the character after it, and no character combines with a line break), so a text's
words are its lines' words one after the other: :func:`body_words` (for fingerprints) computes
them line by line and caches each line's, as copies of a campaign repeat most of their lines.
Placeholders cannot collide with words: ``EMAIL`` and ``URL_...`` are upper case, which folded
text never is, and every other word containing a digit is ``0`` itself.
Must never: raise on any ``str`` (including lone surrogates), do I/O, or depend on the locale,
the process or the clock; its output for a given input is fixed for a given Python/Unicode
version.
"""

from __future__ import annotations

import re
import sys
import unicodedata
from collections.abc import Callable, Collection, Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain, filterfalse, islice
from operator import itemgetter
from typing import TypeVar

from mailguard.core.fingerprint.cache import BoundedCache, IdentityCache

NUM = "0"
EMAIL = "EMAIL"
URL_PREFIX = "URL_"
# Marks the end of a sentence in :func:`words_and_links` output (never a word).
BREAK = b"\x01"

# Text beyond this many characters is never read (bounds the work on any text).
MAX_SCAN_CHARS = 200_000
# Of a longer text only this many characters count (bounds the work on long texts; see
# .sketch): its first MAX_CHARS, or, when those hold FEW_WORDS words or fewer (ordinary text:
# about 5,000), the first MAX_CHARS after white space is squeezed and invisible characters
# dropped (:func:`squeezed`), so that padding that shows nothing cannot use the window up.
MAX_CHARS = 32_000
FEW_WORDS = 1_000
# A URL's path shape keeps at most this many segments.
MAX_URL_SEGMENTS = 4
# A URL path segment or host label this long is taken for a token even without digits.
TOKENISH_LENGTH = 24
# The words of lines (see body_words) are cached: at most 32,768 lines of at most
# MAX_CACHED_LINE characters, about 16 MB in all (.cache).
MAX_CACHED_LINE = 1000
_LINES: BoundedCache[str, tuple[bytes, tuple[str, ...]]] = BoundedCache(
    1 << 15, 16 << 20, MAX_CACHED_LINE, lambda value: len(value[0]) + _strings_size(value[1])
)
# The words of whole texts (:func:`_text_words`, before recipients' words are removed) are
# cached too: copies of a campaign whose text is not personalized repeat it whole.  At most
# 1,024 texts (windows of at most MAX_CHARS characters), about 8 MB in all.
# (Counted in bytes: the text beyond one byte per character, three times the words' length,
# for their vocabulary, and the URLs; see _TextWords.size.)
_TEXTS: BoundedCache[str, _TextWords] = BoundedCache(
    1 << 10, 8 << 20, MAX_CHARS, lambda value: value.size
)
# The windows of texts longer than MAX_CHARS (see _windowed), by the text object: a repeated
# text part is the same object (.mime caches parts), so neither the text nor its window is
# hashed again (the window is the object _TEXTS keeps).  At most 64 texts, about 16 MB.
_WINDOWS: IdentityCache[str, _Windows] = IdentityCache(
    64, 16 << 20, lambda text, windows: sys.getsizeof(text) + windows.size
)
# Parsed URLs are cached (campaigns repeat their links); the cache only saves time.
_URL_CACHE: dict[str, tuple[tuple[str, ...], tuple[str, ...], str]] = {}
_URL_CACHE_LIMIT = 1 << 14

# Format characters (Unicode category Cf, as of Unicode 15) and other characters that render as
# nothing: combining grapheme joiner, Hangul fillers, Mongolian/Khmer invisibles, variation
# selectors, tag characters.  Removed outright, so they cannot split or pad words.
_INVISIBLE = (
    "\u00ad\u034f\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u115f\u1160\u17b4\u17b5"
    "\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0"
    "\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f\U000e0100-\U000e01ef"
)
_INVISIBLE_RE = re.compile(f"[{_INVISIBLE}]+")

# Combining marks used for diacritics and for "Zalgo" obfuscation; dropped after NFKD.
_MARKS = (
    "\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u064b-\u065f\u0670"
    "\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f"
)
_MARKS_RE = re.compile(f"[{_MARKS}]+")
# What :func:`squeezed` squeezes in a long text before it takes its window (both patterns start
# with their literal, which the engine finds fast).
_NEWLINE_RUN_RE = re.compile(r"\n\s+")
_SPACE_RUN_RE = re.compile(r"  +")

# Punctuation, symbols and spaces that are word separators whatever the Unicode processing
# does to them (no word characters and no invisibles in their NFKD form).  Replacing them by a
# space first lets most Western text take the fast ASCII path; the tests check the premise.
_SEPARATORS = (
    "\u00a0-\u00a7\u00a9\u00ab\u00ac\u00ae\u00b0\u00b1\u00b6\u00b7\u00bb\u00bf\u00d7\u00f7"
    "\u2000-\u200a\u2010-\u2027\u202f\u2030-\u203e\u205f\u20a0-\u20a7\u20a9-\u20c0\u2190-\u21ff"
    "\u2212\u2500-\u2775\u2794-\u27bf\u3000\U0001f300-\U0001faff"
)
_SEPARATORS_RE = re.compile(f"[{_SEPARATORS}]")

# Lookalikes, applied after NFKD and before case folding (so upper and lower case map to what
# each resembles: Greek capital eta is H, small eta is n).  Escaped: the point is that they
# look like Latin letters.
_HOMOGLYPH_SOURCE = (
    # Cyrillic capitals: ABEKMHOPCTYXSIJQWHDIYb
    "\u0410\u0412\u0415\u041a\u041c\u041d\u041e\u0420\u0421\u0422\u0423\u0425\u0405\u0406"
    "\u0408\u051a\u051c\u04ba\u0500\u04c0\u04ae\u042c"
    # Cyrillic smalls: aeopcyxsijqwhdlybk
    "\u0430\u0435\u043e\u0440\u0441\u0443\u0445\u0455\u0456\u0458\u051b\u051d\u04bb\u0501"
    "\u04cf\u04af\u044c\u043a"
    # Greek capitals: ABEZHIKMNOPTYXCJ
    "\u0391\u0392\u0395\u0396\u0397\u0399\u039a\u039c\u039d\u039f\u03a1\u03a4\u03a5\u03a7"
    "\u03f9\u037f"
    # Greek smalls: aeikvopuxyncj
    "\u03b1\u03b5\u03b9\u03ba\u03bd\u03bf\u03c1\u03c5\u03c7\u03b3\u03b7\u03f2\u03f3"
    # Latin and Armenian oddities: ijagionu
    "\u0131\u0237\u0251\u0261\u0269\u0585\u0578\u057d"
)
_HOMOGLYPH_TARGET = "ABEKMHOPCTYXSIJQWHDIYbaeopcyxsijqwhdlybkABEZHIKMNOPTYXCJaeikvopuxyncjijagionu"
_HOMOGLYPHS = str.maketrans(_HOMOGLYPH_SOURCE, _HOMOGLYPH_TARGET)

# URLs are found from their literal part ("://" or "www."), which the regex engine finds at C
# speed; a pattern starting with an alternation or a lookbehind is tried at every position.
_URL_CHARS = r"[^\s<>\"'`{}|\\^\[\]]"
_AFTER_SCHEME_RE = re.compile(f"://{_URL_CHARS}+")
_WWW_RE = re.compile(rf"www\.{_URL_CHARS}+")
_SCHEMES = ("https", "http", "ftp")
_URL_PARTS_RE = re.compile(r"(?:[a-z][a-z0-9+.\-]*://)?([^/?#]*)([^?#]*)")
_URL_TRAILING = ".,;:!?)(*'\"-"
_EMAIL_DOMAIN_RE = re.compile(r"@[\w\-]{1,63}(?:\.[\w\-]{1,63})+")
_EMAIL_LOCAL_RE = re.compile(r"[\w.+\-]{1,64}\Z")
_LOOSE_EMAIL_RE = re.compile(r"([^\s<>@\"',;:()]{1,64})@[^\s<>@\"',;:()]+")
_DIGIT_RE = re.compile(r"\d")
# A sentence ends at ".", "!" or "?" followed by white space or the end of the text (not in
# "os.path" or "e.g").
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s|\Z)")

_NUM_JOIN_RE = re.compile(r"(\d)[.,:/\-](?=\d)")
_NONWORD_RE = re.compile(r"\W+")
_WORD_RE = re.compile(r"\w+")
_WORD_OR_BREAK_RE = re.compile(r"\w+(?:-\w+)*|\x01")
_LOCAL_SPLIT_RE = re.compile(r"[._+\-=\d]+")

_B_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= c <= 0x39 else c for c in range(256))
# In the all-digits-are-0 copy: a separator between two digits goes (``1.5``, ``12:30``).
_B_ZERO_JOINT_RE = re.compile(rb"0[.,:/\-](?=0)")
# From a word's first 0 to its end; run forwards, then on the reversed bytes, it leaves "0"
# of every word with a digit.  Both start with a literal, which the engine finds fast.
_B_ZERO_TAIL_RE = re.compile(rb"0[^ ]+")
_SENTENCE_MARK = 0x03  # ".", "!", "?" become this in translate; before a space, a BREAK
_B_WORD = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
# Marks used inside :func:`_line_values`' batches (never words; removed from input text first):
# the end of a line, and where a URL stood.
_LINE_MARK = "\x04"
_URL_MARK = "\x05"
_OURS = str.maketrans("\x01\x04\x05", "   ")

# Cleaned text is tokenized as bytes (:func:`_tokenize`), with the rules of the regular
# expressions of :func:`reference_unicode_words`: each non-ASCII character first becomes itself
# (a word character), "0" (a digit), " " or "#" (any other separator).  Then a byte is a word
# byte when it is ASCII alphanumeric, "_" or part of a non-ASCII character.
_B_WORD_CLASS = rb"0-9A-Za-z_\x80-\xff"
# A hyphen joins two words into one (a chain is one word) only between word characters.
# (The pattern starts with its literal, which the engine finds fast, not with the lookbehind.)
_B_JOINING_HYPHEN_RE = re.compile(rb"-(?<=[" + _B_WORD_CLASS + rb"]-)(?=[" + _B_WORD_CLASS + rb"])")
_B_ASCII_SPACE = b"\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f "  # white space as str.isspace has it


def _mixed_table(breaks: bool) -> bytes:
    """bytes.translate table for :func:`_tokenize`: word bytes, BREAK, "-" and the batch marks
    stay, white space becomes " ", "." "!" "?" become 0x03 with ``breaks``, anything else "#"
    (which separates words but is not white space, so it does not end a sentence)."""
    table = bytearray(
        c if c in _B_WORD or c >= 0x80 or c in (0x01, 0x04, 0x05, 0x2D) else 0x23
        for c in range(256)
    )
    for space in _B_ASCII_SPACE:
        table[space] = 0x20
    if breaks:
        for end in b".!?":
            table[end] = _SENTENCE_MARK
    return bytes(table)


_B_MIXED = {breaks: _mixed_table(breaks) for breaks in (False, True)}
# The second pass: the remaining sentence marks and "#" separate words like white space.
_B_MIXED_SPACES = bytes(0x20 if c in (_SENTENCE_MARK, 0x23) else c for c in range(256))

# Words never taken for a recipient's name (common words and role mailboxes), so that mail to
# "will@..." or "info@..." keeps its ordinary words.
_NOT_NAMES_TEXT = """a an and are at be bill but by can dear do for from grace have hello hi
    hope i in info is it june mark may me my news no not of on or our rose sales service support
    team the to us we will with you your admin contact customer customers mail office noreply
    reply hr billing newsletter account accounts help hey all"""
_NOT_NAMES = frozenset(_NOT_NAMES_TEXT.split())


def _expand(ranges: str) -> frozenset[str]:
    """The characters of a regex character-class body made of single characters and ranges."""
    chars: set[str] = set()
    index = 0
    while index < len(ranges):
        if index + 2 < len(ranges) and ranges[index + 1] == "-":
            chars.update(map(chr, range(ord(ranges[index]), ord(ranges[index + 2]) + 1)))
            index += 3
        else:
            chars.add(ranges[index])
            index += 1
    return frozenset(chars)


_SEPARATOR_CHARS = _expand(_SEPARATORS)
_INVISIBLE_CHARS = _expand(_INVISIBLE)
_MARK_CHARS = _expand(_MARKS)
_HOMOGLYPH_CHARS = frozenset(_HOMOGLYPH_SOURCE)
_ASCII_BYTES = bytes(range(128))
# For :func:`squeezed`: characters that show nothing, and white space other than " " and "\n".
_FILLER_CHARS = _INVISIBLE_CHARS | _MARK_CHARS
_SPACE_CHARS = frozenset(c for c in map(chr, range(0x80, 0x3001)) if c.isspace())
_ASCII_SPACE_CHARS = tuple(c for c in map(chr, range(0x80)) if c.isspace() and c not in " \n")


def _non_ascii(text: str) -> set[str]:
    """The distinct non-ASCII characters of ``text`` (C speed: drop ASCII bytes, decode)."""
    encoded = text.encode("utf-8", "surrogatepass").translate(None, _ASCII_BYTES)
    return set(encoded.decode("utf-8", "surrogatepass"))


# Conjoining Hangul jamo compose with their neighbours under NFKC although they are neither
# marks nor combining characters (the only such characters as of Unicode 15; see _alone).
_JAMO_RE = re.compile("[\u1100-\u11ff\ua960-\ua97f\ud7b0-\ud7ff]")


def _inert(text: str, marks_allowed: bool) -> bool:
    """No character of ``text`` can combine with a neighbour under NFKD or NFKC.

    Characters that NFKC composes with the character before them are combining characters
    (non-zero combining class), marks of category M, or conjoining Hangul jamo; with
    ``marks_allowed``, the marks that cleaning drops (``_MARKS``) are allowed too.
    """
    for char in text:
        if marks_allowed and char in _MARK_CHARS:
            continue
        if unicodedata.combining(char) or unicodedata.category(char)[0] == "M":
            return False
    return _JAMO_RE.search(text) is None


@lru_cache(maxsize=4096)
def _alone(char: str) -> str | None:
    """What cleaning makes of ``char`` in any text, whatever its neighbours; else None.

    That is the case when the result is ASCII (ASCII never combines with its neighbours), or
    when neither ``char``, its decomposition nor its cleaned form can combine with a neighbour
    (CJK ideographs, the letters of most scripts) and the cleaned form is lower case.
    Characters that combine with their neighbours (marks, jamo) are never handled alone.
    """
    if unicodedata.combining(char) or unicodedata.category(char)[0] == "M":
        return None
    cleaned = reference_clean(char)
    if cleaned.isascii():
        return cleaned
    if (
        cleaned.lower() != cleaned
        or not _inert(unicodedata.normalize("NFKD", char), True)
        or not _inert(cleaned, False)
    ):
        return None
    return cleaned


def clean(text: str) -> str:
    """Unicode-level cleanup (step 1 of the module docstring); no placeholders, no splitting.

    Text whose non-ASCII characters cannot combine with their neighbours (Latin with
    diacritics, CJK, Cyrillic, Greek, the letters of most scripts) is cleaned character by
    character (one C-speed replace per distinct non-ASCII character that cleaning changes);
    other text runs each step only when a character it affects is present.  Either way the
    result is that of :func:`reference_clean` (the tests check this).
    """
    if text.isascii():
        return text.lower()
    present = _non_ascii(text)
    replacements = [(char, _alone(char)) for char in present]
    if all(replacement is not None for _, replacement in replacements):
        for char, replacement in replacements:
            if replacement != char:
                text = text.replace(char, replacement)  # type: ignore[arg-type]  # not None
        return text.lower()
    separators = present & _SEPARATOR_CHARS
    for char in separators:
        text = text.replace(char, " ")
    present -= separators
    if not present.isdisjoint(_INVISIBLE_CHARS):
        text = _INVISIBLE_RE.sub("", text)
    joined = "".join(present)
    if not unicodedata.is_normalized("NFKD", joined):
        text = unicodedata.normalize("NFKD", text)
        present = set(unicodedata.normalize("NFKD", joined))
    if not present.isdisjoint(_MARK_CHARS):
        text = _MARKS_RE.sub("", text)
    if not present.isdisjoint(_HOMOGLYPH_CHARS):
        text = text.translate(_HOMOGLYPHS)
    text = text.casefold()
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return text


def reference_clean(text: str) -> str:
    """:func:`clean` without its shortcuts: every step on the whole text (for tests)."""
    text = _SEPARATORS_RE.sub(" ", text)
    text = _INVISIBLE_RE.sub("", text)
    text = unicodedata.normalize("NFKD", text)
    text = _MARKS_RE.sub("", text)
    text = text.translate(_HOMOGLYPHS)
    return unicodedata.normalize("NFKC", text.casefold())


def _tokenish(part: str) -> bool:
    return len(part) >= TOKENISH_LENGTH or _DIGIT_RE.search(part) is not None


def _url_parts(url: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Host labels and path segments of a URL, per-recipient-looking ones already ``X``."""
    url = url.rstrip(_URL_TRAILING)
    match = _URL_PARTS_RE.match(url)
    assert match is not None  # every part of the pattern is optional
    host, path = match.group(1), match.group(2)
    if "@" in host:
        host = host.rpartition("@")[2]
    host = "X" if host.startswith("[") else host.partition(":")[0].strip(".")
    if host.startswith("www."):
        host = host[4:]
    labels = tuple("X" if _tokenish(x) else x for x in host.split(".") if x)
    segments = tuple(x for x in path.split("/") if x)[:MAX_URL_SEGMENTS]
    return labels, tuple("X" if _tokenish(x) else x for x in segments)


def _cached_url_parts(url: str) -> tuple[tuple[str, ...], tuple[str, ...], str]:
    """``_url_parts`` and the token they make (without exclusions), cached."""
    # Keyed without query and fragment, which are dropped anyway and hold most of the
    # per-recipient tokens, so that a campaign's links mostly hit.
    key = url.partition("?")[0].partition("#")[0]
    found = _URL_CACHE.get(key)
    if found is None:
        if len(_URL_CACHE) > _URL_CACHE_LIMIT:
            _URL_CACHE.clear()
        labels, segments = _url_parts(key)
        token = URL_PREFIX + _NONWORD_RE.sub("_", _join_shape(labels, segments))
        found = _URL_CACHE[key] = (labels, segments, token)
    return found


def _join_shape(labels: tuple[str, ...], segments: tuple[str, ...]) -> str:
    host = ".".join(labels)
    return f"{host}/{'/'.join(segments)}" if segments else host


def url_shape(url: str, exclude: AbstractSet[str] = frozenset()) -> str:
    """A URL reduced to ``host/segment/...``: per-recipient parts are ``X`` (module docstring).

    Expects cleaned (case-folded) text; ``www.`` and any port, user info, query and fragment are
    dropped, at most ``MAX_URL_SEGMENTS`` path segments are kept.
    """
    labels, segments, _ = _cached_url_parts(url)
    if exclude:
        labels = tuple("X" if x in exclude else x for x in labels)
        segments = tuple("X" if x in exclude else x for x in segments)
    return _join_shape(labels, segments)


def url_token(url: str, exclude: AbstractSet[str] = frozenset()) -> str:
    """The single word a URL becomes: ``URL_`` and its shape with separators as ``_``."""
    labels, segments, token = _cached_url_parts(url)
    if exclude and not (exclude.isdisjoint(labels) and exclude.isdisjoint(segments)):
        return URL_PREFIX + _NONWORD_RE.sub("_", url_shape(url, exclude))
    return token


def _replace_urls(
    text: str, exclude: AbstractSet[str], sink: list[str] | None, mark: str | None = None
) -> str:
    """URLs replaced by their tokens; with a ``sink``, by spaces and their tokens collected;
    with a ``mark`` too, by `` mark `` and the URLs themselves collected."""
    spans: list[tuple[int, int]] = []
    if "://" in text:
        for match in _AFTER_SCHEME_RE.finditer(text):
            colon = match.start()
            for scheme in _SCHEMES:
                start = colon - len(scheme)
                if start >= 0 and text.startswith(scheme, start):
                    spans.append((start, match.end()))
                    break
    if "www." in text:
        for match in _WWW_RE.finditer(text):
            start = match.start()
            if start == 0 or not (text[start - 1].isalnum() or text[start - 1] in "./_-@"):
                spans.append((start, match.end()))
    if not spans:
        return text
    spans.sort()
    pieces: list[str] = []
    done = 0
    for start, end in spans:
        if start < done:
            continue
        pieces.append(text[done:start])
        if mark is not None and sink is not None:
            sink.append(text[start:end])
            pieces.append(f" {mark} ")
        elif sink is not None:
            sink.append(url_token(text[start:end], exclude))
            pieces.append(" ")
        else:
            pieces.append(f" {url_token(text[start:end], exclude)} ")
        done = end
    pieces.append(text[done:])
    return "".join(pieces)


def _replace_emails(text: str) -> str:
    pieces: list[str] = []
    done = 0
    for match in _EMAIL_DOMAIN_RE.finditer(text):
        at = match.start()
        if at < done:
            continue
        local = _EMAIL_LOCAL_RE.search(text, max(done, at - 64), at)
        if local is None:
            continue
        pieces.append(text[done : local.start()])
        pieces.append(f" {EMAIL} ")
        done = match.end()
    if not pieces:
        return text
    pieces.append(text[done:])
    return "".join(pieces)


def _special_str(word: str) -> str:
    if word.startswith(URL_PREFIX):
        return word
    if _DIGIT_RE.search(word):
        return NUM
    return word.replace("-", " ")


def _prepared(
    text: str, exclude: AbstractSet[bytes], links: list[str] | None, mark: str | None = None
) -> str:
    """Cleaned text with URLs and e-mail addresses replaced (steps 1 and 2)."""
    text = clean(text)
    if "://" in text or "www." in text:
        names = {x.decode("utf-8", "surrogatepass") for x in exclude} if exclude else frozenset()
        text = _replace_urls(text, names, links, mark)
    if "@" in text:
        text = _replace_emails(text)
    return text


def squeezed(text: str) -> str:
    """The window of a text longer than ``MAX_CHARS`` that holds few words (``FEW_WORDS``):
    of its first ``MAX_SCAN_CHARS`` characters, the first ``MAX_CHARS`` after invisible
    characters and combining marks are dropped (cleaning drops them anyway), white space after
    a line break (blank lines included) goes and other runs of white space become one space.
    So blank lines, spaces, zero-width characters or ``&nbsp;`` at the top of a message cannot
    push its words out of the window.  Words, sentence ends and lines are unchanged by the
    squeezing (no step of normalization looks into white space).
    """
    text = text[:MAX_SCAN_CHARS]
    if not text.isascii():
        present = _non_ascii(text)
        for char in present & _FILLER_CHARS:
            text = text.replace(char, "")
        for char in present & _SPACE_CHARS:
            text = text.replace(char, " ")
    for char in _ASCII_SPACE_CHARS:
        if char in text:
            text = text.replace(char, " ")
    if "\n" in text:
        text = _NEWLINE_RUN_RE.sub("\n", text)
    return _SPACE_RUN_RE.sub(" ", text)[:MAX_CHARS]


_R = TypeVar("_R")


def _windowed(text: str, words_of: Callable[[str], _R], count: Callable[[_R], int]) -> _R:
    """``words_of`` the part of ``text`` that is read: all of it up to ``MAX_CHARS``
    characters; of a longer text its first ``MAX_CHARS``, unless ``count`` finds no more than
    ``FEW_WORDS`` words in them: then the :func:`squeezed` window."""
    if len(text) <= MAX_CHARS:
        return words_of(text)
    found = words_of(text[:MAX_CHARS])
    return found if count(found) > FEW_WORDS else words_of(squeezed(text))


def _words(
    text: str, exclude: AbstractSet[bytes], links: list[str] | None, breaks: bool
) -> list[bytes]:
    def words_of(window: str) -> tuple[list[bytes], list[str] | None]:
        found: list[str] | None = None if links is None else []  # None: URL tokens in place
        return _window_words(window, exclude, found, breaks), found

    words, found = _windowed(text, words_of, lambda result: len(result[0]))
    if links is not None and found:
        links.extend(found)
    return words


def _window_words(
    text: str, exclude: AbstractSet[bytes], links: list[str] | None, breaks: bool
) -> list[bytes]:
    if "\x01" in text or "\x04" in text or "\x05" in text:  # ours
        text = text.translate(_OURS)
    words = _tokenize(_prepared(text, exclude, links), breaks)
    if exclude:
        words = list(filterfalse(exclude.__contains__, words))
    return words


@lru_cache(maxsize=4096)
def _word_char(char: str) -> str:
    r"""What a non-ASCII character of cleaned text is to the tokenizer (as regex ``\d``, ``\w``
    and ``\s`` have it): "0" if a digit, itself if another word character, " " if white
    space, else "#" (separates words, but is not white space)."""
    if char.isdecimal():
        return "0"
    if char.isalnum():
        return char
    return " " if char.isspace() else "#"


def _tokenize(text: str, breaks: bool) -> list[bytes]:
    """:func:`reference_unicode_words` of cleaned text, computed with whole-text byte operations.

    Every digit becomes "0" (a word with a digit is NUM whatever its digits) and every other
    non-ASCII character a word character, white space or "#" (:func:`_word_char`), so that
    the regular expressions' rules can be applied to the UTF-8 bytes.
    """
    if not text.isascii():
        for char in _non_ascii(text):
            replacement = _word_char(char)
            if replacement != char:
                text = text.replace(char, replacement)
    data = text.encode("utf-8")  # no surrogates left: they became "#"
    digits = data.translate(_B_DIGITS_AS_ZERO)
    has_digits = digits != data or b"0" in data
    if has_digits:
        data = _B_ZERO_JOINT_RE.sub(b"0", digits)
    data = data.translate(_B_MIXED[breaks]) + b" "  # the end of the text ends a sentence
    if breaks and b"\x03" in data:
        data = data.replace(b"\x03 ", b" \x01 ")  # before white space: ends a sentence
    spaced = b" " + data.translate(_B_MIXED_SPACES)
    if b"-" in spaced:
        spaced = _B_JOINING_HYPHEN_RE.sub(b"\x02", spaced).replace(b"-", b" ")
    if has_digits:
        spaced = _B_ZERO_TAIL_RE.sub(b"0", spaced)
        spaced = _B_ZERO_TAIL_RE.sub(b"0", spaced[::-1])[::-1]
    if b"\x02" in spaced:  # hyphens of words without digits separate after all
        spaced = spaced.replace(b"\x02", b" ")
    return spaced.split()


def _mixed_words(text: str, exclude: AbstractSet[bytes], breaks: bool) -> list[bytes]:
    """:func:`_tokenize`, then the words in ``exclude`` dropped (for tests)."""
    words = _tokenize(text, breaks)
    return list(filterfalse(exclude.__contains__, words)) if exclude else words


def reference_unicode_words(
    text: str, exclude: AbstractSet[bytes] = frozenset(), breaks: bool = False
) -> list[bytes]:
    """The words of cleaned text by regular expressions on ``str`` (the definition for text
    that is not ASCII after cleaning; :func:`_mixed_words` gives the same, the tests check)."""
    if _DIGIT_RE.search(text):
        text = "".join(_NUM_JOIN_RE.split(text))
    if breaks:
        text = _SENTENCE_END_RE.sub(" \x01 ", text)
    found = _WORD_OR_BREAK_RE.findall(text)
    found = [w if w.isalpha() else _special_str(w) for w in found]
    words = " ".join(found).encode("utf-8", "surrogatepass").split()
    if exclude:
        words = list(filterfalse(exclude.__contains__, words))
    return words


def encoded_tokens(text: str, exclude: AbstractSet[bytes] = frozenset()) -> list[bytes]:
    """The normalized words of ``text`` as UTF-8 ``bytes``, URL tokens in place.

    ``exclude`` holds UTF-8 encoded words to drop (see :func:`recipient_terms`).
    """
    return _words(text, exclude, None, False)


def subject_tokens(text: str, exclude: AbstractSet[bytes] = frozenset()) -> list[bytes]:
    """:func:`encoded_tokens` of a short text (a subject), cached.

    Subjects of a campaign's copies repeat, and often differ only in numbers (an order or
    invoice number): an ASCII text without ``@`` is cached with its digits as ``0``, which
    gives the same words (cleaning ASCII only lowers its case, and the tokenizer reads every
    digit as ``0`` before anything else looks at one).  The words are cached without
    ``exclude``, which then only drops words, unless the text holds a URL (whose token depends
    on it: computed in full).
    """
    if len(text) > MAX_CACHED_SUBJECT:
        return encoded_tokens(text, exclude)
    key = text.translate(_DIGITS_AS_ZERO) if text.isascii() and "@" not in text else text
    words, urls = _subject_words(key)
    if urls and exclude:
        return encoded_tokens(text, exclude)
    return [w for w in words if w not in exclude] if exclude else list(words)


MAX_CACHED_SUBJECT = 256  # characters: at most 1,024 subjects, ~3 MB of words in all
_DIGITS_AS_ZERO = str.maketrans("123456789", "000000000")


@lru_cache(maxsize=1024)
def _subject_words(text: str) -> tuple[tuple[bytes, ...], bool]:
    """The words of ``text``, nothing excluded, and whether it holds a URL (``_prepared``)."""
    cleaned = clean(text)
    return tuple(encoded_tokens(text)), "://" in cleaned or "www." in cleaned


def words_and_links(
    text: str, exclude: AbstractSet[bytes] = frozenset(), *, breaks: bool = False
) -> tuple[list[bytes], list[bytes]]:
    """The normalized words of ``text`` without URLs, and the URL tokens, as UTF-8 ``bytes``.

    Fingerprints take links apart from the running text so that where a link stands (a bare
    URL after its label in plain text, the label of an anchor in HTML) does not matter.  With
    ``breaks``, ``BREAK`` stands where a sentence ends (``.``, ``!`` or ``?`` before white
    space), so that shingles can stay inside sentences.  (Not at line or block ends: plain
    text wraps lines where HTML has none, and HTML has blocks where plain text has single line
    breaks.)
    """
    links: list[str] = []
    words = _words(text, exclude, links, breaks)
    return words, [link.encode("utf-8", "surrogatepass") for link in links]


def _line_values(lines: list[str]) -> list[tuple[bytes, tuple[str, ...]]]:
    """For each line: its words joined by single spaces (``BREAK`` at sentence ends, nothing
    excluded) and the URLs in it, all lines computed together.

    The lines are joined with ``_LINE_MARK`` on a line of its own between them, which every
    step leaves in place as a word of its own (white space around it; the tokenizer keeps it),
    and URLs are replaced by ``_URL_MARK``, so that the result splits back into lines.
    """
    urls: list[str] = []
    batch = "\n\x04\n".join(lines) + "\n"
    blob = b" ".join(_tokenize(_prepared(batch, frozenset(), urls, _URL_MARK), True))
    found = iter(urls)
    out: list[tuple[bytes, tuple[str, ...]]] = []
    for piece in blob.split(b"\x04"):
        piece = piece.strip()
        if b"\x05" in piece:
            taken = tuple(islice(found, piece.count(b"\x05")))
            out.append((b" ".join(piece.replace(b"\x05", b" ").split()), taken))
        else:
            out.append((piece, ()))
    return out


def body_words(text: str, exclude: AbstractSet[bytes] = frozenset()) -> tuple[bytes, list[bytes]]:
    """:func:`words_and_links` with ``breaks``, its words as one byte string, computed by line.

    The words are joined by single spaces, with one space before the first and after the last
    (``b" "`` when there are none).  Every step of normalization stops at the end of a line
    (a URL, address, number or word never spans white space; sentence ends are decided by
    the white space after them), so each line's words are computed on their own, before
    recipient words are removed, and cached: copies of a campaign repeat most of their lines.
    Lines longer than ``MAX_CACHED_LINE`` characters are not kept, and the cache has a size
    limit (:mod:`.cache`).  The words of whole texts are cached as well (``_TEXTS``), for
    copies whose text is not personalized.  (The caches only save time: a line's words
    depend on nothing else.)
    """
    if len(text) <= MAX_CHARS:
        spaced, links, _ = _window_body_words(text, exclude)
        return spaced, links
    windows = _WINDOWS.get(text)  # as _windowed, with the windows kept
    if windows is None:
        windows = _Windows(text[:MAX_CHARS])
        if windows.first in _TEXTS:  # met before (a personalized text is not kept here)
            _WINDOWS.keep(text, windows)
    spaced, links, count = _window_body_words(windows.first, exclude)
    if count > FEW_WORDS:
        return spaced, links
    if windows.squeezed is None:
        windows.squeezed = squeezed(text)
    spaced, links, _ = _window_body_words(windows.squeezed, exclude)
    return spaced, links


@dataclass(slots=True)
class _Windows:
    """A long text's first ``MAX_CHARS`` characters and, once needed, its :func:`squeezed`
    window (set once: a thread may compute it again, to the same value)."""

    first: str
    squeezed: str | None = None

    @property
    def size(self) -> int:
        """What it costs (the squeezed window counted ahead, at most 4 bytes per character)."""
        return sys.getsizeof(self.first) + 4 * MAX_CHARS


@dataclass(slots=True)
class _TextWords:
    """A text's words joined by single spaces, one before the first and one after the last
    (``BREAK`` at sentence ends, nothing excluded), how many there are, and its URLs; once
    the text recurs with recipients' words to remove, its distinct words (``vocabulary``, set
    once: a thread may compute it again, to the same value)."""

    spaced: bytes
    count: int
    urls: tuple[str, ...]
    size: int = 0  # what it costs beyond its text's length (see _TEXTS)
    vocabulary: frozenset[bytes] | None = None


def _window_body_words(text: str, exclude: AbstractSet[bytes]) -> tuple[bytes, list[bytes], int]:
    """:func:`body_words` of a window, and how many words it has."""
    found = _TEXTS.get(text)
    present: Collection[bytes] = exclude
    if found is None:
        found = _text_words(text)
        _TEXTS.keep_one(text, found)
    else:
        present = _present(found, exclude)
    spaced, count = found.spaced, found.count
    for name in present:  # a few C-speed replaces instead of a test per word
        needle = b" " + name + b" "
        while needle in spaced:
            spaced = spaced.replace(needle, b" ")
    if spaced is not found.spaced:
        count = spaced.count(b" ") - 1  # spaced words: one space more than words
    if not found.urls:
        return spaced, [], count
    names = {x.decode("utf-8", "surrogatepass") for x in exclude} if exclude else frozenset()
    urls = [url_token(url, names).encode("utf-8", "surrogatepass") for url in found.urls]
    return spaced, urls, count


def _present(found: _TextWords, exclude: AbstractSet[bytes]) -> Collection[bytes]:
    """The words of ``exclude`` that may occur in a cached text: those of its vocabulary,
    and any that a set lookup cannot decide (empty, or holding white space).

    (The text's words hold no white space and are separated by single spaces, so that
    ``b" " + w + b" "`` occurs in it exactly when ``w`` is one of its words.)
    """
    if not exclude:
        return exclude
    vocabulary = found.vocabulary
    if vocabulary is None:  # one split instead of a scan of the text per name
        vocabulary = frozenset(found.spaced.split())
        # Kept with the text only within _TEXTS's budget: a set of many short words costs
        # several times the text (a set slot and a bytes object per word).
        size = sys.getsizeof(vocabulary) + sum(map(sys.getsizeof, vocabulary))
        if _TEXTS.used + size <= _TEXTS.budget:
            found.vocabulary = vocabulary
            _TEXTS.used += size
    return [w for w in exclude if w in vocabulary or w.split() != [w]]


def exclusion_words(text: str) -> frozenset[bytes]:
    """The words whose removal could change :func:`body_words` of ``text``: its words and the
    host labels and path segments of its URLs (of both windows a long text may be read by).

    ``body_words(text, exclude) == body_words(text)`` whenever ``exclude`` holds none of them
    and each of its words is one word without white space (as :func:`recipient_terms` gives).
    """
    windows = [text] if len(text) <= MAX_CHARS else [text[:MAX_CHARS], squeezed(text)]
    words: set[bytes] = set()
    for window in windows:
        found = _TEXTS.get(window) or _text_words(window)
        words.update(found.vocabulary or found.spaced.split())
        for url in found.urls:
            labels, segments, _ = _cached_url_parts(url)
            words.update(x.encode("utf-8", "surrogatepass") for x in (*labels, *segments))
    return frozenset(words)


def _strings_size(strings: tuple[str, ...]) -> int:
    """What a line's URLs cost in _LINES beyond the tuple (their ``str`` objects)."""
    return sum(map(sys.getsizeof, strings)) if strings else 0


def _text_words(text: str) -> _TextWords:
    """The words and URLs of a text (see :class:`_TextWords`), line by line."""
    if "\x01" in text or "\x04" in text or "\x05" in text:  # ours
        text = text.translate(_OURS)
    values = _LINES.values_of(text.split("\n"), _line_values)
    spaced = b" ".join([b"", *filter(None, map(itemgetter(0), values)), b""])  # b" " if none
    urls = tuple(chain.from_iterable(map(itemgetter(1), values)))
    size = 3 * len(spaced) + sum(map(len, urls)) + sys.getsizeof(text) - len(text)
    return _TextWords(spaced, spaced.count(b" ") - 1, urls, size)


def encode_terms(terms: Iterable[str]) -> frozenset[bytes]:
    """Words as :func:`encoded_tokens` compares them (UTF-8 bytes)."""
    return frozenset(t.encode("utf-8", "surrogatepass") for t in terms)


def tokens(text: str, exclude: Iterable[str] = ()) -> list[str]:
    """The normalized words of ``text``; words in ``exclude`` (already normalized) dropped."""
    encoded = encoded_tokens(text, encode_terms(exclude))
    return [w.decode("utf-8", "surrogatepass") for w in encoded]


def normalize_text(text: str, exclude: Iterable[str] = ()) -> str:
    """The normalized words of ``text`` joined by single spaces."""
    return " ".join(tokens(text, exclude))


def recipient_terms(recipients: Iterable[str]) -> frozenset[str]:
    """The words naming recipients, to remove from their copies of a message.

    Each item is free text: an address (``john.smith@example.com``), a display name
    (``John Smith``) or both (``"Smith, John" <js@example.com>``).  The result holds the
    normalized words of names, and whole local parts and their pieces (split at ``. _ + - =``
    and digits), two letters or longer, alphabetic, and not common words or role mailboxes.
    """
    terms: set[str] = set()
    for item in dict.fromkeys(recipients):  # To and the envelope often repeat an address
        item = item[:1000]
        terms.update(_item_terms(item) if len(item) <= MAX_CACHED_ITEM else _terms_of(item))
    return frozenset(terms)


# Items up to this long (addresses, real names) have their terms cached; longer ones (a display
# name can be 1,000 characters of four-byte letters) are worked out each time, so the cache
# holds at most 4,096 x (128 characters + their terms): a few MB.
MAX_CACHED_ITEM = 128


@lru_cache(maxsize=4096)
def _item_terms(item: str) -> tuple[str, ...]:
    """The :func:`recipient_terms` of one short item, cached: a mailing list's addresses recur."""
    return _terms_of(item)


def _terms_of(item: str) -> tuple[str, ...]:
    """The :func:`recipient_terms` of one item."""
    text = clean(item)
    candidates: list[str] = []
    for match in _LOOSE_EMAIL_RE.finditer(text):
        local = match.group(1)
        candidates.append(local)
        candidates.extend(_LOCAL_SPLIT_RE.split(local))
    candidates.extend(_WORD_RE.findall(_LOOSE_EMAIL_RE.sub(" ", text)))
    return tuple(w for w in candidates if len(w) >= 2 and w.isalpha() and w not in _NOT_NAMES)
