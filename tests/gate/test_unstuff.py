"""``session.unstuff``: DATA as received back to the message, and the octets that removed."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailguard.gate.session import unstuff


def stuffed(lines: list[bytes]) -> bytes:
    """The lines as a client sends them in DATA (RFC 5321 4.5.2), each ending with CRLF."""
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def test_examples() -> None:
    assert unstuff(b"Hello\r\n..\r\n...x\r\n") == (b"Hello\r\n.\r\n..x\r\n", 2)
    assert unstuff(b"..first\r\nsecond\r\n") == (b".first\r\nsecond\r\n", 1)
    assert unstuff(b"no dots here\r\n. not at a line start: .. either\r\n") == (
        b"no dots here\r\n. not at a line start: .. either\r\n",
        0,
    )
    assert unstuff(b"") == (b"", 0)


@given(
    st.lists(
        st.binary(max_size=12).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
        max_size=30,
    ).map(lambda lines: [*lines, b"", b".", b".."])
)
def test_inverts_stuffing_and_counts_the_dots(lines: list[bytes]) -> None:
    data = stuffed(lines)
    message, dots = unstuff(data)
    assert message == b"".join(line + b"\r\n" for line in lines)
    assert dots == sum(line.startswith(b".") for line in lines) == len(data) - len(message)
