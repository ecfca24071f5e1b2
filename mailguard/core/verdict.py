"""Typed policy verdicts: what the core decides about a recipient or a message.

Responsible for: making wrong replies impossible to build.  A ``Defer`` always carries a 4xx
basic code with a 4.x.x enhanced code, a ``Reject`` a 5xx with 5.x.x (RFC 3463), and both name the
rule that refused and its numbers, for the decision log.
Must never: render protocol bytes, log, or do I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


class VerdictError(ValueError):
    """A verdict was built with codes that contradict its kind (a programming error)."""


@dataclass(frozen=True, slots=True)
class Accept:
    """Let the recipient or message through (the upstream still has the last word)."""

    rule: str = "default"
    numbers: Mapping[str, object] = field(default_factory=dict)

    action: ClassVar[str] = "accept"


@dataclass(frozen=True, slots=True)
class _Refusal:
    code: int
    enhanced: str
    text: str
    rule: str
    numbers: Mapping[str, object] = field(default_factory=dict)

    _first_digit: ClassVar[str] = ""
    action: ClassVar[str] = ""

    def __post_init__(self) -> None:
        digit = self._first_digit
        if not (str(self.code).startswith(digit) and 100 <= self.code <= 599):
            raise VerdictError(f"{type(self).__name__} needs a {digit}xx code, got {self.code}")
        if not _ENHANCED.match(self.enhanced) or not self.enhanced.startswith(digit):
            raise VerdictError(
                f"{type(self).__name__} needs a {digit}.x.x enhanced code, got {self.enhanced!r}"
            )
        if "\r" in self.text or "\n" in self.text:
            raise VerdictError("reply text must be one line")

    def reply(self) -> str:
        """The SMTP reply line, without CRLF."""
        return f"{self.code} {self.enhanced} {self.text}"


@dataclass(frozen=True, slots=True)
class Reject(_Refusal):
    """Refuse permanently (5xx)."""

    _first_digit: ClassVar[str] = "5"
    action: ClassVar[str] = "reject"

    def softened(self) -> Defer:
        """The same refusal as a temporary failure (``soft_bounce``, as in Postfix)."""
        return Defer(
            code=450 if self.code == 550 else 400 + self.code % 100,
            enhanced="4" + self.enhanced[1:],
            text=self.text,
            rule=self.rule,
            numbers=self.numbers,
        )


@dataclass(frozen=True, slots=True)
class Defer(_Refusal):
    """Refuse temporarily (4xx): the client should retry later."""

    _first_digit: ClassVar[str] = "4"
    action: ClassVar[str] = "defer"


Verdict = Accept | Reject | Defer
