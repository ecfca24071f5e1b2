"""Durations and sizes as administrators write them (pure, no I/O)."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailguard.config.units import DURATION_UNITS, SIZE_UNITS, parse_duration, parse_size

DURATION_HELP = (
    "expected a non-negative number with an optional unit ms, s, m, h, d or w "
    '(seconds when omitted), e.g. "500ms", "90s", "15m", "24h", "45d", "1w"'
)
SIZE_HELP = (
    "expected a non-negative number with an optional unit B, KB, MB, GB, TB (1000-based) "
    'or KiB, MiB, GiB, TiB (1024-based), bytes when omitted, e.g. "512", "10KB", "50MB", "1GiB"'
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("45d", 45 * 86400.0),
        ("1w", 7 * 86400.0),
        ("30", 30.0),
        ("0", 0.0),
        ("0s", 0.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("90 s", 90.0),
        (" 15m ", 900.0),
        ("0.001ms", 0.000001),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f'"" is not a duration: {DURATION_HELP}'),
        ("abc", f'"abc" is not a duration: {DURATION_HELP}'),
        ("-5s", f'"-5s" is not a duration: {DURATION_HELP}'),
        ("5x", f'"5x" is not a duration: {DURATION_HELP}'),
        ("1M", f'"1M" is not a duration: {DURATION_HELP}'),  # minutes or months? refuse
        ("1H", f'"1H" is not a duration: {DURATION_HELP}'),
        ("inf", f'"inf" is not a duration: {DURATION_HELP}'),
        ("nan", f'"nan" is not a duration: {DURATION_HELP}'),
        ("1e3", f'"1e3" is not a duration: {DURATION_HELP}'),
        ("1h30m", f'"1h30m" is not a duration: {DURATION_HELP}'),
        ("1.", f'"1." is not a duration: {DURATION_HELP}'),
        ("90  s", f'"90  s" is not a duration: {DURATION_HELP}'),
        ("٣s", f'"٣s" is not a duration: {DURATION_HELP}'),  # non-ASCII digit
        ("36501d", '"36501d" is too long a duration: at most 100 years'),
    ],
)
def test_bad_durations(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512", 512),
        ("0", 0),
        ("512B", 512),
        ("10KB", 10_000),
        ("50MB", 50_000_000),
        ("1GB", 10**9),
        ("2TB", 2 * 10**12),
        ("10KiB", 10_240),
        ("1MiB", 2**20),
        ("1GiB", 2**30),
        ("1TiB", 2**40),
        ("50mb", 50_000_000),
        ("50Mb", 50_000_000),
        ("1gib", 2**30),
        ("1 MiB", 2**20),
        ("1.5KiB", 1536),
        ("0.5MB", 500_000),
    ],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert type(parse_size(text)) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", f'"" is not a size: {SIZE_HELP}'),
        ("5XB", f'"5XB" is not a size: {SIZE_HELP}'),
        ("-1", f'"-1" is not a size: {SIZE_HELP}'),
        ("1e6", f'"1e6" is not a size: {SIZE_HELP}'),
        ("50 M B", f'"50 M B" is not a size: {SIZE_HELP}'),
        ("1.5", '"1.5" is not a whole number of bytes'),
        ("1.0001KB", '"1.0001KB" is not a whole number of bytes'),
        ("9999999TiB", f'"9999999TiB" is too large a size: at most {2**63 - 1} bytes'),
    ],
)
def test_bad_sizes(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert str(info.value) == message


@given(st.text())
def test_duration_parser_raises_only_value_error(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert 0.0 <= seconds < float("inf")


@given(st.text())
def test_size_parser_raises_only_value_error(text: str) -> None:
    try:
        size = parse_size(text)
    except ValueError:
        return
    assert 0 <= size < 2**63


_NUMBER_LIKE = st.text(alphabet="0123456789.-+eE sSmMhHdDwWkKgGtTiIbB", max_size=12)


@given(_NUMBER_LIKE)
def test_number_like_text_raises_only_value_error(text: str) -> None:
    for parse in (parse_duration, parse_size):
        with contextlib.suppress(ValueError):
            parse(text)


@given(st.integers(min_value=0, max_value=5000), st.sampled_from(sorted(DURATION_UNITS)))
def test_whole_durations_round_trip(number: int, unit: str) -> None:
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * float(DURATION_UNITS[unit]))


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZE_UNITS)))
def test_whole_sizes_round_trip(number: int, unit: str) -> None:
    assert parse_size(f"{number}{unit.upper()}") == number * SIZE_UNITS[unit]
