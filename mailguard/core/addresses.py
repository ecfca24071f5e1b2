"""Envelope address parsing for MAIL FROM and RCPT TO arguments (RFC 5321 4.1.2, RFC 6531).

Responsible for: turning the text after ``MAIL FROM:`` / ``RCPT TO:`` into an address and its
ESMTP parameters, or a precise SMTP refusal; recognising the address tricks that have been used
to turn mail servers into open relays (source routes, the percent hack, bang paths, quoted local
parts hiding an ``@``) so a door can refuse them.
Must never: do I/O or decide whether a client may relay (that is the door's identity check).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

# Dot-string atoms (RFC 5321 4.1.2); non-ASCII is admitted here and checked against SMTPUTF8.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"'
_LDH_END = r"[A-Za-z0-9\u0080-\U0010ffff]"
_LABEL = rf"{_LDH_END}(?:[A-Za-z0-9\-\u0080-\U0010ffff]{{0,61}}{_LDH_END})?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*"
_LITERAL = r"\[(?:[0-9.]{7,15}|IPv6:[0-9A-Fa-f:.]{2,45})\]"
_MAILBOX = re.compile(rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})")
_SOURCE_ROUTE = re.compile(r"^@[^:]+:")
_PARAM = re.compile(r"^(?P<key>[A-Za-z0-9][A-Za-z0-9\-]*)(?:=(?P<value>[\x21-\x3c\x3e-\x7e]+))?$")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_PATH = 256  # RFC 5321 4.5.3.1.3


class AddressError(ValueError):
    """An envelope argument that must be refused; ``reply`` is the full SMTP reply line."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class EnvelopeArg:
    """A parsed ``MAIL FROM`` / ``RCPT TO`` argument.

    ``address`` is ``""`` for the null reverse-path ``<>``.  ``params`` keys are upper-cased;
    a parameter without ``=value`` maps to ``""``.  ``routed`` is true when the address uses a
    source route, ``%``, ``!`` or a quoted local part containing ``@``: sender-specified routing.
    """

    address: str
    params: dict[str, str]
    routed: bool

    @property
    def ascii(self) -> bool:
        return self.address.isascii()

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


def parse_envelope_arg(arg: str, *, null_allowed: bool) -> EnvelopeArg:
    """Parse the text after ``FROM:`` or ``TO:`` (leading spaces allowed).

    Raises ``AddressError`` with a 501/553 reply for syntax errors.  Bare addresses without
    angle brackets are accepted, as Postfix does by default, when they contain no spaces.
    """
    text = arg.strip()
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # surrogate-escaped bytes that were not UTF-8
            raise AddressError("553 5.6.7 Address is not valid UTF-8") from None
    if text.startswith("<"):
        end = _closing_bracket(text)
        if end < 0:
            raise AddressError("501 5.1.7 Bad address syntax: missing '>'")
        path, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(" "):
            raise AddressError("501 5.5.4 Syntax error in parameters")
    else:
        path, _, rest = text.partition(" ")
    params = _parse_params(rest)
    if len(path) > MAX_PATH:
        raise AddressError("501 5.1.3 Address too long")
    routed = False
    if _SOURCE_ROUTE.match(path):
        routed = True
        path = path.split(":", 1)[1]
    if path == "":
        if not null_allowed:
            raise AddressError("501 5.1.3 Null recipient address is not allowed")
        return EnvelopeArg("", params, routed)
    match = _MAILBOX.fullmatch(path)
    if match is None or not _literal_ok(match.group("domain")):
        raise AddressError(f"501 5.1.3 Bad address syntax: <{_printable(path)}>")
    local = match.group("local")
    if len(local) > MAX_LOCAL_PART:
        raise AddressError("501 5.1.3 Local part of the address is too long")
    if local.startswith('"'):
        inner = local[1:-1]
        routed = routed or any(c in inner for c in "@%!")
    else:
        routed = routed or "%" in local or "!" in local
    return EnvelopeArg(path, params, routed)


def _literal_ok(domain: str) -> bool:
    """An address literal must hold a real IPv4 or IPv6 address (RFC 5321 4.1.3)."""
    if not domain.startswith("["):
        return True
    inner = domain[1:-1]
    try:
        if inner.startswith("IPv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _closing_bracket(text: str) -> int:
    """Index of the ``>`` closing a path, skipping ``>`` inside a quoted local part."""
    quoted = False
    escaped = False
    for i, ch in enumerate(text[1:], start=1):
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = quoted
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
    return -1


def _parse_params(rest: str) -> dict[str, str]:
    params: dict[str, str] = {}
    for token in rest.split():
        match = _PARAM.match(token)
        if match is None:
            raise AddressError(f"501 5.5.4 Bad parameter syntax: {_printable(token)}")
        params[match.group("key").upper()] = match.group("value") or ""
    return params


def _printable(text: str) -> str:
    """Text safe to echo in a one-line reply."""
    return "".join(c if c.isprintable() else "?" for c in text)[:100]
