"""Properties of the whole pipeline, raw message to cluster id (hypothesis).

A campaign's copies stay in one cluster whatever the recipient's name, per-recipient tokens
and URLs, numbers and MIME encoding; different issues of one newsletter template do not; and
unrelated one-line messages neither collide nor miss.
"""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint import (
    SIMILARITY_THRESHOLD,
    ClusterIndex,
    Fingerprint,
    fingerprint,
    similarity,
    tokens,
)
from tests.core.fingerprint.messages import (
    FIRST_NAMES,
    LAST_NAMES,
    PARAGRAPHS,
    SHAPES,
    Letter,
    campaign_letter,
    render,
)

_NAME = st.one_of(
    st.sampled_from(FIRST_NAMES + LAST_NAMES),
    st.text(alphabet=string.ascii_lowercase, min_size=3, max_size=10).map(str.capitalize),
)
_TOKEN = st.text(alphabet=string.ascii_letters + string.digits, min_size=6, max_size=30)
_PARAGRAPHS = st.lists(
    st.integers(0, len(PARAGRAPHS) - 1), min_size=1, max_size=4, unique=True
).map(lambda picks: tuple(PARAGRAPHS[i] for i in picks))


@st.composite
def copies(draw: st.DrawFn) -> tuple[bytes, bytes, str, str]:
    """Two copies of one campaign: (message, message, envelope recipient, envelope recipient)."""
    paragraphs = draw(_PARAGRAPHS)
    messages, recipients = [], []
    for _ in range(2):
        first, last = draw(_NAME), draw(_NAME)
        letter = campaign_letter(paragraphs, first, last, draw(_TOKEN), draw(st.integers(0, 10**9)))
        messages.append(render(letter, draw(st.sampled_from(SHAPES))))
        recipients.append(f"{first.lower()}.{last.lower()}@mail.example")
    return messages[0], messages[1], recipients[0], recipients[1]


def same_cluster(a: Fingerprint, b: Fingerprint) -> bool:
    index = ClusterIndex(window=86400.0)
    return index.assign(a, 0.0) == index.assign(b, 60.0)


@settings(max_examples=120, deadline=None)
@given(copies())
def test_personalization_and_encoding_do_not_change_the_cluster(
    pair: tuple[bytes, bytes, str, str],
) -> None:
    one, two, rcpt_one, rcpt_two = pair
    a, b = fingerprint(one, [rcpt_one]), fingerprint(two, [rcpt_two])
    assert similarity(a, b) >= SIMILARITY_THRESHOLD
    assert same_cluster(a, b)


@settings(max_examples=60, deadline=None)
@given(_PARAGRAPHS, st.sampled_from(SHAPES), st.sampled_from(SHAPES))
def test_mime_shape_alone_does_not_change_the_fingerprint_much(
    paragraphs: tuple[str, ...], shape_one: str, shape_two: str
) -> None:
    letter = campaign_letter(paragraphs, "Anna", "Chen", "tok123abc", 7)
    one, two = render(letter, shape_one), render(letter, shape_two)
    a, b = fingerprint(one), fingerprint(two.replace(b"\r\n", b"\n"))  # SMTP vs a file
    assert a == fingerprint(one.replace(b"\r\n", b"\n"))
    if "mixed" not in (shape_one, shape_two):  # only "mixed" adds an attachment
        assert a == b
    assert same_cluster(a, b)


_TEMPLATE_HEADER = (
    "Welcome to the Town Weekly, the newsletter of the town council with news about "
    "events, services and the people who make this place what it is."
)
_TEMPLATE_FOOTER = (
    "You receive the Town Weekly because you subscribed on our website. To change your "
    "preferences or to stop receiving it, use the links below. Town Weekly, Town Hall, "
    "Market Square 1."
)


def issue(paragraphs: tuple[str, ...], number: int, shape: str) -> bytes:
    letter = Letter(
        subject=f"Town Weekly #{number}",
        paragraphs=(_TEMPLATE_HEADER, *paragraphs, _TEMPLATE_FOOTER),
        greeting="Dear reader,",
        links=(
            ("Preferences", "https://weekly.town.example/preferences"),
            ("Unsubscribe", f"https://weekly.town.example/unsubscribe/{number}abc"),
        ),
    )
    return render(letter, shape)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, len(PARAGRAPHS) - 1), min_size=4, max_size=6, unique=True),
    st.sampled_from(SHAPES),
    st.sampled_from(SHAPES),
)
def test_issues_of_one_newsletter_are_not_similar(
    picks: list[int], shape_one: str, shape_two: str
) -> None:
    half = len(picks) // 2
    one = tuple(PARAGRAPHS[i] for i in picks[:half])
    two = tuple(PARAGRAPHS[i] for i in picks[half:])
    a, b = fingerprint(issue(one, 1, shape_one)), fingerprint(issue(two, 2, shape_two))
    assert similarity(a, b) < SIMILARITY_THRESHOLD
    assert not same_cluster(a, b)


_VOCABULARY_TEXT = (
    "ok thanks see you at noon tomorrow lunch call me later sorry running late sounds good "
    "did the report arrive please review happy birthday meeting moved to friday yes no maybe"
)
_VOCABULARY = _VOCABULARY_TEXT.split()
_ONE_LINER = st.lists(st.sampled_from(_VOCABULARY), min_size=1, max_size=6).map(" ".join)


@settings(max_examples=200, deadline=None)
@given(_ONE_LINER, _ONE_LINER, st.sampled_from(["", "Re: hi", "quick question"]))
def test_one_liners_match_only_when_equal(one: str, two: str, subject: str) -> None:
    def message(body: str) -> bytes:
        return f"Subject: {subject}\r\nTo: friend@example.org\r\n\r\n{body}\r\n".encode()

    a, b = fingerprint(message(one)), fingerprint(message(two))
    assert a.kind == b.kind == "exact"
    assert same_cluster(a, b) == (tokens(one) == tokens(two))
    assert (similarity(a, b) == 1.0) == (tokens(one) == tokens(two))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.lists(st.text(max_size=40), max_size=3))
def test_fingerprint_never_raises(data: bytes, recipients: list[str]) -> None:
    fp = fingerprint(data, recipients)
    assert Fingerprint.from_bytes(fp.to_bytes()) == fp
    assert 0.0 <= similarity(fp, fingerprint(data)) <= 1.0
