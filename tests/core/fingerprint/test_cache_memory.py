"""The fingerprint's caches stay near their byte budgets in real memory (tracemalloc), also
for input built to make each entry cost far more than its text: long display names of
four-byte letters, windows of many distinct short words, lines made of short URLs."""

from __future__ import annotations

import gc
import random
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from mailguard.core.fingerprint import normalize as n
from mailguard.core.fingerprint.cache import BoundedCache

MB = 1 << 20


@pytest.fixture(autouse=True)
def _small_caches(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh caches with 2 MB budgets, so a test fills one quickly."""
    lines = BoundedCache(1 << 15, 2 * MB, n.MAX_CACHED_LINE, n._LINES._size)
    texts = BoundedCache(1 << 10, 2 * MB, n.MAX_CHARS, n._TEXTS._size)
    monkeypatch.setattr(n, "_LINES", lines)
    monkeypatch.setattr(n, "_TEXTS", texts)
    n._item_terms.cache_clear()
    yield
    n._item_terms.cache_clear()


def _peak_kept(step: Callable[[int], None], rounds: int) -> int:
    """The most memory (bytes) still allocated after any of ``rounds`` calls of ``step``."""
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        peak = 0
        for i in range(rounds):
            step(i)
            peak = max(peak, tracemalloc.get_traced_memory()[0] - base)
        return peak
    finally:
        tracemalloc.stop()


def test_long_display_names_are_not_kept() -> None:
    rng = random.Random(3)
    letters = [chr(c) for c in range(0x20000, 0x20000 + 3000)]  # four bytes each in UTF-8

    def name(_: int) -> None:
        words = ("".join(rng.choice(letters) for _ in range(2)) for _ in range(334))
        n.recipient_terms([" ".join(words)[:1000] + " <a@example.com>"])

    # 300 distinct 1,000-character names kept whole would be ~10 MB.
    assert _peak_kept(name, 300) < 1 * MB
    assert n._item_terms.cache_info().currsize == 0
    assert n.recipient_terms(["John Smith <john.smith@example.com>"]) == {"john", "smith"}
    assert n._item_terms.cache_info().currsize == 1


def test_vocabularies_count_against_the_texts_budget() -> None:
    rng = random.Random(2)
    n._LINES.entries = 0  # keep the line cache out of the figure (emptied on every keep)

    def text_twice(_: int) -> None:
        words = [
            "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3)) for _ in range(8000)
        ]
        text = "\n".join(" ".join(words[j : j + 100]) for j in range(0, 8000, 100))[:31_999]
        n.body_words(text)
        n.body_words(text, frozenset({b"qqqq"}))  # a copy with a recipient: the vocabulary

    # Counted as before this limit, 30 such texts kept ~20 MB under a 2 MB budget.
    assert _peak_kept(text_twice, 30) < 3 * MB


def test_urls_count_against_the_lines_budget() -> None:
    rng = random.Random(6)
    n._TEXTS.entries = 0  # keep the text cache out of the figure
    n._LINES.budget = 1 * MB

    def lines_of_urls(_: int) -> None:
        urls = (
            " ".join(
                "http://" + "".join(rng.choice("bcdefghijk") for _ in range(3)) for _ in range(90)
            )
            for _ in range(40)
        )
        n.body_words("\n".join(urls))

    # Counted as before this limit, lines of short URLs kept ~6 x the budget.
    assert _peak_kept(lines_of_urls, 30) < 2 * MB


def test_wide_character_lines_count_their_real_size() -> None:
    n._TEXTS.entries = 0  # keep the text cache out of the figure
    n._LINES.budget = 1 * MB
    emoji = [chr(c) for c in range(0x1F600, 0x1F650)]
    rng = random.Random(7)

    def wide_lines(_: int) -> None:
        lines = ("".join(rng.choice(emoji) for _ in range(999)) + "x" for _ in range(50))
        n.body_words("\n".join(lines))

    # Counted by characters, lines of four-byte characters kept ~3.5 x the budget.
    assert _peak_kept(wide_lines, 30) < 2 * MB


def test_repeated_contents_stay_within_their_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Contents kept for their copies (``sketch._REPEATS``: raw body, text, the set of their
    words) count what they hold: contents of many distinct short words, each met twice."""
    from mailguard.core.fingerprint import mime, sketch

    others = (n._LINES, n._TEXTS, sketch._BODIES, sketch._SENTENCES, sketch._WORD_HASHES)

    def peak(entries: int) -> int:
        repeats = BoundedCache(entries, 2 * MB, sketch._REPEATS.longest, sketch._REPEATS._size)
        monkeypatch.setattr(sketch, "_REPEATS", repeats)
        rng = random.Random(4)

        def content_twice(i: int) -> None:
            letters = "abcdefghijklmnopqrstuvwxyz"
            words = ["".join(rng.choice(letters) for _ in range(4)) for _ in range(6000)]
            body = "\n".join(" ".join(words[j : j + 12]) + "." for j in range(0, 6000, 12))
            for to in ("a@x.example", "b@x.example"):
                sketch.fingerprint(f"To: {to}\nSubject: {i}\n\n{body}\n".encode(), [to])
            for cache in (*others, mime._PARTS):  # only _REPEATS keeps anything
                cache.clear()

        found = _peak_kept(content_twice, 30)
        assert len(repeats) <= max(entries, 1)
        return found

    # Kept uncounted, 30 such contents would take ~15 MB.
    assert peak(1 << 10) - peak(0) < 2.5 * MB
