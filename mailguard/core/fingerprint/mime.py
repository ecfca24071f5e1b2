"""Decoding a raw RFC 5322 message into what its fingerprint is made of.

Responsible for: the subject, the visible body text, the attachments (as SHA-256 digests of
their decoded content) and the names and addresses in To and Cc, from any byte string.

- Structure: header fields (folded lines, CRLF or LF line ends, a missing blank line, a
  leading mbox ``From `` line tolerated), nested ``multipart/*`` (RFC 2046 delimiters; a
  missing close delimiter ends the part at the end of the message; a multipart without a
  usable boundary is read as text) and ``message/rfc822``, to a depth of ``MAX_DEPTH`` and at
  most ``MAX_PARTS`` parts.
- Of ``multipart/alternative`` only one child is read: the last HTML or multipart child (what
  most readers are shown), else the last plain-text child.
- Leaves: ``text/plain`` and ``text/html`` parts not marked ``Content-Disposition:
  attachment`` are text (HTML through :func:`.html.visible_text`); every other leaf with a
  non-empty body is an attachment.  Transfer encodings base64 (lenient about junk and padding)
  and quoted-printable are decoded; charsets are tried as declared, then UTF-8, then Latin-1
  (which cannot fail).  Encoded words (RFC 2047) in Subject, To and Cc are decoded the same way.
- At most ``MAX_TEXT_CHARS`` (200,000) characters of text are kept (a bound on the work; what
  counts of long texts is decided in :mod:`.normalize`, see ``.sketch``).

Parsing is done here rather than with :mod:`email`'s parser because that parser costs more
than the whole fingerprint budget (about 0.2 ms for a 10 KB message before any decoding).
To and Cc are read leniently (addresses by pattern, names as what is left between commas), as
they only feed personalization removal.
Must never: raise (any input gives an :class:`Extracted`; an internal error falls back to the
raw bytes read as Latin-1 text), do I/O, or look at anything but its argument.
"""

from __future__ import annotations

import binascii
import codecs
import hashlib
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType

from mailguard.core.fingerprint.cache import BoundedCache, probed_key
from mailguard.core.fingerprint.html import visible_text

MAX_DEPTH = 8
MAX_PARTS = 100
MAX_TEXT_CHARS = 200_000
MAX_ADDRESS_HEADER_CHARS = 4096
MAX_PARAMETER_CHARS = 4096
MAX_SUBJECT_CHARS = 4096
_MAX_DELIMITER_CANDIDATES = 10_000


@dataclass(frozen=True, slots=True)
class Extracted:
    """What a message's fingerprint is computed from (see the module docstring)."""

    subject: str = ""
    text: str = ""
    attachments: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()


_Head = list[tuple[bytes, bytes]]

# A header is a run of lines that each start a field (a name and ":") or continue one (white
# space first); it ends before the first line that does neither (the blank line, usually).
_FIELD_START_RE = re.compile(rb"[!-9;-~]+[ \t]*:")
_HEAD_END_RE = re.compile(rb"\n(?![ \t]|[!-9;-~]+[ \t]*:)")  # starts with its literal: fast
# Of the fields, only those read here (subject, to, cc, content-*), found from their line
# starts; a field's value runs to the end of its last continuation line.
_WANTED = rb"(subject|to|cc|content-(?:type|transfer-encoding|disposition))[ \t]*:"
_FIELD_VALUE = rb"([^\n]*(?:\n[ \t][^\n]*)*)"
_FIRST_WANTED_RE = re.compile(_WANTED + _FIELD_VALUE, re.IGNORECASE)
_NEXT_WANTED_RE = re.compile(rb"\n" + _WANTED + _FIELD_VALUE, re.IGNORECASE)
# Anchored at ";" (a literal the engine finds fast): linear however long the header is.
_PARAM_RE = re.compile(r";\s*([^\s=;\"]+)\s*=\s*(\"(?:[^\"\\]|\\.)*\"?|[^;]*)")
_ENCODED_WORD_RE = re.compile(r"=\?([^?\s]{1,64})\?([bBqQ])\?([^?\s]*)\?=")
_ENCODED_WORD_GAP_RE = re.compile(r"(\?=)[ \t\n]+(=\?)")
_B64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_B64_JUNK = bytes(c for c in range(256) if c not in _B64_ALPHABET)
_ADDRESS_RE = re.compile(r"[^\s<>@,;:\"()\[\]]{1,64}@[^\s<>@,;:\"()\[\]]{1,255}")
_ADDRESS_SPLIT_RE = re.compile(f"({_ADDRESS_RE.pattern})")  # [rest, address, rest, ...]
_NAME_SPLIT_RE = re.compile(r"[,;]|<\s*>|\(|\)")
_NAME_JUNK = " \t\"'<>:"
_TEXT_TYPES = frozenset({"text/plain", "text/html"})
_ASCII_PROBE = bytes(range(128))
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})
_CACHED_FIELD_BYTES = 512
# The text of text parts (decoded, HTML made visible: :func:`_part_text`) is cached by the
# part's raw body and what decides its decoding: campaign copies repeat their parts byte for
# byte, and a hit then costs a memcmp instead of decoding (and gives the same ``str`` object,
# whose hash is then not computed again).  The key is short: the part's description, its
# length and its first and last ``_PART_PROBE`` bytes (the whole body when shorter); a hit
# counts only when the whole body is equal too.  At most 512 parts of at most
# ``MAX_CACHED_PART`` bytes, about 16 MB in all (the raw bytes and the text's size counted).
# (A key met once maps to _SEEN: see _part_text.)
_PART_PROBE = 1024
MAX_CACHED_PART = 1 << 20
_PARTS: BoundedCache[bytes, tuple[bytes, str]] = BoundedCache(
    1 << 9, 16 << 20, 4 * _PART_PROBE, lambda value: len(value[0]) + sys.getsizeof(value[1])
)


def _b64decode(data: bytes) -> bytes:
    try:  # non-strict mode skips line breaks and junk; only bad padding raises
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):
        pass
    data = data.translate(None, _B64_JUNK)
    if len(data) % 4 == 1:
        data = data[:-1]
    data += b"=" * (-len(data) % 4)
    try:
        return binascii.a2b_base64(data)
    except (binascii.Error, ValueError):  # pragma: no cover - cleaned input always decodes
        return b""


def _decode_transfer(body: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return _b64decode(body)
    if encoding == "quoted-printable":
        try:
            return binascii.a2b_qp(body)
        except (binascii.Error, ValueError):  # pragma: no cover - a2b_qp is lenient
            return body
    return body


@lru_cache(maxsize=256)
def _codec(charset: str) -> tuple[str, bool] | None:
    """The codec for a charset name and whether it reads ASCII bytes as ASCII; None if unusable."""
    if not charset or len(charset) > 64:
        return None
    try:
        info = codecs.lookup(charset)
    except (LookupError, ValueError, TypeError):
        return None
    if not getattr(info, "_is_text_encoding", True):
        return None
    try:
        transparent = _ASCII_PROBE.decode(info.name) == _ASCII_PROBE.decode("ascii")
    except Exception:  # a codec may raise anything on the probe; then it is not transparent
        transparent = False
    return info.name, transparent


_SEEN: tuple[bytes, str] = (b"", "")


def decode_text(payload: bytes, charset: str | None) -> str:
    """Bytes to text: the declared charset, then UTF-8, then Latin-1."""
    cleaned = (charset or "").strip().strip("\"'").lower()
    codec = _codec(cleaned) if cleaned else None
    if payload.isascii() and (codec is None or codec[1]):
        return payload.decode("ascii")
    if codec is not None:
        try:
            return payload.decode(codec[0])
        except Exception:  # UnicodeDecodeError, or whatever an exotic codec raises
            pass
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError:
        return payload.decode("latin-1")


def _encoded_word(match: re.Match[str]) -> str:
    charset, kind, payload = match.group(1).partition("*")[0], match.group(2), match.group(3)
    raw = payload.encode("latin-1", "replace")
    if kind in "bB":
        data = _b64decode(raw)
    else:
        try:
            data = binascii.a2b_qp(raw, header=True)
        except (binascii.Error, ValueError):  # pragma: no cover - a2b_qp is lenient
            data = raw
    return decode_text(data, charset)


def decode_header(raw: bytes) -> str:
    """A header field value as text: unfolded, raw UTF-8 accepted, RFC 2047 words decoded."""
    value = raw.replace(b"\n", b"").replace(b"\r", b"").strip()
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    if "=?" in text:
        text = _ENCODED_WORD_GAP_RE.sub(r"\1\2", text)
        text = _ENCODED_WORD_RE.sub(_encoded_word, text)
    return text


def _parse_head(data: bytes) -> tuple[_Head, bytes]:
    """The header fields read here (``_WANTED``: names in lower case, values raw, in order)
    and the body of an entity (lines end in LF or CRLF)."""
    if _FIELD_START_RE.match(data) is None:
        end = 0
    else:
        match = _HEAD_END_RE.search(data)
        end = match.start() + 1 if match is not None else len(data)
    first = _FIRST_WANTED_RE.match(data, 0, end)
    found = _NEXT_WANTED_RE.findall(data, 0, end)
    if first is not None:
        found.insert(0, first.groups())
    fields = [(name.lower(), value) for name, value in found]
    if data.startswith(b"\n", end):
        end += 1
    elif data.startswith(b"\r\n", end):
        end += 2
    return fields, data[end:]


def _field(head: _Head, name: bytes) -> bytes | None:
    for key, value in head:
        if key == name:
            return value
    return None


def _unquote(value: str) -> str:
    value = value.strip()
    if value.startswith('"'):
        value = value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:]
        value = re.sub(r"\\(.)", r"\1", value)
    return value


def _params(text: str) -> dict[str, str]:
    params: dict[str, str] = {}
    continued: dict[str, list[tuple[int, str]]] = {}
    for raw_name, raw_value in _PARAM_RE.findall(";" + text):
        name = raw_name.lower()
        value = _unquote(raw_value)
        if "*" not in name:
            params.setdefault(name, value)
            continue
        base, _, rest = name.partition("*")
        index = rest.rstrip("*")
        if index.isdigit() or not index:
            part = value
            if name.endswith("*"):
                if not index or index == "0":
                    part = part.split("'", 2)[-1]
                part = re.sub(r"%([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), part)
            continued.setdefault(base, []).append((int(index or 0), part))
    for base, pieces in continued.items():
        params.setdefault(base, "".join(piece for _, piece in sorted(pieces)))
    return params


def _content_type(head: _Head, default: str) -> tuple[str, Mapping[str, str]]:
    raw = _field(head, b"content-type")
    if raw is None:
        return default, _NO_PARAMS
    if len(raw) <= _CACHED_FIELD_BYTES:  # leaf parts repeat theirs: cached
        return _cached_content_type(raw)
    return _parsed_content_type(raw)


def _parsed_content_type(raw: bytes) -> tuple[str, Mapping[str, str]]:
    """A Content-Type field value's type and parameters."""
    text = raw.replace(b"\n", b"").replace(b"\r", b"").decode("latin-1")
    main, _, rest = text[:MAX_PARAMETER_CHARS].partition(";")
    ctype = main.strip().lower()
    if ctype.count("/") != 1 or not all(ctype.split("/")) or len(ctype.split()) != 1:
        ctype = "text/plain"
    return ctype, MappingProxyType(_params(rest))


_cached_content_type = lru_cache(maxsize=1024)(_parsed_content_type)


def _simple_field(head: _Head, name: bytes) -> str:
    raw = _field(head, name)
    if raw is None:
        return ""
    value = raw.replace(b"\n", b"").replace(b"\r", b"").decode("latin-1")
    return value.partition(";")[0].strip().lower()


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes] | None:
    """The parts between RFC 2046 delimiter lines; None when there is no delimiter at all.

    A delimiter line is ``--boundary`` (``--boundary--`` closes) at the start of a line,
    followed by nothing but spaces and tabs; the line break before it belongs to it.
    """
    delimiter = b"--" + boundary
    starts: list[int] = []  # where each part's content starts
    ends: list[int] = []  # where each delimiter line starts, with the line break before it
    position = 0
    for _ in range(_MAX_DELIMITER_CANDIDATES):
        found = body.find(delimiter, position)
        if found < 0 or len(starts) > MAX_PARTS:
            break
        position = found + len(delimiter)
        if found > 0 and body[found - 1] != 0x0A:
            continue
        line_end = body.find(b"\n", position)
        if line_end < 0:
            line_end = len(body)
        rest = body[position:line_end]
        is_close = rest.startswith(b"--")
        if (rest[2:] if is_close else rest).strip(b" \t\r"):
            continue  # a longer boundary, or text that merely starts like a delimiter
        ends.append(max(found - (2 if body.startswith(b"\r\n", found - 2) else 1), 0))
        if is_close:
            break
        starts.append(line_end + 1)
        position = line_end
    if not ends:
        return None
    parts = []
    for index, start in enumerate(starts):
        stop = ends[index + 1] if index + 1 < len(ends) else len(body)
        parts.append(body[start:stop])
    return parts


@dataclass
class _Walker:
    texts: list[str] = field(default_factory=list)
    attachments: list[str] = field(default_factory=list)
    parts: int = 0
    chars: int = 0

    def entity(self, head: _Head, body: bytes, depth: int, default: str) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            return
        ctype, params = _content_type(head, default)
        encoding = _simple_field(head, b"content-transfer-encoding")
        if ctype.startswith("multipart/"):
            if depth < MAX_DEPTH:
                self.multipart(ctype, params, _decode_transfer(body, encoding), depth)
            return
        if ctype == "message/rfc822" and depth < MAX_DEPTH:
            inner_head, inner_body = _parse_head(_decode_transfer(body, encoding))
            self.entity(inner_head, inner_body, depth + 1, "text/plain")
            return
        attached = _simple_field(head, b"content-disposition") == "attachment"
        if ctype in _TEXT_TYPES and not attached:
            if self.chars < MAX_TEXT_CHARS:  # past the limit a text part is not even decoded
                self.text(_part_text(ctype, params.get("charset"), encoding, body))
        else:
            payload = _decode_transfer(body, encoding)
            if encoding != "base64" and b"\r\n" in payload:
                payload = payload.replace(b"\r\n", b"\n")  # as stored on disk or sent by SMTP
            if payload:
                self.attachments.append(hashlib.sha256(payload).hexdigest())

    def multipart(self, ctype: str, params: Mapping[str, str], body: bytes, depth: int) -> None:
        boundary = params.get("boundary", "")
        chunks = _split_multipart(body, boundary.encode("latin-1", "replace")) if boundary else None
        if chunks is None:
            if self.chars < MAX_TEXT_CHARS:
                self.text(_part_text("text/plain", params.get("charset"), "", body))
            return
        children = [_parse_head(chunk) for chunk in chunks]
        default = "message/rfc822" if ctype == "multipart/digest" else "text/plain"
        if ctype == "multipart/alternative":
            chosen = _preferred(children, default)
            if chosen is not None:
                children = [chosen]
        for child_head, child_body in children:
            self.entity(child_head, child_body, depth + 1, default)

    def text(self, text: str) -> None:
        if self.chars >= MAX_TEXT_CHARS:
            return
        text = text[: MAX_TEXT_CHARS - self.chars]  # (text itself when not longer)
        self.chars += len(text)
        self.texts.append(text)


def _decoded_part(ctype: str, charset: str | None, encoding: str, body: bytes) -> str:
    """The text of a text part: its body transfer-decoded, as text, visible text of HTML."""
    text = decode_text(_decode_transfer(body, encoding), charset)
    return visible_text(text) if ctype == "text/html" else text


def _part_text(ctype: str, charset: str | None, encoding: str, body: bytes) -> str:
    """:func:`_decoded_part`, cached (``_PARTS``): equal arguments give the same ``str``."""
    if len(body) > MAX_CACHED_PART:
        return _decoded_part(ctype, charset, encoding, body)
    about = f"{ctype}\n{charset!r}\n{encoding}".encode("utf-8", "surrogatepass")
    key = probed_key(about, body, _PART_PROBE)
    found = _PARTS.get(key)
    if found is not None and found is not _SEEN and found[0] == body:  # memcmp of the body
        return found[1]
    text = _decoded_part(ctype, charset, encoding, body)
    # The body and its text are kept from the second time its key is met: a personalized
    # part (its own key every time) does not keep its memory from being reused.
    _PARTS.keep_one(key, _SEEN if found is None else (body, text))
    return text


def _preferred(children: list[tuple[_Head, bytes]], default: str) -> tuple[_Head, bytes] | None:
    plain = None
    for child in reversed(children):
        ctype, _ = _content_type(child[0], default)
        if _simple_field(child[0], b"content-disposition") == "attachment":
            continue
        if ctype == "text/html" or ctype.startswith("multipart/"):
            return child
        if ctype == "text/plain" and plain is None:
            plain = child
    return plain


def _recipients(values: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Display names and addresses in To/Cc values; lenient, for personalization removal only."""
    names: list[str] = []
    addresses: list[str] = []
    for value in values:
        value = value[:MAX_ADDRESS_HEADER_CHARS]
        parts = _ADDRESS_SPLIT_RE.split(value)  # one pass for findall and sub
        addresses.extend(parts[1::2])
        rest = " ".join(parts[::2])
        if not rest.strip(_NAME_JUNK + ",;()"):  # bare addresses: every chunk would strip to ""
            continue
        for chunk in _NAME_SPLIT_RE.split(rest):
            name = chunk.strip(_NAME_JUNK)
            if name:
                names.append(name)
    return tuple(names), tuple(addresses)


def parse_message(message: bytes) -> tuple[_Head, bytes]:
    """The header fields read here (see ``_parse_head``) and the body of a raw message; a
    leading mbox ``From `` line is skipped."""
    data = message  # CRLF or LF: both are handled where line ends matter
    if data.startswith(b"From "):
        data = data[data.find(b"\n") + 1 :] if b"\n" in data else b""
    return _parse_head(data)


def subject_of(head: _Head) -> str:
    """The decoded Subject (its first ``MAX_SUBJECT_CHARS`` raw bytes), ``""`` without one."""
    subject = _field(head, b"subject")
    return decode_header(subject[:MAX_SUBJECT_CHARS]) if subject is not None else ""


def addressees(head: _Head) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The display names and the addresses in To and Cc (``_recipients``)."""
    return _recipients([decode_header(v) for k, v in head if k in (b"to", b"cc")])


def content_of(head: _Head, body: bytes) -> tuple[str, tuple[str, ...]]:
    """The message's text and attachment digests (module docstring).  They depend on nothing
    but ``body`` and the fields of ``head`` other than Subject, To and Cc."""
    walker = _Walker()
    walker.entity(head, body, 0, "text/plain")
    return "\n".join(walker.texts), tuple(walker.attachments)


def _extract(message: bytes) -> Extracted:
    head, body = parse_message(message)
    subject = subject_of(head)
    names, addresses = addressees(head)
    text, attachments = content_of(head, body)
    return Extracted(subject, text, attachments, names, addresses)


def extract(message: bytes) -> Extracted:
    """Decode ``message`` (see the module docstring); never raises."""
    data = bytes(message)
    try:
        return _extract(data)
    except Exception:  # a bug here must not lose the message: fingerprint its raw text
        return Extracted(text=data[:MAX_TEXT_CHARS].decode("latin-1"))
