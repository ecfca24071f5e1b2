"""Human-readable durations and sizes: ``"90s"`` -> 90.0 seconds, ``"50MB"`` -> 50_000_000 bytes.

Responsible for: turning one duration or size as an administrator writes it into seconds
(``float``) or bytes (``int``), and saying precisely what is allowed when the text is wrong.
Must never: raise anything but ``ValueError`` on bad text, accept negative, fractional-byte or
non-finite values, know about TOML, key paths or the configuration schema (that is ``load``).
"""

from __future__ import annotations

import json
import re
from decimal import Decimal
from typing import Final

__all__ = ["DURATION_UNITS", "SIZE_UNITS", "parse_duration", "parse_size", "quote"]

# Seconds per duration unit.  Units are lower case only: "1M" could be read as a month.
DURATION_UNITS: Final[dict[str, Decimal]] = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
    "w": Decimal(7 * 86400),
}

# Bytes per size unit, keyed in lower case (units are matched case-insensitively).
SIZE_UNITS: Final[dict[str, int]] = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Far beyond any sensible setting, small enough for every consumer (timers, 64-bit counters).
MAX_DURATION: Final = Decimal(100 * 365 * 86400)
MAX_SIZE: Final = 2**63 - 1

# ASCII digits only (``\d`` would accept other scripts' digits), at most 30 of them in all.
_NUMBER_UNIT = re.compile(r"([0-9]{1,30}(?:\.[0-9]{1,30})?|\.[0-9]{1,30})[ ]?([A-Za-z]{0,3})")

_DURATION_HELP: Final = (
    "expected a non-negative number with an optional unit ms, s, m, h, d or w "
    '(seconds when omitted), e.g. "500ms", "90s", "15m", "24h", "45d", "1w"'
)
_SIZE_HELP: Final = (
    "expected a non-negative number with an optional unit B, KB, MB, GB, TB (1000-based) "
    'or KiB, MiB, GiB, TiB (1024-based), bytes when omitted, e.g. "512", "10KB", "50MB", "1GiB"'
)


def quote(value: object) -> str:
    """Show a user's value in messages: strings double-quoted and escaped, like TOML."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def _split(text: str) -> tuple[Decimal, str] | None:
    match = _NUMBER_UNIT.fullmatch(text.strip())
    if match is None:
        return None
    return Decimal(match.group(1)), match.group(2)


def parse_duration(text: str) -> float:
    """Seconds in a duration such as ``"90s"``, ``"1.5h"``, ``"500ms"`` or ``"30"`` (seconds)."""
    if not isinstance(text, str):
        raise ValueError(f"{quote(text)} is not a duration: {_DURATION_HELP}")
    split = _split(text)
    if split is None or split[1] not in ("", *DURATION_UNITS):
        raise ValueError(f"{quote(text)} is not a duration: {_DURATION_HELP}")
    number, unit = split
    seconds = number * DURATION_UNITS[unit or "s"]
    if seconds > MAX_DURATION:
        raise ValueError(f"{quote(text)} is too long a duration: at most 100 years")
    return float(seconds)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"50MB"`` (1000-based), ``"1GiB"`` (1024-based) or ``"512"``."""
    if not isinstance(text, str):
        raise ValueError(f"{quote(text)} is not a size: {_SIZE_HELP}")
    split = _split(text)
    if split is None or split[1].lower() not in ("", *SIZE_UNITS):
        raise ValueError(f"{quote(text)} is not a size: {_SIZE_HELP}")
    number, unit = split
    size = number * SIZE_UNITS[unit.lower() or "b"]
    if size != size.to_integral_value():
        raise ValueError(f"{quote(text)} is not a whole number of bytes")
    if size > MAX_SIZE:
        raise ValueError(f"{quote(text)} is too large a size: at most {MAX_SIZE} bytes")
    return int(size)
