"""SMTP AUTH: outsiders become customers only with a valid password, only over TLS by default,
and repeated failures are cut off per connection and per client address (counted in Redis)."""

from __future__ import annotations

import base64
import ssl
from pathlib import Path

import aiosmtplib
from argon2 import PasswordHasher

from tests.gate.conftest import BASE_CONFIG, MakeGate, RecordingUpstream, with_tls
from tests.gate.smtpraw import RawClient

HASH = PasswordHasher(time_cost=1, memory_cost=8192).hash("s3cret")

AUTH_CONFIG = (
    BASE_CONFIG.replace('networks = ["127.0.0.0/8"]', 'networks = ["192.0.2.0/24"]')
    + f"""
[[customer.user]]
name = "acme-relay"
password_hash = "{HASH}"
"""
)


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def no_tls(config: str, extra: str = "") -> str:
    return config.replace(
        'hostname = "gate.test"', f'hostname = "gate.test"\nauth_require_tls = false{extra}'
    )


async def test_auth_makes_an_outsider_a_customer(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(no_tls(AUTH_CONFIG))
    async with RawClient(gate.host, gate.port) as c:
        ehlo = await c.ehlo()
        assert "250-AUTH PLAIN LOGIN" in ehlo or "250 AUTH PLAIN LOGIN" in ehlo
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("554 5.7.1")
        await c.cmd("RSET")
        assert (await c.cmd(f"AUTH PLAIN {plain('acme-relay', 's3cret')}")).startswith("235 2.7.0")
        await c.cmd("MAIL FROM:<a@acme.example>")
        assert (await c.cmd("RCPT TO:<b@example.org>")).startswith("250")
        assert (await c.data(b"Subject: x\r\n\r\nhi\r\n")).startswith("250")
    assert len(upstream.messages) == 1
    assert b"with ESMTPA id" in upstream.messages[0].data
    line = gate.decisions()[-1]
    assert (line["customer"], line["auth"], line["decision"]) == ("acme", "acme-relay", "accept")


async def test_auth_login_mechanism(make_gate: MakeGate):
    gate = await make_gate(no_tls(AUTH_CONFIG))
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd("AUTH LOGIN")).startswith("334")
        assert (await c.cmd(base64.b64encode(b"acme-relay"))).startswith("334")
        assert (await c.cmd(base64.b64encode(b"s3cret"))).startswith("235 2.7.0")


async def test_auth_refused_without_tls(make_gate: MakeGate):
    gate = await make_gate(AUTH_CONFIG)
    async with RawClient(gate.host, gate.port) as c:
        ehlo = await c.ehlo()
        assert "AUTH" not in ehlo
        reply = await c.cmd(f"AUTH PLAIN {plain('acme-relay', 's3cret')}")
        assert reply.startswith("538 5.7.11"), reply


async def test_auth_over_starttls(
    make_gate: MakeGate, upstream: RecordingUpstream, certificate: tuple[Path, Path]
):
    cert, _ = certificate
    gate = await make_gate(with_tls(AUTH_CONFIG, certificate))
    context = ssl.create_default_context(cafile=str(cert))
    client = aiosmtplib.SMTP(
        hostname=gate.host, port=gate.port, tls_context=context, start_tls=False
    )
    client.server_auth_methods = []
    await client.connect()
    await client.ehlo()
    assert client.supports_extension("starttls")
    assert not client.supports_extension("auth")
    await client.starttls(server_hostname="gate.test")
    await client.ehlo()
    assert client.supports_extension("auth")
    await client.login("acme-relay", "s3cret")
    await client.sendmail("a@acme.example", ["b@example.org"], b"Subject: tls\r\n\r\nhi\r\n")
    await client.quit()
    assert b"with ESMTPSA id" in upstream.messages[0].data


async def test_auth_failures_per_connection(make_gate: MakeGate):
    gate = await make_gate(no_tls(AUTH_CONFIG))
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        assert (await c.cmd(f"AUTH PLAIN {plain('acme-relay', 'bad1')}")).startswith("535 5.7.8")
        assert (await c.cmd(f"AUTH PLAIN {plain('nobody', 'bad2')}")).startswith("535 5.7.8")
        reply = await c.cmd(f"AUTH PLAIN {plain('acme-relay', 'bad3')}")
        assert reply.startswith("421 4.7.0"), reply
        assert await c.closed()


async def test_auth_failures_per_address_across_connections(make_gate: MakeGate):
    gate = await make_gate(no_tls(AUTH_CONFIG, "\nmax_auth_failures_per_client = 4"))
    for _ in range(2):
        async with RawClient(gate.host, gate.port) as c:
            await c.ehlo()
            for _ in range(2):
                await c.cmd(f"AUTH PLAIN {plain('acme-relay', 'wrong')}")
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        # Even the right password is not checked any more from this address.
        reply = await c.cmd(f"AUTH PLAIN {plain('acme-relay', 's3cret')}")
        assert reply.startswith("421 4.7.0"), reply


async def test_auth_with_store_down_is_temporary(make_gate: MakeGate, redis_server):  # type: ignore[no-untyped-def]
    gate = await make_gate(no_tls(AUTH_CONFIG))
    redis_server.stop()
    try:
        async with RawClient(gate.host, gate.port) as c:
            await c.ehlo()
            reply = await c.cmd(f"AUTH PLAIN {plain('acme-relay', 's3cret')}")
            assert reply.startswith("454 4.7.0"), reply
    finally:
        redis_server.start()
    async with RawClient(gate.host, gate.port) as c:  # recovers without a restart
        await c.ehlo()
        assert (await c.cmd(f"AUTH PLAIN {plain('acme-relay', 's3cret')}")).startswith("235")
