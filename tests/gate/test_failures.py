"""Failure paths found in review: a client leaving mid-exchange must not poison the upstream
pool, slow upstreams must not turn into silence, and odd input must not crash a transaction."""

from __future__ import annotations

import asyncio
from pathlib import Path

from mailguard.config.load import parse_config
from tests.gate.conftest import BASE_CONFIG, MakeGate, RecordingUpstream, with_tls
from tests.gate.smtpraw import RawClient

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


async def test_client_leaving_during_upstream_reply_does_not_poison_pool(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    upstream.data_delay = 0.5
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<first@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.cmd("DATA")).startswith("354")
        await c.send(b"Subject: first\r\n\r\nfirst\r\n.\r\n")
        await asyncio.sleep(0.1)  # the gate is now waiting for the upstream's reply
    await asyncio.sleep(0.1)
    upstream.data_delay = 0.0
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("MAIL FROM:<second@acme.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<c@example.org>")).startswith("250")
        reply = await c.data(b"Subject: second\r\n\r\nsecond\r\n")
        assert reply.startswith("250 2.0.0 Ok: queued"), reply
    await asyncio.sleep(0.6)
    senders = [m.mail_from for m in upstream.messages]
    # The first client got no reply, so whether its message went through is its retry's
    # problem (at most a duplicate, never a loss); the second got the reply to its own message.
    assert senders.count("second@acme.example") == 1
    assert senders.count("first@acme.example") <= 1
    assert [d["decision"] for d in gate.decisions()] == ["aborted", "accept"]


async def test_slow_upstream_is_not_cut_by_client_idle_timer(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate(
        BASE_CONFIG.replace(
            'hostname = "gate.test"', 'hostname = "gate.test"\ncommand_timeout = "1s"'
        )
    )
    upstream.data_delay = 1.6
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.data(b"Subject: slow\r\n\r\nslow\r\n")).startswith("250")
    assert len(upstream.messages) == 1


async def test_upstream_dies_after_an_accepted_recipient(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<ok@example.org>")).startswith("250")
        assert (await c.cmd("RCPT TO:<die@example.org>")).startswith("4")
        assert (await c.cmd("DATA")).startswith("4")  # no 354: the transaction cannot go on
        # The session is usable again at once.
        assert (await c.cmd("MAIL FROM:<a@acme.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<ok@example.org>")).startswith("250")
        assert (await c.data(b"Subject: again\r\n\r\nok\r\n")).startswith("250")
    assert len(upstream.messages) == 1
    assert [d["decision"] for d in gate.decisions()] == ["defer", "accept"]


async def test_invalid_utf8_addresses(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd(b"MAIL FROM:<\xff@acme.example> SMTPUTF8")).startswith("553 5.6.7")
        assert (await c.cmd("MAIL FROM:<a@acme.example> SMTPUTF8")).startswith("250")
        c.writer.write(
            b"RCPT TO:<ok@example.org>\r\nRCPT TO:<\xfe@example.org>\r\n"
            b"RCPT TO:<ok2@example.org>\r\n"
        )
        replies = [await c.reply() for _ in range(3)]
        assert [r[:3] for r in replies] == ["250", "553", "250"], replies
        assert (await c.data(b"Subject: x\r\n\r\nok\r\n")).startswith("250")


async def test_odd_helo_still_logged(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.cmd(b"EHLO \xff\xfe")
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.data(b"Subject: x\r\n\r\nok\r\n")).startswith("250")
    [line] = gate.decisions()
    assert line["decision"] == "accept"


async def test_dot_stuffed_line_of_full_length(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        # A 1000-octet line starting with "." travels as 1001 octets: still within the limit.
        assert (await c.data(b"Subject: x\r\n\r\n.." + b"y" * 997 + b"\r\n")).startswith("250")


async def test_starttls_with_pipelined_commands_refused(
    make_gate: MakeGate, certificate: tuple[Path, Path]
):
    gate = await make_gate(with_tls(BASE_CONFIG, certificate))
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        c.writer.write(b"STARTTLS\r\nMAIL FROM:<injected@acme.example>\r\n")
        assert (await c.reply()).startswith("554 5.5.1")
        assert (await c.reply()).startswith("421")
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("STARTTLS")).startswith("503 5.5.1")


async def test_reload_with_bad_certificate_keeps_running_config(
    make_gate: MakeGate, upstream: RecordingUpstream, tmp_path: Path
):
    gate = await make_gate()
    bad = tmp_path / "missing.pem"
    text = BASE_CONFIG.replace(
        'hostname = "gate.test"',
        f'hostname = "other.test"\ntls_certificate = "{bad}"\ntls_key = "{bad}"',
    ).format(
        state_dir=tmp_path,
        upstream_port=upstream.port,
        redis_url="embedded",
        log_path=tmp_path / "x.jsonl",
        gate_port=1,
    )
    path = tmp_path / "new.toml"
    path.write_text(text)
    assert parse_config(tomllib.loads(text), None).server.hostname == "other.test"
    assert gate.gate.reload(path) is False
    assert gate.gate.runtime.config.server.hostname == "gate.test"
    assert gate.gate.runtime.tls_context is None
