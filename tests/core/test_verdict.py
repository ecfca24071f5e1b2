"""Verdict types make wrong replies impossible to build (pure)."""

from __future__ import annotations

import pytest

from mailguard.core.verdict import Defer, Reject, VerdictError


def test_reject_needs_5xx() -> None:
    with pytest.raises(VerdictError):
        Reject(451, "4.7.1", "x", "r")
    with pytest.raises(VerdictError):
        Reject(550, "4.7.1", "x", "r")


def test_defer_needs_4xx() -> None:
    with pytest.raises(VerdictError):
        Defer(550, "5.7.1", "x", "r")
    with pytest.raises(VerdictError):
        Defer(451, "4.7", "x", "r")


def test_one_line_text() -> None:
    with pytest.raises(VerdictError):
        Reject(550, "5.7.1", "a\r\n250 ok", "r")


def test_softened() -> None:
    soft = Reject(550, "5.7.1", "Refused", "bulk", {"count": 21}).softened()
    assert soft == Defer(450, "4.7.1", "Refused", "bulk", {"count": 21})
    assert soft.reply() == "450 4.7.1 Refused"
    assert Reject(554, "5.7.1", "x", "r").softened().code == 454
