"""The AUP's e-mail rules through the gate, with a real redis-server and real SMTP clients:
bulk (20 pass, the 21st refused), designated list servers with opt-in, mail bombs, windows
sliding with the policy clock, personalised copies as one campaign, newsletters as two, and
exactness under concurrency."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from mailguard.optin.records import OptInRecord
from mailguard.optin.store import OptInStore
from tests.campaigns import ARTICLES, ISSUE, campaign_copy
from tests.gate.conftest import BASE_CONFIG, MakeGate, RecordingUpstream, RunningGate
from tests.gate.smtpraw import RawClient

LISTS = BASE_CONFIG.replace(
    'domains = ["acme.example"]', 'domains = ["acme.example"]\nbulk_sender = true'
)


async def send(gate: RunningGate, rcpts: list[str], body: bytes) -> str:
    """One transaction; the DATA reply (or the refusal of the first recipient)."""
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<news@acme.example>")
        for rcpt in rcpts:
            reply = await c.cmd(f"RCPT TO:<{rcpt}>")
            if not reply.startswith("250"):
                return reply
        return await c.data(body.replace(b"\r\n.", b"\r\n.."))


async def test_bulk_threshold_for_a_customer_without_list_server(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    replies = [
        await send(gate, [f"user{i}@example.org"], campaign_copy(f"user{i}@example.org", i))
        for i in range(22)
    ]
    assert all(r.startswith("250") for r in replies[:20]), replies[:20]
    assert replies[20] == (
        "550 5.7.1 Refused: this message is one of 21 substantively similar messages to "
        "different recipients in 24h, and this server is not a designated list server "
        "(AUP: unsolicited bulk e-mail). See https://www.example.net/aup"
    )
    assert replies[21].startswith("550 5.7.1")
    assert len(upstream.messages) == 20
    lines = gate.decisions()
    assert len({line["campaign"] for line in lines}) == 1  # personalised copies: one campaign
    refused = lines[20]
    assert refused["decision"] == "reject"
    assert refused["rule"] == "unsolicited_bulk"
    assert refused["numbers"]["count"] == 21 and refused["numbers"]["threshold"] == 20


async def test_multi_recipient_message_decided_as_a_whole(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    rcpts = [f"r{i}@example.org" for i in range(25)]
    reply = await send(gate, rcpts, campaign_copy("r0@example.org", 0))
    assert reply.startswith("550 5.7.1 Refused: this message is one of 25 "), reply
    assert upstream.messages == []
    # Nothing was counted: 20 of them still pass.
    assert (await send(gate, rcpts[:20], campaign_copy("r0@example.org", 0))).startswith("250")


async def test_list_server_with_optin(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(LISTS)
    store = gate.gate.runtime.store
    optin = OptInStore(store)  # type: ignore[arg-type]
    when = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    for i in range(100):
        await optin.add(
            OptInRecord(
                customer="acme",
                recipient=f"sub{i}@example.org",
                confirmed_at=when,
                source_ip="192.0.2.77",
                evidence=f"<confirm-{i}@acme.example>",
                imported_at=when,
            )
        )
    for start in range(0, 100, 10):
        batch = [f"sub{i}@example.org" for i in range(start, start + 10)]
        reply = await send(gate, batch, campaign_copy(batch[0], start))
        assert reply.startswith("250"), (start, reply)
    reply = await send(gate, ["stranger@example.org"], campaign_copy("stranger@example.org", 1))
    # Past the threshold the count is a lower bound (the set stops growing: bounded memory).
    assert reply.startswith("550 5.7.1 Refused: this message is one of 21 "), reply
    assert "<stranger@example.org> has no confirmed opt-in record" in reply
    assert len(upstream.messages) == 10


async def test_bulk_without_unsubscribe_headers_refused(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate(LISTS)
    optin = OptInStore(gate.gate.runtime.store)  # type: ignore[arg-type]
    when = datetime(2026, 1, 5, tzinfo=UTC)
    for i in range(30):
        await optin.add(
            OptInRecord(
                customer="acme",
                recipient=f"s{i}@example.org",
                confirmed_at=when,
                source_ip="192.0.2.1",
                imported_at=when,
            )
        )
    bare = b"".join(
        line
        for line in campaign_copy("s0@example.org", 0).splitlines(keepends=True)
        if not line.startswith(b"List-Unsubscribe")
    )
    rcpts = [f"s{i}@example.org" for i in range(30)]
    reply = await send(gate, rcpts, bare)
    assert reply.startswith(
        "550 5.7.1 Refused: bulk mail (30 recipients in 24h) must carry "
        "List-Unsubscribe and List-Unsubscribe-Post"
    ), reply
    assert (await send(gate, rcpts, campaign_copy("s0@example.org", 0))).startswith("250")


async def test_mailbomb(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate(LISTS)
    replies = [
        await send(gate, ["victim@example.org"], campaign_copy("victim@example.org", i))
        for i in range(11)
    ]
    assert all(r.startswith("250") for r in replies[:10]), replies
    assert replies[10].startswith(
        "550 5.7.1 Refused: this would be message 11 of substantively similar messages to "
        "<victim@example.org> in 24h; at most 10 are allowed (AUP: mail bombing)."
    ), replies[10]
    # Any 24 hours: 23h59m later it is still refused; after the first sends leave, it passes.
    runtime = gate.gate.runtime
    base = runtime.clock()
    runtime.clock = lambda: base + 86340
    assert (
        await send(gate, ["victim@example.org"], campaign_copy("victim@example.org", 3))
    ).startswith("550 5.7.1")
    runtime.clock = lambda: base + 86400 + 120
    assert (
        await send(gate, ["victim@example.org"], campaign_copy("victim@example.org", 4))
    ).startswith("250")


async def test_window_expiry_frees_bulk_quota(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    base = runtime.clock()
    runtime.clock = lambda: base
    for i in range(20):
        assert (
            await send(gate, [f"u{i}@example.org"], campaign_copy(f"u{i}@example.org", i))
        ).startswith("250")
    assert (
        await send(gate, ["late@example.org"], campaign_copy("late@example.org", 1))
    ).startswith("550")
    runtime.clock = lambda: base + 86400 + 60
    assert (
        await send(gate, ["late@example.org"], campaign_copy("late@example.org", 1))
    ).startswith("250")


async def test_newsletter_issues_are_different_campaigns(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    for n, article in enumerate(ARTICLES):
        body = ISSUE.format(n=n + 1, article=article).encode()
        for i in range(15):
            reply = await send(gate, [f"reader{i}@example.org"], body)
            assert reply.startswith("250"), (n, i, reply)
    assert len({line["campaign"] for line in gate.decisions()}) == 2


async def test_refused_and_upstream_refused_messages_use_no_quota(
    make_gate: MakeGate, upstream: RecordingUpstream
):
    gate = await make_gate()
    upstream.data_reply = "451 4.3.0 try later"
    for i in range(25):
        assert (
            await send(gate, [f"v{i}@example.org"], campaign_copy(f"v{i}@example.org", i))
        ).startswith("451")
    upstream.data_reply = None
    for i in range(20):
        assert (
            await send(gate, [f"v{i}@example.org"], campaign_copy(f"v{i}@example.org", i))
        ).startswith("250")


async def test_exact_under_concurrency(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    replies = await asyncio.gather(
        *(
            send(gate, [f"c{i}@example.org"], campaign_copy(f"c{i}@example.org", i))
            for i in range(50)
        )
    )
    assert sum(r.startswith("250") for r in replies) == 20
    assert sum(r.startswith("550 5.7.1") for r in replies) == 30
    assert len(upstream.messages) == 20


async def test_inspect_shows_campaigns_and_refusals(
    make_gate: MakeGate, upstream: RecordingUpstream, redis_url: str, tmp_path
):  # type: ignore[no-untyped-def]
    import sys

    gate = await make_gate()
    for i in range(21):
        await send(gate, [f"user{i}@example.org"], campaign_copy(f"user{i}@example.org", i))
    campaign = gate.decisions()[0]["campaign"]
    config = tmp_path / "inspect.toml"
    config.write_text(
        f'[store]\nurl = "{redis_url}"\n[[customer]]\nid = "acme"\nnetworks = ["127.0.0.0/8"]\n'
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailguard",
        "inspect",
        "--config",
        str(config),
        "acme",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert f"{campaign}" in text
    assert "        20  no" in text or "        20  yes" in text
    assert "recent refusals: 1" in text
    assert "unsolicited_bulk  550 5.7.1 Refused: this message is one of 21" in text
