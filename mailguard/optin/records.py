"""Opt-in records: the record type, its validation, the file formats and the merge rules.

Responsible for: what a confirmed opt-in record is (Hextet AUP 3: who confirmed, when, from which
address, and the confirmation on file), normalizing recipients and list ids the same way for
storage and for look-ups, reading CSV and JSON Lines files into records with every bad row
reported as ``FILE:LINE: field: what is wrong``, writing the same formats back, the storage
form (JSON) and the rule an import applies when a record is already stored (``merge``).
Must never: do I/O (callers pass text or bytes in and get lines out), read a clock (``now``
is passed in), talk to Redis, or raise anything but ``FieldError`` / ``RecordError`` /
``OptInFileError`` for bad input.

File format (CSV with a header line, or JSON Lines with one object per line), fields:

=============  ========  ================================================================
recipient      required  the subscribed address; stored normalized (domain lower-cased and
                         IDNA-normalized, local part kept as given)
confirmed_at   required  when the subscription was confirmed: ISO 8601 / RFC 3339 with a
                         time zone, e.g. ``2024-05-01T12:00:00Z``
source_ip      required  the address the subscription was requested (confirmed) from
list_id        optional  the list (RFC 2919 List-Id, e.g. ``news.example.com``); empty is
                         the customer's default list (messages without List-Id)
requested_at   optional  when the subscription was requested (not after confirmed_at)
evidence       optional  the confirmation message's Message-ID, or a path/URL to it
imported_at    optional  when mailguard got the record (set on import when absent)
revoked_at     optional  when the recipient unsubscribed (a revoked record is kept as
                         evidence but confirms nothing)
=============  ========  ================================================================

Timestamps are stored and written in UTC (``...Z``).  Unknown columns / fields are errors.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Final, Literal

from email_validator import validate_email

try:  # the RFC 2142 mailbox names email-validator (>= 2.1) lower-cases in the local part
    from email_validator.rfc_constants import CASE_INSENSITIVE_MAILBOX_NAMES
except ImportError:  # pragma: no cover - email-validator 2.0 keeps every local part as given
    CASE_INSENSITIVE_MAILBOX_NAMES = []

from mailguard.store.keys import canonical_client

Format = Literal["csv", "jsonl"]
FORMATS: Final[tuple[Format, ...]] = ("csv", "jsonl")

REQUIRED_FIELDS: Final = ("recipient", "confirmed_at", "source_ip")
OPTIONAL_FIELDS: Final = ("list_id", "requested_at", "evidence", "imported_at", "revoked_at")
# Column order of exported files.
FILE_FIELDS: Final = (
    "recipient",
    "list_id",
    "confirmed_at",
    "source_ip",
    "requested_at",
    "evidence",
    "imported_at",
    "revoked_at",
)
_KNOWN: Final = frozenset(FILE_FIELDS)

MAX_EVIDENCE: Final = 2000
MAX_LIST_ID: Final = 255  # RFC 2919
# A timestamp may be this far ahead of ``now`` (clocks of the customer's systems drift).
FUTURE_TOLERANCE: Final = timedelta(hours=1)
STORAGE_VERSION: Final = 1

_CUSTOMER_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ATOM: Final = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LIST_ID: Final = re.compile(rf"{_ATOM}(?:\.{_ATOM})+")
# Plain ASCII addresses whose normal form is just the domain lower-cased (the hot path).
_FAST_LOCAL: Final = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")
_FAST_DOMAIN: Final = re.compile(r"(?:[A-Za-z0-9-]+\.)+[A-Za-z0-9-]+")
_CASELESS_LOCAL: Final = frozenset(CASE_INSENSITIVE_MAILBOX_NAMES)


def show(value: object, limit: int = 80) -> str:
    """A user's value quoted for a one-line message (escaped, shortened, always encodable)."""
    if not isinstance(value, str):
        return repr(value)[:limit]
    text = value if len(value) <= limit else value[:limit] + "…"
    shown = json.dumps(text, ensure_ascii=False)
    try:
        shown.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        shown = json.dumps(text)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in shown)


# ---------------------------------------------------------------------------------------------
# Errors


class FieldError(ValueError):
    """One field's value is wrong; ``str()`` is ``field: what is wrong``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class RecordError(ValueError):
    """A record could not be built; ``problems`` lists every field that is wrong."""

    def __init__(self, problems: Iterable[FieldError]) -> None:
        self.problems: tuple[FieldError, ...] = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class RowError:
    """One problem in a file: ``FILE:LINE: field: what is wrong``."""

    source: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.field}: {self.message}"


class OptInFileError(Exception):
    """A file has bad rows (or cannot be read at all: ``fatal``); ``errors`` lists them all."""

    def __init__(self, errors: Iterable[RowError], *, fatal: bool, good_rows: int = 0) -> None:
        self.errors: tuple[RowError, ...] = tuple(errors)
        self.fatal = fatal  # header or syntax problem: --skip-bad cannot help
        self.good_rows = good_rows  # rows that were fine (not imported)
        super().__init__("\n".join(str(e) for e in self.errors))


# ---------------------------------------------------------------------------------------------
# Values


def normalize_recipient(address: str) -> str:
    """The stored form of ``address``: domain lower-cased (IDNA U-label), local part kept.

    ``<bob@Example.ORG>`` and ``bob@example.org`` are one recipient; ``Bob@...`` is another (the
    local part is the receiving system's to interpret).  ``FieldError`` if it is not a valid
    address (email-validator syntax rules; no DNS look-up).
    """
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1].strip()
    if not text:
        raise FieldError("recipient", "is empty")
    try:
        valid = validate_email(text, check_deliverability=False, allow_quoted_local=True)
    except ValueError as exc:  # EmailNotValidError, and UnicodeError from IDNA
        raise FieldError(
            "recipient", f"{show(address)} is not a valid e-mail address: {exc}"
        ) from None
    return valid.normalized


def lookup_form(address: str) -> str | None:
    """``normalize_recipient(address)``, or ``None`` if it is not valid (so nothing matches).

    Fast for plain ASCII addresses (the common case at end of DATA): their normal form is the
    address with the domain lower-cased, which is what ``normalize_recipient`` returns too,
    except for the RFC 2142 mailbox names (``INFO@``, ``Postmaster@``...), whose local part
    email-validator lower-cases as well: those take the full way.
    """
    local, at, domain = address.rpartition("@")
    if (
        at
        and _FAST_LOCAL.fullmatch(local)
        and _FAST_DOMAIN.fullmatch(domain)
        and "xn--" not in domain.lower()
        and local.lower() not in _CASELESS_LOCAL
    ):
        return f"{local}@{domain.lower()}"
    try:
        return normalize_recipient(address)
    except FieldError:
        return None


def normalize_list_id(value: str) -> str:
    """The stored form of a list id (RFC 2919: case-insensitive dot-atom, at most 255 octets).

    Accepts a whole ``List-Id`` header value (``Our News <news.example.com>``); ``""`` (or
    blanks) is the customer's default list.  ``FieldError`` otherwise.
    """
    text = value.strip()
    if text.endswith(">") and "<" in text:
        text = text[text.rindex("<") + 1 : -1].strip()
    if not text:
        return ""
    text = text.lower()
    if len(text) > MAX_LIST_ID:
        raise FieldError("list_id", f"{show(value)} is longer than {MAX_LIST_ID} characters")
    if not _LIST_ID.fullmatch(text):
        raise FieldError(
            "list_id",
            f"{show(value)} is not a List-Id (RFC 2919): expected a dotted name such as "
            '"news.example.com", optionally as "Our News <news.example.com>"',
        )
    return text


def parse_timestamp(value: str, field: str) -> datetime:
    """An ISO 8601 / RFC 3339 timestamp with a time zone, as a UTC datetime; else ``FieldError``."""
    text = value.strip()
    example = "e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise FieldError(field, f"{show(value)} is not an ISO 8601 timestamp ({example})") from None
    if "T" not in text.upper() and " " not in text:
        raise FieldError(field, f"{show(value)} has no time of day ({example})")
    if parsed.utcoffset() is None:
        raise FieldError(
            field, f"{show(value)} has no time zone: add Z (UTC) or an offset such as +02:00"
        )
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise FieldError(field, f"{show(value)} is out of range") from None


def format_timestamp(moment: datetime) -> str:
    """``moment`` in UTC as RFC 3339 text (``2024-05-01T12:00:00Z``, fractions only if any)."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_source_ip(value: str) -> str:
    """The canonical text of an IP address (an IPv4-mapped IPv6 address becomes IPv4)."""
    try:
        return canonical_client(value)
    except ValueError:
        raise FieldError("source_ip", f"{show(value)} is not an IP address") from None


def check_evidence(value: str) -> str:
    text = value.strip()
    if len(text) > MAX_EVIDENCE:
        raise FieldError("evidence", f"is longer than {MAX_EVIDENCE} characters")
    if not text.isprintable():
        raise FieldError("evidence", f"{show(value)} must be one line of printable text")
    return text


def check_customer(value: str) -> str:
    if not _CUSTOMER_ID.fullmatch(value):
        raise FieldError("customer", f"{show(value)} is not a valid customer id")
    return value


# ---------------------------------------------------------------------------------------------
# The record


@dataclass(frozen=True, slots=True, kw_only=True)
class OptInRecord:
    """One recipient's confirmed subscription to one list of one customer.

    Construction checks the invariants that are cheap (customer id syntax, time zones, order of
    the timestamps); ``check_normalized`` the rest.  Build records from user input with
    ``record_from_fields``, which normalizes.
    """

    customer: str
    list_id: str = ""  # "" = the customer's default list
    recipient: str
    confirmed_at: datetime
    source_ip: str
    requested_at: datetime | None = None
    evidence: str = ""
    imported_at: datetime
    revoked_at: datetime | None = None

    def __post_init__(self) -> None:
        check_customer(self.customer)
        for name in ("confirmed_at", "requested_at", "imported_at", "revoked_at"):
            moment = getattr(self, name)
            if moment is not None and (
                not isinstance(moment, datetime) or moment.utcoffset() is None
            ):
                raise FieldError(name, "must be a datetime with a time zone")
        if self.requested_at is not None and self.requested_at > self.confirmed_at:
            raise FieldError(
                "requested_at",
                f"{format_timestamp(self.requested_at)} is after confirmed_at "
                f"{format_timestamp(self.confirmed_at)}",
            )
        if self.revoked_at is not None and self.revoked_at < self.confirmed_at:
            raise FieldError(
                "revoked_at",
                f"{format_timestamp(self.revoked_at)} is before confirmed_at "
                f"{format_timestamp(self.confirmed_at)}",
            )

    @property
    def active(self) -> bool:
        """Whether the record confirms the subscription (it is not revoked)."""
        return self.revoked_at is None

    def check_normalized(self) -> None:
        """``FieldError`` unless recipient, list id, source address and evidence are normal."""
        checks = (
            ("recipient", normalize_recipient),
            ("list_id", normalize_list_id),
            ("source_ip", parse_source_ip),
            ("evidence", check_evidence),
        )
        for name, normal in checks:
            value = getattr(self, name)
            if normal(value) != value:
                raise FieldError(name, f"{show(value)} is not in normal form ({normal.__name__})")

    def same_content(self, other: OptInRecord) -> bool:
        """Equal in everything but ``imported_at`` (so importing a record again changes nothing)."""
        return dataclasses.replace(self, imported_at=other.imported_at) == other

    def to_fields(self) -> dict[str, str]:
        """The file form: every field of ``FILE_FIELDS`` as text, ``""`` when absent."""
        return {
            "recipient": self.recipient,
            "list_id": self.list_id,
            "confirmed_at": format_timestamp(self.confirmed_at),
            "source_ip": self.source_ip,
            "requested_at": _optional_time(self.requested_at),
            "evidence": self.evidence,
            "imported_at": format_timestamp(self.imported_at),
            "revoked_at": _optional_time(self.revoked_at),
        }

    def to_json(self) -> str:
        """The storage form (customer and list are in the key, not in the value)."""
        data: dict[str, object] = {"v": STORAGE_VERSION}
        data.update((k, v) for k, v in self.to_fields().items() if v and k not in ("list_id",))
        return json.dumps(data, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, customer: str, list_id: str, text: str | bytes) -> OptInRecord:
        """Read the storage form back; ``ValueError`` if it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != STORAGE_VERSION:
            raise ValueError("not an opt-in record of storage version 1")

        def time(name: str) -> datetime | None:
            value = data.get(name)
            return None if value is None else datetime.fromisoformat(str(value))

        confirmed, imported = time("confirmed_at"), time("imported_at")
        if confirmed is None or imported is None:
            raise ValueError("confirmed_at or imported_at missing")
        return cls(
            customer=customer,
            list_id=list_id,
            recipient=str(data["recipient"]),
            confirmed_at=confirmed,
            source_ip=str(data["source_ip"]),
            requested_at=time("requested_at"),
            evidence=str(data.get("evidence", "")),
            imported_at=imported,
            revoked_at=time("revoked_at"),
        )


def _optional_time(moment: datetime | None) -> str:
    return "" if moment is None else format_timestamp(moment)


def is_active_json(text: str | bytes) -> bool:
    """Whether a stored record (``to_json`` form) is not revoked; ``ValueError`` if corrupt."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("v") != STORAGE_VERSION:
        raise ValueError("not an opt-in record of storage version 1")
    return data.get("revoked_at") is None


def record_from_fields(
    fields: Mapping[str, object],
    *,
    customer: str,
    imported_at: datetime,
    now: datetime | None = None,
    list_id: str | None = None,
) -> OptInRecord:
    """Build a normalized record from a row's raw values (strings; ``None`` or ``""`` absent).

    ``list_id`` (the ``--list-id`` option) is the list of rows without one; a row naming a
    different list is an error.  Timestamps more than ``FUTURE_TOLERANCE`` after ``now``
    (default ``imported_at``) are errors.  ``RecordError`` lists every bad field.
    """
    now = imported_at if now is None else now
    problems: list[FieldError] = []
    text: dict[str, str] = {}
    for name, value in fields.items():
        if name not in _KNOWN:
            problems.append(FieldError(name, f"unknown field{_suggest(name)}"))
        elif value is None:
            continue
        elif not isinstance(value, str):
            problems.append(FieldError(name, f"must be a string, not {_json_type(value)}"))
        elif value.strip():
            text[name] = value
    for name in REQUIRED_FIELDS:
        if name not in text and not any(p.field == name for p in problems):
            given = isinstance(fields.get(name), str)
            problems.append(FieldError(name, "is empty" if given else "is missing"))

    values: dict[str, object] = {}
    converters: tuple[tuple[str, Callable[[str], object]], ...] = (
        ("recipient", normalize_recipient),
        ("list_id", normalize_list_id),
        ("confirmed_at", lambda v: parse_timestamp(v, "confirmed_at")),
        ("source_ip", parse_source_ip),
        ("requested_at", lambda v: parse_timestamp(v, "requested_at")),
        ("evidence", check_evidence),
        ("imported_at", lambda v: parse_timestamp(v, "imported_at")),
        ("revoked_at", lambda v: parse_timestamp(v, "revoked_at")),
    )
    for name, convert in converters:
        if name not in text:
            continue
        try:
            values[name] = value = convert(text[name])
        except FieldError as exc:
            problems.append(exc)
            continue
        if isinstance(value, datetime) and value > now + FUTURE_TOLERANCE:
            problems.append(FieldError(name, f"{show(text[name])} is in the future"))

    default_list = ""
    try:
        default_list = "" if list_id is None else normalize_list_id(list_id)
    except FieldError as exc:
        problems.append(FieldError("--list-id", exc.message))
    row_list = values.get("list_id", "")
    if list_id is not None and default_list and row_list and row_list != default_list:
        problems.append(
            FieldError("list_id", f"{show(row_list)} differs from --list-id {show(default_list)}")
        )
    if problems:
        raise RecordError(problems)
    try:
        return OptInRecord(
            customer=check_customer(customer),
            list_id=str(row_list or default_list),
            recipient=str(values["recipient"]),
            confirmed_at=_time(values["confirmed_at"]),
            source_ip=str(values["source_ip"]),
            requested_at=_time_or_none(values.get("requested_at")),
            evidence=str(values.get("evidence", "")),
            imported_at=_time_or_none(values.get("imported_at")) or imported_at.astimezone(UTC),
            revoked_at=_time_or_none(values.get("revoked_at")),
        )
    except FieldError as exc:
        raise RecordError([exc]) from None


def _time(value: object) -> datetime:
    assert isinstance(value, datetime)
    return value


def _time_or_none(value: object) -> datetime | None:
    return None if value is None else _time(value)


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, FILE_FIELDS, n=1, cutoff=0.6)
    return f" (did you mean {show(close[0])}?)" if close else f" (known: {', '.join(FILE_FIELDS)})"


# ---------------------------------------------------------------------------------------------
# Merging an incoming record with the stored one


class Outcome(Enum):
    """What importing one record did."""

    ADDED = "added"  # nothing was stored for this recipient and list
    UPDATED = "updated"  # the stored record differed and was replaced
    UNCHANGED = "unchanged"  # the stored record is the same (imported_at aside)
    KEPT = "kept"  # the stored record differs and was kept (import without replace)
    KEPT_REVOKED = "kept_revoked"  # revoked after this confirmation: an unsubscribe stands


def merge(
    stored: OptInRecord | None, incoming: OptInRecord, *, replace: bool
) -> tuple[Outcome, OptInRecord | None]:
    """The outcome of importing ``incoming`` over ``stored``, and the record to write (if any).

    * nothing stored: add; the same content (``imported_at`` aside): unchanged.
    * an unsubscribe is never undone by a confirmation that is not newer: a stored revoked
      record stays when ``incoming`` is active and confirmed at or before the revocation.
    * otherwise a different record replaces the stored one only with ``replace``.
    """
    if stored is None:
        return Outcome.ADDED, incoming
    if stored.same_content(incoming):
        return Outcome.UNCHANGED, None
    if (
        stored.revoked_at is not None
        and incoming.revoked_at is None
        and incoming.confirmed_at <= stored.revoked_at
    ):
        return Outcome.KEPT_REVOKED, None
    if replace:
        return Outcome.UPDATED, incoming
    return Outcome.KEPT, None


# ---------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """The good records of a file, and the rows skipped (only with ``skip_bad``)."""

    records: tuple[OptInRecord, ...]
    skipped: tuple[RowError, ...]
    rows: int  # data rows seen (blank lines aside)


def format_of(name: str) -> Format | None:
    """The format a file name implies (``.csv``; ``.jsonl``, ``.ndjson``), else ``None``."""
    lowered = name.lower()
    if lowered.endswith(".csv"):
        return "csv"
    if lowered.endswith((".jsonl", ".ndjson")):
        return "jsonl"
    return None


def parse_file(
    data: bytes | str,
    *,
    fmt: Format,
    source: str,
    customer: str,
    imported_at: datetime,
    now: datetime | None = None,
    list_id: str | None = None,
    skip_bad: bool = False,
) -> ParsedFile:
    """Parse a whole file (UTF-8, a BOM allowed) into normalized records.

    Raises ``OptInFileError`` listing every bad row, unless ``skip_bad`` (then the bad rows are
    in ``skipped``); always for problems no row can survive (not UTF-8, a bad header, broken
    CSV quoting).  A recipient listed twice for one list is an error unless both rows agree.
    """
    text = _decode(data, source)
    rows = _csv_rows(text, source) if fmt == "csv" else _jsonl_rows(text, source)
    records: dict[tuple[str, str], tuple[int, OptInRecord]] = {}
    errors: list[RowError] = []
    seen = 0
    for line, row in rows:
        seen += 1
        if isinstance(row, RowError):
            errors.append(row)
            continue
        try:
            record = record_from_fields(
                row, customer=customer, imported_at=imported_at, now=now, list_id=list_id
            )
        except RecordError as exc:
            errors.extend(RowError(source, line, p.field, p.message) for p in exc.problems)
            continue
        key = (record.list_id, record.recipient)
        first = records.get(key)
        if first is None:
            records[key] = (line, record)
        elif not first[1].same_content(record):
            errors.append(
                RowError(
                    source,
                    line,
                    "recipient",
                    f"{show(record.recipient)} is also on line {first[0]} with other values",
                )
            )
    if errors and not skip_bad:
        bad_lines = {e.line for e in errors}
        good = sum(1 for line, _ in records.values() if line not in bad_lines)
        raise OptInFileError(errors, fatal=False, good_rows=good)
    bad_lines = {e.line for e in errors}
    good_records = tuple(r for line, r in records.values() if line not in bad_lines)
    return ParsedFile(good_records, tuple(errors), seen)


def _decode(data: bytes | str, source: str) -> str:
    if isinstance(data, str):
        return data.removeprefix("\ufeff")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise OptInFileError(
            [RowError(source, line, "file", f"not UTF-8 (byte 0x{data[exc.start]:02x})")],
            fatal=True,
        ) from None


Row = tuple[int, dict[str, object] | RowError]


def _csv_rows(text: str, source: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    line = 0

    def fatal(field: str, message: str) -> OptInFileError:
        return OptInFileError([RowError(source, line, field, message)], fatal=True)

    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            line = reader.line_num or start
            raise fatal("csv", str(exc)) from None
        line = start
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = _csv_header(row, source, line)
            continue
        if len(row) != len(header):
            yield (
                line,
                RowError(
                    source, line, "row", f"has {len(row)} fields, the header has {len(header)}"
                ),
            )
            continue
        yield line, dict(zip(header, row, strict=True))
    if header is None:
        line = max(line, 1)
        raise fatal(
            "header",
            f"the file is empty: expected a header line such as {','.join(REQUIRED_FIELDS)}",
        )


def _csv_header(row: list[str], source: str, line: int) -> list[str]:
    names = [cell.strip().lower() for cell in row]
    problems: list[str] = []
    unknown = [n for n in names if n not in _KNOWN]
    for name in dict.fromkeys(unknown):
        problems.append(
            f"unknown column {show(name)}{_suggest(name)}" if name else "a column has no name"
        )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"repeated column(s) {', '.join(show(n) for n in duplicates)}")
    missing = [n for n in REQUIRED_FIELDS if n not in names]
    if missing:
        problems.append(f"missing required column(s) {', '.join(missing)}")
    if problems:
        raise OptInFileError([RowError(source, line, "header", p) for p in problems], fatal=True)
    return names


def _jsonl_rows(text: str, source: str) -> Iterator[Row]:
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except RecursionError:
            yield number, RowError(source, number, "row", "not valid JSON: nested too deeply")
            continue
        except ValueError as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
            yield number, RowError(source, number, "row", f"not valid JSON: {reason}")
            continue
        if not isinstance(value, dict):
            yield (
                number,
                RowError(source, number, "row", f"must be a JSON object, not {_json_type(value)}"),
            )
            continue
        yield number, {str(k): v for k, v in value.items()}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def header_line(fmt: Format) -> str:
    """The first line of a file of ``fmt`` (CSV's header), ``""`` for JSON Lines."""
    return _csv_line(FILE_FIELDS) if fmt == "csv" else ""


def format_line(record: OptInRecord, fmt: Format) -> str:
    """One record as a line of ``fmt``, ending in a newline."""
    fields = record.to_fields()
    if fmt == "csv":
        return _csv_line(fields.values())
    return json.dumps({k: v for k, v in fields.items() if v}, ensure_ascii=False) + "\n"


def _csv_line(values: Iterable[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(values)
    return buffer.getvalue()


def format_records(records: Iterable[OptInRecord], fmt: Format) -> Iterator[str]:
    """The lines of a file holding ``records`` (CSV with its header line)."""
    header = header_line(fmt)
    if header:
        yield header
    for record in records:
        yield format_line(record, fmt)
