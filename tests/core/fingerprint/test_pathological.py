"""Hostile shapes of input that make naive patterns quadratic: each must finish promptly.

No timing is asserted; with a quadratic pattern these inputs take minutes instead of
milliseconds, which the suite's per-test timeout turns into a failure.
"""

from __future__ import annotations

import pytest

from mailguard.core.fingerprint import fingerprint, tokens, visible_text

HTML = {
    "unterminated anchors": "<a " * 50_000,
    "unterminated scripts": "<script" * 30_000,
    "declarations": "<!" * 50_000,
    "hiding values without tags": "<" + ":0" * 100_000,
    "deep hidden nesting": "<div style='display:none'>" + "<b>" * 50_000,
    "many hidden elements": "<p style=display:none>x</p>" * 20_000,
    "hidden attributes": "<p hidden> " * 30_000,
    "styles with references": '<p style="&' * 30_000,
    "unterminated images": "<img src=http://" * 30_000,
}
MESSAGES = {
    "long parameter": b"Content-Type: text/plain; " + b"a" * 100_000 + b"\n\nx",
    "boundary everywhere": b"Content-Type: multipart/mixed; boundary=-\n\n" + b"--" * 100_000,
    "encoded word starts": b"Subject: " + b"=?a?b?" * 30_000 + b"\n\nx",
    "many headers": b"a: b\n" * 50_000,
    "nested multiparts": (
        b"Content-Type: multipart/mixed; boundary=b\n\n"
        + b"--b\nContent-Type: multipart/mixed; boundary=b\n\n" * 20_000
    ),
}
TEXT = {
    "at signs": "a@" * 50_000,
    "schemes": "http://" * 30_000,
    "www": "www." * 50_000,
    "joined numbers": "0.0." * 50_000,
    "one long word": "a" * 200_000,
    "addresses": "a.b@c.d " * 20_000,
    "urls": "https://x.example/a/b?c " * 10_000,
}


@pytest.mark.parametrize("html", HTML.values(), ids=HTML.keys())
def test_html(html: str) -> None:
    assert isinstance(visible_text(html), str)


@pytest.mark.parametrize("message", MESSAGES.values(), ids=MESSAGES.keys())
def test_messages(message: bytes) -> None:
    assert fingerprint(message).kind in ("sketch", "exact")


@pytest.mark.parametrize("text", TEXT.values(), ids=TEXT.keys())
def test_text(text: str) -> None:
    assert isinstance(tokens(text), list)
