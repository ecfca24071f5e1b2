"""Envelope argument parsing: syntax, parameters, and routing tricks (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailguard.core.addresses import AddressError, parse_envelope_arg


@pytest.mark.parametrize(
    ("arg", "address", "params", "routed"),
    [
        ("<a@b.example>", "a@b.example", {}, False),
        (
            " <a@b.example> SIZE=100 BODY=8BITMIME",
            "a@b.example",
            {"SIZE": "100", "BODY": "8BITMIME"},
            False,
        ),
        ("a@b.example", "a@b.example", {}, False),
        ("<>", "", {}, False),
        ("<a@[192.0.2.1]>", "a@[192.0.2.1]", {}, False),
        ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]", {}, False),
        ("<first.last+tag@sub.b.example>", "first.last+tag@sub.b.example", {}, False),
        ('<"john doe"@b.example>', '"john doe"@b.example', {}, False),
        ("<a%c.example@b.example>", "a%c.example@b.example", {}, True),
        ("<c.example!a@b.example>", "c.example!a@b.example", {}, True),
        ("<@x.example:a@b.example>", "a@b.example", {}, True),
        ("<@x.example,@y.example:a@b.example>", "a@b.example", {}, True),
        ('<"a@c.example"@b.example>', '"a@c.example"@b.example', {}, True),
        ("<jos\u00e9@b.example> SMTPUTF8", "jos\u00e9@b.example", {"SMTPUTF8": ""}, False),
    ],
)
def test_parses(arg: str, address: str, params: dict[str, str], routed: bool) -> None:
    parsed = parse_envelope_arg(arg, null_allowed=True)
    assert (parsed.address, parsed.params, parsed.routed) == (address, params, routed)


@pytest.mark.parametrize(
    ("arg", "reply"),
    [
        ("<a@b.example", "501 5.1.7"),
        ("<a b@c.example>", "501 5.1.3"),
        ("<a@>", "501 5.1.3"),
        ("<@b.example>", "501 5.1.3"),
        ("<a@b..example>", "501 5.1.3"),
        ("<a@b.example>x", "501 5.5.4"),
        ("<a@b.example> SIZE=", "501 5.5.4"),
        ("<" + "x" * 65 + "@b.example>", "501 5.1.3"),
        ("<" + "x" * 300 + ">", "501 5.1.3"),
        ("<a@b.example\r\nRCPT TO:<c@d>>", "501"),
    ],
)
def test_refuses(arg: str, reply: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_envelope_arg(arg, null_allowed=True)
    assert info.value.reply.startswith(reply)


def test_null_recipient_refused() -> None:
    with pytest.raises(AddressError, match="Null recipient"):
        parse_envelope_arg("<>", null_allowed=False)


@given(st.text(max_size=300))
def test_never_raises_anything_else(text: str) -> None:
    try:
        parsed = parse_envelope_arg(text, null_allowed=True)
    except AddressError as exc:
        assert exc.reply[:3] in ("501", "553")
        assert "\r" not in exc.reply and "\n" not in exc.reply
    else:
        assert "\r" not in parsed.address and "\n" not in parsed.address
        assert ">" not in parsed.address or parsed.address.startswith('"')
