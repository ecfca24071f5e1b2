"""Protocol safety: no open relay, no smuggling, limits, SMTPUTF8, enhanced codes everywhere."""

from __future__ import annotations

import asyncio

import pytest

from tests.gate.conftest import BASE_CONFIG, MakeGate, RecordingUpstream
from tests.gate.smtpraw import RawClient

OUTSIDER = BASE_CONFIG.replace('networks = ["127.0.0.0/8"]', 'networks = ["192.0.2.0/24"]')

TRICKS = [
    "victim@example.org",
    "victim%example.org@gate.test",
    "victim%example.org@[127.0.0.1]",
    "example.org!victim@gate.test",
    "example.org!victim",
    "@gate.test:victim@example.org",
    "@a.test,@b.test:victim@example.org",
    '"victim@example.org"@gate.test',
    '"victim%example.org"@gate.test',
    "victim@[127.0.0.1]",
    "victim@[IPv6:::1]",
    "victim@example.org.",
    "postmaster",
]


async def test_banner_and_ehlo(make_gate: MakeGate):
    assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        assert c.banner.startswith("220 gate.test ESMTP mailguard")
        ehlo = await c.ehlo()
    for ext in ("PIPELINING", "SIZE 50000000", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"):
        assert f"250-{ext}" in ehlo or f"250 {ext}" in ehlo
    assert "STARTTLS" not in ehlo  # no certificate configured
    assert "AUTH" not in ehlo  # no users configured


@pytest.mark.parametrize("rcpt", TRICKS)
async def test_outsider_never_relays(make_gate: MakeGate, upstream: RecordingUpstream, rcpt: str):
    gate = await make_gate(OUTSIDER)
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("MAIL FROM:<spammer@example.net>")).startswith("250")
        reply = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.startswith("554 5.7.1") or reply.startswith("501 5.1.3"), reply
        assert (await c.cmd("DATA")).startswith("554 5.5.1")
    assert upstream.messages == []
    assert upstream.connections == 0  # an outsider never even causes an upstream connection


@pytest.mark.parametrize(
    "rcpt",
    [r for r in TRICKS if any(ch in r for ch in '%!:"') and "[IPv6" not in r],
)
async def test_customer_routing_tricks_refused(
    make_gate: MakeGate, upstream: RecordingUpstream, rcpt: str
):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        reply = await c.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.startswith("553 5.7.1") or reply.startswith("501 5.1.3"), reply
    assert upstream.messages == []


async def test_xclient_and_xforward_not_honoured(make_gate: MakeGate):
    gate = await make_gate(OUTSIDER)
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("XCLIENT ADDR=192.0.2.1")).startswith("500 5.5.2")
        assert (await c.cmd("XFORWARD ADDR=192.0.2.1")).startswith("500 5.5.2")
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")


@pytest.mark.parametrize(
    "payload",
    [
        b"Subject: x\r\n\r\nline\n.\nMAIL FROM:<evil@x>\r\n",  # <LF>.<LF>
        b"Subject: x\r\n\r\nline\r\n.\nRCPT TO:<evil@x>\r\n",  # <CR><LF>.<LF>
        b"Subject: x\r\n\r\nline\n.\r\nDATA\r\n",  # <LF>.<CR><LF>
        b"Subject: x\r\n\r\nline\r.\r\nevil\r\n",  # bare CR
        b"Subject: x\r\n\r\nnul\x00byte\r\n",
    ],
)
async def test_smuggling_refused(make_gate: MakeGate, upstream: RecordingUpstream, payload: bytes):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        reply = await c.data(payload)
        assert reply.startswith("554 5.6.0"), reply
        # The session goes on and a clean message still passes: nothing was desynchronised.
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.data(b"Subject: ok\r\n\r\nok\r\n")).startswith("250")
    assert len(upstream.messages) == 1
    assert b"evil" not in upstream.messages[0].data
    assert gate.decisions()[0]["rule"] == "bare_newline"


async def test_bare_lf_in_command_closes(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        reply = await c.cmd(b"MAIL FROM:<a@acme.example>\nRCPT TO:<b@example.org>")
        assert reply.startswith("521 5.5.2"), reply
        assert await c.closed()


async def test_message_size_limit(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(
        BASE_CONFIG.replace(
            'hostname = "gate.test"', 'hostname = "gate.test"\nmax_message_size = "10KB"'
        )
    )
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("MAIL FROM:<a@acme.example> SIZE=20000")).startswith("552 5.3.4")
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        reply = await c.data(
            b"Subject: big\r\n\r\n"
            + b"0123456789" * 30 * 2
            + b"\r\n" * 0
            + (b"x" * 98 + b"\r\n") * 120
        )
        assert reply.startswith("552 5.3.4"), reply
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.data(b"Subject: small\r\n\r\nok\r\n")).startswith("250")
    assert len(upstream.messages) == 1


async def test_smtputf8(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("MAIL FROM:<jos\u00e9@acme.example>")).startswith("553 5.6.7")
        assert (await c.cmd("MAIL FROM:<a@acme.example>")).startswith("250")
        assert (await c.cmd("RCPT TO:<b\u00fccher@example.org>")).startswith("553 5.6.7")
        await c.cmd("RSET")
        assert (await c.cmd("MAIL FROM:<jos\u00e9@acme.example> SMTPUTF8")).startswith("250")
        assert (await c.cmd("RCPT TO:<b\u00fccher@example.org>")).startswith("250")
        assert (await c.data(b"Subject: x\r\n\r\nok\r\n")).startswith("250")
    assert upstream.messages[0].rcpts == ["b\u00fccher@example.org"]


async def test_max_recipients(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(
        BASE_CONFIG.replace('hostname = "gate.test"', 'hostname = "gate.test"\nmax_recipients = 2')
    )
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<r1@example.org>")).startswith("250")
        assert (await c.cmd("RCPT TO:<r2@example.org>")).startswith("250")
        assert (await c.cmd("RCPT TO:<r3@example.org>")).startswith("452 4.5.3")
        assert (await c.data(b"Subject: x\r\n\r\nok\r\n")).startswith("250")
    assert upstream.messages[0].rcpts == ["r1@example.org", "r2@example.org"]


async def test_command_errors_carry_enhanced_codes(make_gate: MakeGate):
    gate = await make_gate()
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        for command, prefix in [
            ("RCPT TO:<b@example.org>", "503 5.5.1"),
            ("DATA", "503 5.5.1"),
            ("BOGUS", "500 5.5.2"),
            ("MAIL FROM:<a@acme.example> RET=FULL", "555 5.5.4"),
            ("MAIL FROM:<not an address>", "501 5.1"),
            ("MAIL TO:<x@y>", "501 5.5.4"),
            ("X" * 3000, "500 5.5.2"),
            ("VRFY postmaster", "252 2.5.2"),
            ("NOOP", "250 2.0.0"),
        ]:
            reply = await c.cmd(command)
            assert reply.startswith(prefix), (command, reply)


async def test_connection_limit_per_client(make_gate: MakeGate):
    gate = await make_gate(
        BASE_CONFIG.replace(
            'hostname = "gate.test"', 'hostname = "gate.test"\nmax_connections_per_client = 2'
        )
    )
    async with RawClient(gate.host, gate.port) as a, RawClient(gate.host, gate.port) as b:
        assert a.banner.startswith("220") and b.banner.startswith("220")
        async with RawClient(gate.host, gate.port) as c:
            assert c.banner.startswith("421 4.7.0")
            assert await c.closed()
    await asyncio.sleep(0.05)
    async with RawClient(gate.host, gate.port) as d:  # freed again
        assert d.banner.startswith("220")


async def test_data_deadline_cuts_off_slow_client(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(
        BASE_CONFIG.replace('hostname = "gate.test"', 'hostname = "gate.test"\ndata_timeout = "1s"')
    )
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.cmd("DATA")).startswith("354")
        # A byte every 0.1 s would keep a per-read idle timer alive forever.
        read = asyncio.ensure_future(c.reply())
        for _ in range(30):
            done, _ = await asyncio.wait({read}, timeout=0.1)
            if done:
                break
            c.writer.write(b"x")
        reply = await read
        assert reply.startswith("421 4.4.2"), reply
    assert upstream.messages == []


async def test_idle_timeout(make_gate: MakeGate):
    gate = await make_gate(
        BASE_CONFIG.replace(
            'hostname = "gate.test"', 'hostname = "gate.test"\ncommand_timeout = "1s"'
        )
    )
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert await c.closed()


PROXIED = OUTSIDER.replace(
    'hostname = "gate.test"',
    'hostname = "gate.test"\nproxy_protocol = true\nproxy_trusted_networks = ["{lb}"]',
)


async def test_proxy_protocol_from_trusted_balancer(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate(PROXIED.replace("{lb}", "127.0.0.1/32"))
    header = b"PROXY TCP4 192.0.2.5 198.51.100.1 40000 25\r\n"
    async with RawClient(gate.host, gate.port, proxy=header) as c:
        assert c.banner.startswith("220")
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
        assert (await c.data(b"Subject: x\r\n\r\nhi\r\n")).startswith("250")
    assert b"([192.0.2.5])" in upstream.messages[0].data
    assert gate.decisions()[-1]["client"] == "192.0.2.5"
    outsider = b"PROXY TCP4 203.0.113.9 198.51.100.1 40000 25\r\n"
    async with RawClient(gate.host, gate.port, proxy=outsider) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")


async def test_proxy_protocol_refused_from_others(make_gate: MakeGate):
    gate = await make_gate(PROXIED.replace("{lb}", "10.0.0.0/8"))
    header = b"PROXY TCP4 192.0.2.5 198.51.100.1 40000 25\r\n"
    async with RawClient(gate.host, gate.port, proxy=header) as c:
        assert c.banner.startswith("421 4.7.0")
        assert await c.closed()


async def test_proxy_header_not_honoured_when_disabled(make_gate: MakeGate):
    gate = await make_gate(OUTSIDER)
    header = b"PROXY TCP4 192.0.2.5 198.51.100.1 40000 25\r\n"
    async with RawClient(gate.host, gate.port) as c:
        assert (await c.cmd(header.rstrip())).startswith("500 5.5.2")
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")


async def test_ipv6_listener(make_gate: MakeGate, upstream: RecordingUpstream):
    from tests.gate.conftest import free_port

    port = free_port()
    gate = await make_gate(
        BASE_CONFIG.replace(
            'listen = ["127.0.0.1:{gate_port}"]',
            f'listen = ["[::1]:{port}", "127.0.0.1:{{gate_port}}"]',
        ).replace('networks = ["127.0.0.0/8"]', 'networks = ["127.0.0.0/8", "::1/128"]')
    )
    async with RawClient("::1", port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        await c.cmd("RCPT TO:<b@example.org>")
        assert (await c.data(b"Subject: v6\r\n\r\nhi\r\n")).startswith("250")
    assert gate.decisions()[-1]["client"] == "::1"


async def test_too_many_errors_closes(make_gate: MakeGate):
    gate = await make_gate(
        BASE_CONFIG.replace(
            'hostname = "gate.test"', 'hostname = "gate.test"\nmax_bad_commands = 3'
        )
    )
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("RCPT TO:<a@b.example>")).startswith("503")
        assert (await c.cmd("MAIL FROM:<bad address>")).startswith("501")
        assert (await c.cmd("DATA")).startswith("503 5.5.1")
        assert (await c.reply()).startswith("421 4.7.0 Too many errors")
        assert await c.closed()
