"""Pure tests of ``mailguard.optin.records``: values, the record, merge rules and file formats.

No Redis, no clock: ``NOW`` is passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import string
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from mailguard.optin.records import (
    FILE_FIELDS,
    FieldError,
    Format,
    OptInFileError,
    OptInRecord,
    Outcome,
    RecordError,
    format_of,
    format_records,
    format_timestamp,
    is_active_json,
    lookup_form,
    merge,
    normalize_list_id,
    normalize_recipient,
    parse_file,
    parse_timestamp,
    record_from_fields,
)

NOW = datetime(2025, 1, 1, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)


def record(**changes: object) -> OptInRecord:
    base = OptInRecord(
        customer="acme",
        recipient="bob@example.org",
        confirmed_at=T1,
        source_ip="192.0.2.1",
        imported_at=NOW,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def parse(text: str | bytes, fmt: Format = "csv", **options: object) -> tuple[OptInRecord, ...]:
    return parse_file(
        text,
        fmt=fmt,
        source="f",
        customer="acme",
        imported_at=NOW,
        **options,  # type: ignore[arg-type]
    ).records


def errors(text: str | bytes, fmt: Format = "csv", **options: object) -> list[str]:
    with pytest.raises(OptInFileError) as caught:
        parse(text, fmt, **options)
    return [str(e) for e in caught.value.errors]


# -- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("bob@example.org", "bob@example.org"),
        ("Bob@Example.ORG", "Bob@example.org"),  # local part kept, domain lower-cased
        ("<bob@EXAMPLE.org>", "bob@example.org"),
        ("  bob@example.org ", "bob@example.org"),
        ('"bob"@example.org', "bob@example.org"),  # needless quotes dropped
        ("bob@xn--bcher-kva.example", "bob@bücher.example"),  # one form for A- and U-labels
        ("bob@BÜCHER.example", "bob@bücher.example"),
        ("Émile@example.org", "Émile@example.org"),
    ],
)
def test_normalize_recipient(given: str, normal: str) -> None:
    assert normalize_recipient(given) == normal
    assert lookup_form(given) == normal


@pytest.mark.parametrize(
    "bad", ["", "bob", "bob@", "@example.org", "a..b@example.org", "bob@localhost", "b c@x.org"]
)
def test_normalize_recipient_rejects(bad: str) -> None:
    with pytest.raises(FieldError) as caught:
        normalize_recipient(bad)
    assert caught.value.field == "recipient"
    assert lookup_form(bad) is None


@given(
    st.from_regex(
        r"[A-Za-z0-9._%+-]{1,20}@[A-Za-z0-9-]{1,10}(\.[A-Za-z0-9-]{1,10}){1,3}", fullmatch=True
    )
)
def test_lookup_form_fast_path_agrees_with_normalize(address: str) -> None:
    try:
        normal = normalize_recipient(address)
    except FieldError:
        return  # invalid: stored records never have this form, so a lookup cannot match
    assert lookup_form(address) == normal


@pytest.mark.parametrize(
    ("given", "normal"),
    [
        ("", ""),
        ("  ", ""),
        ("news.example.com", "news.example.com"),
        ("News.Example.COM", "news.example.com"),  # RFC 2919: case-insensitive
        ("Our News <news.example.com>", "news.example.com"),
        ("<News.example.com>", "news.example.com"),
    ],
)
def test_normalize_list_id(given: str, normal: str) -> None:
    assert normalize_list_id(given) == normal


@pytest.mark.parametrize("bad", ["news", "a b.example", "x" * 250 + ".example", "<>x", "a..b"])
def test_normalize_list_id_rejects(bad: str) -> None:
    with pytest.raises(FieldError):
        normalize_list_id(bad)


def test_parse_timestamp() -> None:
    assert parse_timestamp("2024-05-01T12:00:00+02:00", "f") == T1
    assert parse_timestamp("2024-05-01T10:00:00Z", "f") == T1
    assert format_timestamp(T1) == "2024-05-01T10:00:00Z"
    assert format_timestamp(T1 + timedelta(microseconds=5)) == "2024-05-01T10:00:00.000005Z"
    for bad, why in [
        ("2024-05-01T10:00:00", "no time zone"),
        ("2024-05-01", "no time of day"),
        ("yesterday", "not an ISO 8601"),
        ("0001-01-01T00:00:00+01:00", "out of range"),
    ]:
        with pytest.raises(FieldError, match=why):
            parse_timestamp(bad, "confirmed_at")


# -- the record -----------------------------------------------------------------------------


def test_record_invariants() -> None:
    with pytest.raises(FieldError, match="requested_at"):
        record(requested_at=T1 + timedelta(seconds=1))
    with pytest.raises(FieldError, match="revoked_at"):
        record(revoked_at=T1 - timedelta(seconds=1))
    with pytest.raises(FieldError, match="time zone"):
        record(confirmed_at=datetime(2024, 5, 1))
    with pytest.raises(FieldError, match="customer"):
        record(customer="no spaces")
    with pytest.raises(FieldError, match="recipient"):
        record(recipient="Bob@EXAMPLE.org").check_normalized()
    record(evidence="<c@x>", list_id="news.example.com").check_normalized()


def test_storage_form_round_trips() -> None:
    full = record(
        list_id="news.example.com",
        requested_at=T1 - timedelta(minutes=5),
        evidence="<confirm-1@lists.example>",
        revoked_at=NOW,
    )
    for r in (record(), full):
        text = r.to_json()
        assert OptInRecord.from_json(r.customer, r.list_id, text) == r
        assert is_active_json(text) is r.active
    assert "list_id" not in json.loads(full.to_json())  # it is in the key


def test_record_from_fields_collects_every_problem() -> None:
    with pytest.raises(RecordError) as caught:
        record_from_fields(
            {"recipient": "nope", "confirmed_at": "2030-01-01T00:00:00Z", "evidence": "a\tb"},
            customer="acme",
            imported_at=NOW,
        )
    fields = [p.field for p in caught.value.problems]
    assert fields == ["source_ip", "recipient", "confirmed_at", "evidence"]
    assert "in the future" in str(caught.value)


def test_record_from_fields_list_id_option() -> None:
    row = {"recipient": "a@example.org", "confirmed_at": "2024-05-01T10:00:00Z", "source_ip": "::1"}
    assert (
        record_from_fields(row, customer="acme", imported_at=NOW, list_id="L.example").list_id
        == "l.example"
    )
    same = {**row, "list_id": "l.EXAMPLE"}
    assert (
        record_from_fields(same, customer="acme", imported_at=NOW, list_id="L.example").list_id
        == "l.example"
    )
    with pytest.raises(RecordError, match="differs from --list-id"):
        record_from_fields(
            {**row, "list_id": "other.example"},
            customer="acme",
            imported_at=NOW,
            list_id="l.example",
        )


# -- merge ----------------------------------------------------------------------------------


def test_merge_rules() -> None:
    stored = record(evidence="<a@x>")
    later = NOW + timedelta(days=1)
    assert merge(None, stored, replace=False) == (Outcome.ADDED, stored)
    again = dataclasses.replace(stored, imported_at=later)
    assert merge(stored, again, replace=False) == (Outcome.UNCHANGED, None)
    assert merge(stored, again, replace=True) == (Outcome.UNCHANGED, None)
    other = dataclasses.replace(stored, evidence="<b@x>")
    assert merge(stored, other, replace=False) == (Outcome.KEPT, None)
    assert merge(stored, other, replace=True) == (Outcome.UPDATED, other)
    # An unsubscribe is never undone by a confirmation that is not newer ...
    revoked = dataclasses.replace(stored, revoked_at=T1 + timedelta(days=1))
    assert merge(revoked, stored, replace=True) == (Outcome.KEPT_REVOKED, None)
    assert merge(revoked, other, replace=True) == (Outcome.KEPT_REVOKED, None)
    # ... but a newer confirmation (a new subscription) replaces it when asked to.
    renewed = dataclasses.replace(stored, confirmed_at=T1 + timedelta(days=2))
    assert merge(revoked, renewed, replace=False) == (Outcome.KEPT, None)
    assert merge(revoked, renewed, replace=True) == (Outcome.UPDATED, renewed)
    # A revocation coming in is applied like any other difference.
    assert merge(stored, revoked, replace=True) == (Outcome.UPDATED, revoked)


# -- files ----------------------------------------------------------------------------------

CSV = (
    "recipient,confirmed_at,source_ip,list_id,evidence,requested_at\n"
    "Bob@Example.ORG,2024-05-01T12:00:00+02:00,::ffff:192.0.2.1,,<c1@l.example>,\n"
    "\n"
    'carol@example.org,2024-05-02T00:00:00Z,2001:DB8::1,News <news.example.com>,"x, y",'
    "2024-05-01T23:59:00Z\n"
)


def test_parse_csv() -> None:
    bob, carol = parse(CSV)
    assert bob == record(recipient="Bob@example.org", evidence="<c1@l.example>")
    assert carol.list_id == "news.example.com"
    assert carol.source_ip == "2001:db8::1"
    assert carol.evidence == "x, y"
    assert carol.requested_at == datetime(2024, 5, 1, 23, 59, tzinfo=UTC)


def test_parse_csv_header_variants() -> None:
    text = (
        "\ufeff Recipient ,SOURCE_IP,confirmed_at\r\n"
        "a@example.org,192.0.2.1,2024-05-01T10:00:00Z\r\n"
    )
    (only,) = parse(text.encode("utf-8"))
    assert only.recipient == "a@example.org"


def test_csv_errors_name_file_line_and_field() -> None:
    text = (
        "recipient,confirmed_at,source_ip\n"
        "ok@example.org,2024-05-01T10:00:00Z,192.0.2.1\n"
        "bad,2024-05-01T10:00:00Z,192.0.2.1\n"
        "\n"
        "c@example.org,2024-05-01,300.1.1.1\n"
        "d@example.org,2024-05-01T10:00:00Z\n"
        '"multi\nline@example.org",2024-05-01T10:00:00Z,192.0.2.1\n'
        "e@example.org,,192.0.2.1\n"
    )
    assert errors(text) == [
        'f:3: recipient: "bad" is not a valid e-mail address: '
        "An email address must have an @-sign.",
        'f:5: confirmed_at: "2024-05-01" has no time of day '
        "(e.g. 2024-05-01T12:00:00Z or 2024-05-01T14:00:00+02:00)",
        'f:5: source_ip: "300.1.1.1" is not an IP address',
        "f:6: row: has 2 fields, the header has 3",
        'f:7: recipient: "multi\\nline@example.org" is not a valid e-mail address: '
        "The email address contains invalid characters before the @-sign: U+000A.",
        "f:9: confirmed_at: is empty",
    ]


def test_nothing_imported_from_a_bad_file_unless_skip_bad() -> None:
    text = (
        "recipient,confirmed_at,source_ip\nok@example.org,2024-05-01T10:00:00Z,192.0.2.1\nbad,x,y\n"
    )
    with pytest.raises(OptInFileError) as caught:
        parse(text)
    assert not caught.value.fatal
    assert caught.value.good_rows == 1
    parsed = parse_file(
        text, fmt="csv", source="f", customer="acme", imported_at=NOW, skip_bad=True
    )
    assert [r.recipient for r in parsed.records] == ["ok@example.org"]
    assert {e.line for e in parsed.skipped} == {3}
    assert parsed.rows == 2


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "f:1: header: the file is empty"),
        ("recipient,confirmed_at\n", "f:1: header: missing required column(s) source_ip"),
        (
            "recipient,confirmed_at,source_ip,evidnce,colour\n",
            'f:1: header: unknown column "evidnce" (did you mean "evidence"?)',
        ),
        ("recipient,confirmed_at,source_ip,recipient\n", 'repeated column(s) "recipient"'),
        ('recipient,confirmed_at,source_ip\n"a,b\n', "f:2: csv: unexpected end of data"),
    ],
)
def test_fatal_file_errors(text: str, message: str) -> None:
    with pytest.raises(OptInFileError) as caught:
        parse(text, skip_bad=True)
    assert caught.value.fatal
    assert any(message in str(e) for e in caught.value.errors), caught.value.errors


def test_unknown_columns_are_all_named() -> None:
    (_problem, other) = errors("recipient,confirmed_at,source_ip,evidnce,colour\n")
    assert '"colour"' in other
    assert "known: recipient, list_id" in other


def test_not_utf8() -> None:
    assert errors(b"recipient,confirmed_at,source_ip\n\xff\n") == [
        "f:2: file: not UTF-8 (byte 0xff)"
    ]


def test_duplicates() -> None:
    row = "a@example.org,2024-05-01T10:00:00Z,192.0.2.1\n"
    header = "recipient,confirmed_at,source_ip\n"
    assert len(parse(header + row + row.replace("a@", "a@").upper().replace("A@", "a@"))) == 1
    text = header + row + "a@example.org,2024-05-01T10:00:00Z,192.0.2.2\n"
    assert errors(text) == ['f:3: recipient: "a@example.org" is also on line 2 with other values']
    # the same recipient in two lists is two records
    two = (
        "recipient,confirmed_at,source_ip,list_id\n"
        + row.strip()
        + ",\n"
        + row.strip()
        + ",l.example\n"
    )
    assert len(parse(two)) == 2


def test_parse_jsonl() -> None:
    text = (
        '{"recipient": "Bob@Example.ORG", "confirmed_at": "2024-05-01T10:00:00Z", '
        '"source_ip": "192.0.2.1", "evidence": null}\r\n'
        "\n"
        '{"recipient": "c@example.org", "confirmed_at": "2024-05-01T10:00:00Z", "source_ip": '
        '"192.0.2.1", "list_id": "l.example", "evidence": "https://x.example/c\\u2028d"}\n'
    )
    (bob,) = parse(text, "jsonl", skip_bad=True)
    assert bob == record(recipient="Bob@example.org")
    assert errors(text, "jsonl") == [
        'f:3: evidence: "https://x.example/c\\u2028d" must be one line of printable text'
    ]


def test_jsonl_errors() -> None:
    text = (
        '{"recipient": "a@example.org", "confirmed_at": "2024-05-01T10:00:00Z", '
        '"source_ip": "192.0.2.1", "colour": "red"}\n'
        "[1]\n"
        "{not json\n"
        '{"recipient": 5}\n' + "[" * 100_000 + "\n"
    )
    assert errors(text, "jsonl") == [
        "f:1: colour: unknown field (known: recipient, list_id, confirmed_at, source_ip, "
        "requested_at, evidence, imported_at, revoked_at)",
        "f:2: row: must be a JSON object, not an array",
        "f:3: row: not valid JSON: Expecting property name enclosed in double quotes",
        "f:4: recipient: must be a string, not a number",
        "f:4: confirmed_at: is missing",
        "f:4: source_ip: is missing",
        "f:5: row: not valid JSON: nested too deeply",
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_format_round_trips(fmt: Format) -> None:
    records = [
        record(),
        record(
            recipient="Émile@bücher.example",
            list_id="news.example.com",
            requested_at=T1 - timedelta(minutes=3),
            evidence='<a,"b"@x>',
            revoked_at=NOW - timedelta(microseconds=1),
            imported_at=T1 + timedelta(days=1),
            source_ip="2001:db8::1",
        ),
    ]
    text = "".join(format_records(records, fmt))
    assert parse(text, fmt, now=NOW) == tuple(records)
    if fmt == "csv":
        assert text.splitlines()[0] == ",".join(FILE_FIELDS)


def test_format_of() -> None:
    assert format_of("a.CSV") == "csv"
    assert format_of("a.jsonl") == format_of("x.ndjson") == "jsonl"
    assert format_of("a.txt") is None


# -- the parser never raises anything but its typed error ----------------------------------

_HEADER = "recipient,confirmed_at,source_ip,list_id,evidence\n"
_cells = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["a@example.org", "2024-05-01T10:00:00Z", "192.0.2.1", '"', ",", "\r", "\n"]),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    body=st.one_of(
        st.text(),
        st.lists(_cells, max_size=40).map(lambda cells: _HEADER + "".join(cells)),
        st.lists(_cells, max_size=40).map(lambda cells: ",".join(cells)),
        st.binary().map(lambda b: b),
    ),
    fmt=st.sampled_from(["csv", "jsonl"]),
    skip_bad=st.booleans(),
)
def test_parser_raises_only_its_typed_error(body: str | bytes, fmt: Format, skip_bad: bool) -> None:
    try:
        parsed = parse_file(
            body,
            fmt=fmt,
            source="f",
            customer="acme",
            imported_at=NOW,
            skip_bad=skip_bad,
        )
    except OptInFileError as exc:
        assert exc.errors
        for error in exc.errors:
            str(error).encode("utf-8")  # printable anywhere
            assert error.line >= 1
        return
    for r in parsed.records:
        r.check_normalized()


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*FILE_FIELDS, "x"]),
        st.one_of(st.none(), st.integers(), st.text(alphabet=string.printable, max_size=40)),
    )
)
def test_jsonl_objects_raise_only_typed_errors(fields: dict[str, object]) -> None:
    line = json.dumps(fields)
    with contextlib.suppress(OptInFileError):
        parse(line, "jsonl")


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.emails().map(lambda a: a.swapcase()),
        st.text(min_size=1, max_size=20).map(lambda t: f"{t}@Example.ORG"),
        st.text(min_size=1, max_size=20).map(lambda t: f"user@{t}.example"),
        st.text(min_size=1, max_size=20).map(lambda t: f'"{t}"@example.org'),
    )
)
@example("INFO@Example.ORG")  # an RFC 2142 name: email-validator lower-cases its local part
@example("PostMaster@example.org")
def test_normal_forms_are_stable(address: str) -> None:
    """A normalized address normalizes to itself (import checks exactly this) and is found by
    the look-up of the address as first given."""
    try:
        normal = normalize_recipient(address)
    except FieldError:
        return
    assert normalize_recipient(normal) == normal
    assert lookup_form(normal) == normal
    assert lookup_form(address) == normal
