"""Decoding raw messages: structure, encodings, charsets, attachments, hostile input."""

from __future__ import annotations

import base64
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint import mime
from mailguard.core.fingerprint.mime import Extracted, decode_header, decode_text, extract
from tests.core.fingerprint.messages import PARAGRAPHS, SHAPES, Letter, render


def words(text: str) -> list[str]:
    return text.split()


def test_plain_message() -> None:
    found = extract(b"Subject: Hello\r\nTo: a@example.org\r\n\r\nJust a line.\r\n")
    assert found.subject == "Hello"
    assert words(found.text) == ["Just", "a", "line."]
    assert found.attachments == ()


def test_every_shape_gives_the_same_words() -> None:
    letter = Letter(subject="News", paragraphs=PARAGRAPHS[:2], greeting="Hello,")
    expected = words(letter.plain().lower())
    for shape in SHAPES:
        assert words(extract(render(letter, shape)).text.lower()) == expected, shape


def test_mixed_attachment_is_hashed_by_decoded_content() -> None:
    content = b"%PDF-1.4 binary \x00\x01\x02 content"
    letter = Letter(subject="s", paragraphs=PARAGRAPHS[:1], attachment=content)
    found = extract(render(letter, "mixed"))
    assert found.attachments == (hashlib.sha256(content).hexdigest(),)


def test_alternative_reads_only_the_html_child() -> None:
    message = (
        b"Content-Type: multipart/alternative; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nplain words\n"
        b"--b\nContent-Type: text/html\n\n<p>html words</p>\n--b--\n"
    )
    assert words(extract(message).text) == ["html", "words"]


def test_alternative_without_html_reads_the_last_plain_child() -> None:
    message = (
        b"Content-Type: multipart/alternative; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nfirst\n"
        b"--b\nContent-Type: text/calendar\n\nBEGIN:VCALENDAR\n"
        b"--b\nContent-Type: text/plain\n\nsecond\n--b--\n"
    )
    assert words(extract(message).text) == ["second"]


def test_headers_and_encodings() -> None:
    body = base64.b64encode("Grüße aus Köln".encode("iso-8859-1")).decode()
    message = (
        "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= =?utf-8?b?YXVz?=\n"
        'To: "Müller, Jörg" <joerg@example.de>, anna@example.org\n'
        "Cc: =?iso-8859-1?q?Ren=E9?= <rene@example.fr>\n"
        "Content-Type: text/plain; charset=iso-8859-1\n"
        "Content-Transfer-Encoding: base64\n\n" + body
    ).encode()
    found = extract(message)
    assert found.subject == "Grüßeaus"  # adjacent encoded words join without the space
    assert found.text == "Grüße aus Köln"
    assert found.addresses == ("joerg@example.de", "anna@example.org", "rene@example.fr")
    assert {"Müller", "Jörg", "René"} <= set(" ".join(found.names).replace(",", " ").split())


def test_quoted_printable_soft_breaks() -> None:
    message = (
        b"Content-Type: text/plain; charset=utf-8\n"
        b"Content-Transfer-Encoding: quoted-printable\n\n"
        b"caf=C3=A9 and a very long li=\nne\n"
    )
    assert extract(message).text == "café and a very long line\n"


def test_charset_fallbacks() -> None:
    assert decode_text("é".encode(), "no-such-charset") == "é"
    assert decode_text(b"\xe9t\xe9", "utf-8") == "été"  # not UTF-8: Latin-1
    assert decode_text(b"\xe9t\xe9", None) == "été"
    assert decode_text(b"plain", "rot13") == "plain"  # not a text encoding: ignored
    assert decode_text(b"+AGEAYgBj-", "utf-7") == "abc"  # ASCII bytes, not ASCII-transparent
    assert decode_text("日本".encode("shift_jis"), "shift_jis") == "日本"


def test_header_decoding_is_lenient() -> None:
    assert decode_header(b"=?bogus?q?x?=") == "x"
    assert decode_header(b"=?utf-8?b?!!!?=") == ""
    assert decode_header(b"raw \xc3\xa9 utf-8") == "raw é utf-8"
    assert decode_header(b"raw \xe9 latin") == "raw é latin"
    assert decode_header(b"folded\n value") == "folded value"


def test_missing_close_delimiter_ends_at_end_of_message() -> None:
    message = b"Content-Type: multipart/mixed; boundary=zz\n\n--zz\n\nfirst\n--zz\n\nsecond part"
    assert words(extract(message).text) == ["first", "second", "part"]


def test_multipart_without_boundary_is_read_as_text() -> None:
    for header in (b"multipart/mixed", b"multipart/mixed; boundary=absent"):
        found = extract(b"Content-Type: " + header + b"\n\nsome text\n")
        assert words(found.text) == ["some", "text"]


def test_longer_boundary_is_not_ours() -> None:
    message = (
        b"Content-Type: multipart/mixed; boundary=ab\n\n--ab\n\nkeep\n--abc\nalso kept\n--ab--\n"
    )
    assert words(extract(message).text) == ["keep", "--abc", "also", "kept"]


def test_nested_message_rfc822_and_digest() -> None:
    inner = b"Subject: inner\nContent-Type: text/plain\n\nforwarded words\n"
    message = (
        b"Content-Type: multipart/mixed; boundary=o\n\n--o\n\nouter words\n"
        b"--o\nContent-Type: message/rfc822\n\n" + inner + b"--o\n"
        b"Content-Type: multipart/digest; boundary=d\n\n--d\n\n" + inner + b"--d--\n--o--\n"
    )
    found = extract(message)
    assert words(found.text) == ["outer", "words", "forwarded", "words", "forwarded", "words"]


def test_text_attachment_and_inline_image() -> None:
    message = (
        b"Content-Type: multipart/mixed; boundary=o\n\n--o\n\nbody\n"
        b"--o\nContent-Type: text/plain\nContent-Disposition: attachment; filename=a.txt\n\n"
        b"attached text\n"
        b"--o\nContent-Type: image/png\nContent-Transfer-Encoding: base64\n\n"
        + base64.encodebytes(b"\x89PNG fake")
        + b"--o--\n"
    )
    found = extract(message)
    assert words(found.text) == ["body"]
    assert found.attachments == (
        hashlib.sha256(b"attached text").hexdigest(),
        hashlib.sha256(b"\x89PNG fake").hexdigest(),
    )


def test_mbox_from_line_and_missing_separator() -> None:
    found = extract(b"From someone@example.org Mon Jan 1 00:00:00 2024\nSubject: s\n\nbody")
    assert found.subject == "s"
    assert found.text == "body"
    found = extract(b"Subject: s\nthis line is not a header\nbody")
    assert found.subject == "s"
    assert words(found.text) == ["this", "line", "is", "not", "a", "header", "body"]


def test_rfc2231_parameters() -> None:
    message = (
        b"Content-Type: multipart/mixed; boundary*0=ab; boundary*1=cd\n\n"
        b"--abcd\nContent-Type: text/plain; charset*=utf-8''%75tf-8\n\nok\n--abcd--\n"
    )
    assert words(extract(message).text) == ["ok"]


def test_base64_junk_and_padding() -> None:
    encoded = base64.b64encode(b"hello world").rstrip(b"=")
    message = b"Content-Transfer-Encoding: base64\n\n" + encoded[:4] + b"!!\n" + encoded[4:]
    assert extract(message).text == "hello world"


def test_empty_and_garbage() -> None:
    assert extract(b"") == Extracted()
    assert extract(b"\x00\xff\xfe").text == "\x00ÿþ"
    assert extract(bytearray(b"Subject: x\n\ny")).text == "y"  # type: ignore[arg-type]


def test_deep_nesting_is_bounded() -> None:
    message = b""
    for level in range(50):
        message += b"Content-Type: multipart/mixed; boundary=b%d\n\n--b%d\n" % (level, level)
    message += b"Content-Type: text/plain\n\ndeep\n"
    assert extract(message).text == ""  # past MAX_DEPTH nothing is read, and nothing breaks


_HEADER_NAMES = st.sampled_from(
    ["Content-Type", "Content-Transfer-Encoding", "Subject", "To", "Cc", "Content-Disposition"]
)
_VALUES = st.sampled_from(
    [
        "multipart/mixed; boundary=b",
        'multipart/alternative; boundary="b"',
        "message/rfc822",
        "text/html; charset=utf-16",
        "text/plain; charset=x-unknown",
        "base64",
        "quoted-printable",
        "attachment",
        "=?utf-8?b?w6k=?= =?x?q?=ZZ?=",
        '"a, b" <x@y>, (comment) z@w',
    ]
)
_LINES = st.one_of(
    st.tuples(_HEADER_NAMES, _VALUES).map(lambda nv: f"{nv[0]}: {nv[1]}".encode()),
    st.sampled_from([b"", b"--b", b"--b--", b"<p style='display:none'>x", b"=C3=A9=", b"\xff"]),
    st.binary(max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_never_raises_on_arbitrary_bytes(data: bytes) -> None:
    from mailguard.core.fingerprint.mime import _extract

    found = _extract(data)  # the implementation itself, without extract's safety net
    assert isinstance(found.text, str)


@settings(max_examples=300, deadline=None)
@given(st.lists(_LINES, max_size=40))
def test_never_raises_on_mime_like_garbage(lines: list[bytes]) -> None:
    from mailguard.core.fingerprint.mime import _extract

    data = b"\r\n".join(lines)
    assert isinstance(_extract(data), Extracted)


def _reference_parse_head(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Header parsing as first written: every field by one pattern, then the wanted ones."""
    import re

    head = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*(?:\n[ \t][^\n]*)*(?:\n|\Z))*")
    field = re.compile(rb"([!-9;-~]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)")
    wanted = {b"subject", b"to", b"cc", b"content-type", b"content-transfer-encoding"}
    wanted.add(b"content-disposition")
    match = head.match(data)
    end = match.end() if match else 0
    fields = [(name.lower(), value) for name, value in field.findall(data, 0, end)]
    if data.startswith(b"\n", end):
        end += 1
    elif data.startswith(b"\r\n", end):
        end += 2
    return [(name, value) for name, value in fields if name in wanted], data[end:]


_HEAD_LINES = st.one_of(
    _LINES,
    st.tuples(
        st.sampled_from(["to", "TO", "Cc", "X-To", "Tox", "cc ", "Subject\t", "Content-type", "A"]),
        st.sampled_from([":", " :", "\t:", "", ";"]),
        st.sampled_from(["", " x", "x:y", " a@b, c <d@e>", " \r"]),
    ).map(lambda parts: "".join(parts).encode()),
    st.sampled_from([b" folded", b"\tfolded: too", b" ", b"\r", b"From x", b":"]),
)


@settings(max_examples=500, deadline=None)
@given(st.lists(_HEAD_LINES, max_size=12), st.sampled_from([b"\r\n", b"\n"]), st.booleans())
def test_header_fields_are_those_of_the_reference_parser(
    lines: list[bytes], end: bytes, blank: bool
) -> None:
    from mailguard.core.fingerprint.mime import _parse_head

    data = end.join(lines) + (end + end + b"body" if blank else b"")
    assert _parse_head(data) == _reference_parse_head(data)


_ADDRESS_PIECES = ["a@b.example", "<x@y.z>", "<", ">", ",", ";", "(", ")", " ", "\t", '"', "'"]
_ADDRESS_PIECES += [":", "\x0c", "Ann Lee", "\u00e9", "<\n>", "@", "rcpt0@dest0.example"]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(
        st.lists(
            st.sampled_from(_ADDRESS_PIECES),
            max_size=12,
        ).map("".join),
        max_size=3,
    )
)
def test_recipient_names_and_addresses_are_those_of_the_reference(values: list[str]) -> None:
    from mailguard.core.fingerprint.mime import _ADDRESS_RE, _NAME_JUNK, _NAME_SPLIT_RE, _recipients

    names, addresses = [], []
    for value in values:  # as first written
        addresses.extend(_ADDRESS_RE.findall(value))
        for chunk in _NAME_SPLIT_RE.split(_ADDRESS_RE.sub(" ", value)):
            if chunk.strip(_NAME_JUNK):
                names.append(chunk.strip(_NAME_JUNK))
    assert _recipients(values) == (tuple(names), tuple(addresses))


_PART_BODIES = st.one_of(
    st.binary(max_size=60),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    # longer than the probes at both ends: equal ends, a middle that may differ
    st.tuples(st.sampled_from([b"A", b"B", b"\xc3\xa9", b"<b>x</b>", b"=41"]), st.booleans()).map(
        lambda t: (b"head " * 300) + t[0] * (600 if t[1] else 601) + (b" tail" * 300)
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["text/plain", "text/html"]),
            st.sampled_from([None, "utf-8", "latin-1", "None", "ascii", "bogus"]),
            st.sampled_from(["", "8bit", "base64", "quoted-printable"]),
            _PART_BODIES,
        ),
        max_size=12,
    )
)
def test_cached_part_texts_equal_decoding_them(
    parts: list[tuple[str, str | None, str, bytes]],
) -> None:
    """The part cache gives what decoding gives, for repeated parts, parts of equal length and
    ends but another middle, and parts equal but for their description."""
    for ctype, charset, encoding, body in parts + parts:
        expected = mime._decoded_part(ctype, charset, encoding, body)
        assert mime._part_text(ctype, charset, encoding, body) == expected
        assert mime._part_text(ctype, charset, encoding, bytes(bytearray(body))) == expected


def test_a_repeated_part_gives_the_same_text_object_and_a_changed_one_its_own() -> None:
    mime._PARTS.clear()
    body = ("Grüße " * 2000).encode("utf-8")
    mime._part_text("text/plain", "utf-8", "8bit", body)  # met once: not kept yet
    first = mime._part_text("text/plain", "utf-8", "8bit", body)
    assert mime._part_text("text/plain", "utf-8", "8bit", bytes(bytearray(body))) is first
    changed = body[:5000] + b"X" + body[5001:]  # same length, same probes
    assert mime._part_text("text/plain", "utf-8", "8bit", changed) == changed.decode("utf-8")
    assert all(len(k) <= mime._PARTS.longest for k in mime._PARTS)


def test_text_parts_past_the_text_limit_are_not_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[str] = []
    real = mime._decoded_part

    def counting(ctype: str, charset: str | None, encoding: str, body: bytes) -> str:
        decoded.append(ctype)
        return real(ctype, charset, encoding, body)

    monkeypatch.setattr(mime, "_decoded_part", counting)
    long_part = "Content-Type: text/plain\r\n\r\n" + "word " * (mime.MAX_TEXT_CHARS // 5 + 1000)
    html_parts = [f"Content-Type: text/html\r\n\r\n<p>part {i}</p>" for i in range(50)]
    body = "".join(f"--b\r\n{part}\r\n" for part in [long_part, *html_parts]) + "--b--\r\n"
    message = f'Content-Type: multipart/mixed; boundary="b"\r\n\r\n{body}'.encode()
    extracted = extract(message)
    assert decoded == ["text/plain"]  # the HTML parts come after the limit was reached
    assert len(extracted.text) == mime.MAX_TEXT_CHARS
