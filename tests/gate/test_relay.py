"""The before-queue relay: customer mail reaches the upstream intact, replies are mirrored,
upstream failures become 4xx, and nothing answered 250 is lost or duplicated."""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest

from tests.gate.conftest import MakeGate, RecordingUpstream
from tests.gate.smtpraw import RawClient

MESSAGE = (
    b"From: Alice <alice@acme.example>\r\n"
    b"To: Bob <bob@example.org>\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <1@acme.example>\r\n"
    b"\r\n"
    b"Hi Bob,\r\n"
    b".leading dot line\r\n"
    b"..two dots\r\n"
    b"\xc3\xa9t\xc3\xa9 8bit\r\n"
)


async def test_message_reaches_upstream_intact(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    client = aiosmtplib.SMTP(hostname=gate.host, port=gate.port, start_tls=False)
    await client.connect()
    errors, reply = await client.sendmail("alice@acme.example", ["bob@example.org"], MESSAGE)
    await client.quit()
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as Q1")  # the upstream's own reply
    assert len(upstream.messages) == 1
    got = upstream.messages[0]
    assert got.mail_from == "alice@acme.example"
    assert got.rcpts == ["bob@example.org"]
    received, _, _rest = got.data.partition(b"\r\n\t")
    assert received.startswith(b"Received: from ")
    # This hop's Received: and the X-Mailguard trace were prepended; the rest is the client's.
    header_end = got.data.index(b"From: Alice")
    assert got.data[header_end:] == MESSAGE
    assert got.data[:header_end].count(b"Received:") == 1
    [line] = gate.decisions()
    trace = f"X-Mailguard: tx={line['tx']} campaign={line['campaign']} decision=accept\r\n"
    assert got.data[:header_end].endswith(trace.encode())  # as the milter adds it
    assert line["decision"] == "accept"
    assert line["customer"] == "acme"
    assert line["rcpts"] == [{"rcpt": "bob@example.org", "reply": "250"}]
    assert line["reply"].startswith("250")
    assert line["size"] == len(MESSAGE)  # the message itself, not its dot-stuffed form


async def test_rcpt_refusal_mirrored_and_others_delivered(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("MAIL FROM:<a@acme.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<ok1@example.org>")).startswith("250")
        refused = await c.cmd("RCPT TO:<refuse1@example.org>")
        assert refused.startswith("550 5.1.1 <refuse1@example.org>")
        temp = await c.cmd("RCPT TO:<tempfail@example.org>")
        assert temp.startswith("450 4.2.0")
        assert (await c.cmd("RCPT TO:<ok2@example.org>")).startswith("250")
        assert (await c.data(b"Subject: x\r\n\r\nbody\r\n")).startswith("250")
    assert upstream.messages[0].rcpts == ["ok1@example.org", "ok2@example.org"]
    [line] = gate.decisions()
    assert [r["reply"] for r in line["rcpts"]] == ["250", "550", "450", "250"]


async def test_upstream_data_refusal_is_the_clients_reply(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    upstream.data_reply = "554 5.7.1 Spam detected upstream"
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert await c.data(b"Subject: x\r\n\r\nbody\r\n") == "554 5.7.1 Spam detected upstream"
    assert gate.decisions()[0]["decision"] == "reject"


async def test_upstream_down_gives_4xx_never_250(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    await upstream.stop()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        reply = await c.cmd("MAIL FROM:<a@acme.example>")
        assert reply.startswith("451 4.4.1"), reply
        # The transaction is over; the client may retry later on the same connection.
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("503")
    assert upstream.messages == []
    assert gate.decisions()[0]["decision"] == "aborted"


async def test_upstream_dies_between_rcpt_and_data(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
        upstream.data_reply = "421 4.3.0 shutting down"
        reply = await c.data(b"Subject: x\r\n\r\nbody\r\n")
        assert reply.startswith("421") or reply.startswith("451"), reply
    assert upstream.messages == []


async def test_unparseable_upstream_reply_is_451(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    upstream.mail_reply = "hello, I am not SMTP"
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        reply = await c.cmd("MAIL FROM:<a@acme.example>")
        assert reply.startswith("451 4.4.1"), reply


async def test_pooled_connection_reused_with_rset(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    for i in range(3):
        async with RawClient(gate.host, gate.port) as c:
            await c.ehlo()
            await c.cmd(f"MAIL FROM:<a{i}@acme.example>")
            await c.cmd("RCPT TO:<b@example.org>")
            if i == 1:
                await c.cmd("RSET")  # abandoned transaction: the pool must reset it
                await c.cmd(f"MAIL FROM:<again{i}@acme.example>")
                await c.cmd("RCPT TO:<c@example.org>")
            assert (await c.data(b"Subject: x\r\n\r\nbody\r\n")).startswith("250")
    assert [m.mail_from for m in upstream.messages] == [
        "a0@acme.example",
        "again1@acme.example",
        "a2@acme.example",
    ]
    assert [m.rcpts for m in upstream.messages] == [
        ["b@example.org"],
        ["c@example.org"],
        ["b@example.org"],
    ]
    assert upstream.connections == 1  # one upstream connection, reset with RSET for reuse


async def test_pipelined_transactions_each_delivered_once(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        # DATA ends a pipelined group (RFC 2920); what follows the message is pipelined again.
        c.writer.write(b"MAIL FROM:<s@acme.example>\r\nRCPT TO:<r@example.org>\r\nDATA\r\n")
        assert (await c.reply()).startswith("250")
        assert (await c.reply()).startswith("250")
        assert (await c.reply()).startswith("354")
        c.writer.write(b"Subject: 1\r\n\r\none\r\n.\r\nMAIL FROM:<t@acme.example>\r\n")
        assert (await c.reply()).startswith("250 2.0.0 Ok")
        assert (await c.reply()).startswith("250")
    assert [m.mail_from for m in upstream.messages] == ["s@acme.example"]


async def test_concurrent_clients_exactly_once(make_gate: MakeGate, upstream: RecordingUpstream):
    # 100 copies of one message: the AUP rules would (rightly) refuse most; this is about relay.
    gate = await make_gate(extra='[policy]\nmode = "off"\n')

    async def send(i: int) -> None:
        client = aiosmtplib.SMTP(hostname=gate.host, port=gate.port, start_tls=False)
        await client.connect()
        for j in range(5):
            msg = f"Subject: {i}-{j}\r\nX-Id: {i}-{j}\r\n\r\nbody\r\n".encode()
            await client.sendmail("a@acme.example", [f"r{j}@example.org"], msg)
        await client.quit()

    await asyncio.gather(*(send(i) for i in range(20)))
    ids = sorted(m.data.split(b"X-Id: ")[1].split(b"\r\n")[0] for m in upstream.messages)
    assert len(ids) == 100
    assert len(set(ids)) == 100
    assert all(line["decision"] == "accept" for line in gate.decisions())


@pytest.mark.parametrize(
    ("body", "accepted"),
    [
        (b"", True),
        (b"x" * 998 + b"\r\n", True),  # 1000 octets with CRLF: the RFC 5321 maximum
        (b"Subject: a\r\n\r\n" + b"x" * 999 + b"\r\nshort\r\n", False),
        (b"x" * 3000 + b"\r\n", False),
    ],
)
async def test_line_length_edges(
    make_gate: MakeGate, upstream: RecordingUpstream, body: bytes, accepted: bool
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        reply = await c.data(body)
    if accepted:
        assert reply.startswith("250"), reply
        assert upstream.messages[0].data.endswith(body)
    else:
        assert reply.startswith("554 5.6.0"), reply
        assert upstream.messages == []
        assert gate.decisions()[-1]["rule"] == "max_line_length"


async def test_pipelined_recipients_batch(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        c.writer.write(
            b"MAIL FROM:<a@acme.example>\r\n"
            b"RCPT TO:<r1@example.org>\r\n"
            b"RCPT TO:<refuse2@example.org>\r\n"
            b"RCPT TO:<not an address>\r\n"
            b"RCPT TO:<r4%x@example.org>\r\n"
            b"rcpt to:<r5@example.org>\r\n"
            b"NOOP\r\n"
            b"RCPT TO:<r6@example.org>\r\n"
            b"DATA\r\n"
        )
        replies = [await c.reply() for _ in range(9)]
        assert [r[:3] for r in replies] == [
            "250",
            "250",
            "550",
            "501",
            "553",
            "250",
            "250",
            "250",
            "354",
        ], replies
        c.writer.write(b"Subject: batch\r\n\r\nhi\r\n.\r\n")
        assert (await c.reply()).startswith("250")
    assert upstream.messages[0].rcpts == ["r1@example.org", "r5@example.org", "r6@example.org"]
    line = gate.decisions()[-1]
    assert [(r["rcpt"], r["reply"]) for r in line["rcpts"]] == [
        ("r1@example.org", "250"),
        ("refuse2@example.org", "550"),
        ("r4%x@example.org", "553"),
        ("r5@example.org", "250"),
        ("r6@example.org", "250"),
    ]
