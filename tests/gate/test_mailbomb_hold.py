"""The mail-bomb hold at RCPT and monitor-mode counting through the gate, with a real
redis-server and real SMTP clients (issue 4).

After an enforced mail-bomb refusal at end of DATA, RCPT TO from the same envelope sender to
that recipient is deferred with 450 4.7.1 (never 5xx: the message is not known at RCPT) until
the hold ends: ``mailbomb_hold`` after the refusal, or earlier when a copy would be accepted
again.  In monitor mode nothing is refused, nothing is held, and what was sent is counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

from mailguard.enforcement import CampaignEnforcer
from tests.campaigns import campaign_copy
from tests.conftest import RedisServer
from tests.gate.conftest import BASE_CONFIG, MakeGate, RecordingUpstream, RunningGate
from tests.gate.smtpraw import RawClient

VICTIM = "victim@example.org"
SENDER = "news@acme.example"
CLEAN = b"Subject: Minutes\r\nFrom: Ann <ann@acme.example>\r\n\r\nThe minutes are attached.\r\n"
HELD = (
    "450 4.7.1 Deferred: mail from this sender to <victim@example.org> is held for up to 10m "
    "after message 11 of substantively similar messages to it in 24h was refused; at most 10 "
    "are allowed (AUP: mail bombing). See https://www.example.net/aup"
)
BOMB_11 = "550 5.7.1 Refused: this would be message 11 of substantively similar messages"


async def send(
    gate: RunningGate, body: bytes, rcpts: tuple[str, ...] = (VICTIM,), sender: str = SENDER
) -> str:
    """One transaction; the DATA reply, or the first refused RCPT's reply."""
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd(f"MAIL FROM:<{sender}>")
        for rcpt in rcpts:
            reply = await c.cmd(f"RCPT TO:<{rcpt}>")
            if not reply.startswith("250"):
                return reply
        return await c.data(body.replace(b"\r\n.", b"\r\n.."))


async def bomb(gate: RunningGate, copies: int = 11) -> list[str]:
    return [await send(gate, campaign_copy(VICTIM, i)) for i in range(copies)]


async def lines(gate: RunningGate, n: int) -> list[dict[str, Any]]:
    """The decision log once it has ``n`` lines (a transaction ended by the client closing the
    connection is logged when the gate notices)."""
    for _ in range(200):
        found = gate.decisions()
        if len(found) >= n:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(gate.decisions())} decision lines, expected {n}")


def enforcer(gate: RunningGate) -> CampaignEnforcer:
    found = gate.gate.runtime.enforcer
    assert found is not None
    return found


async def test_the_twelfth_copy_is_deferred_at_rcpt(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate()
    replies = await bomb(gate)
    assert all(r.startswith("250") for r in replies[:10]), replies
    assert replies[10].startswith(BOMB_11), replies[10]
    assert await send(gate, campaign_copy(VICTIM, 11)) == HELD
    assert len(upstream.messages) == 10
    line = (await lines(gate, 12))[11]
    assert (line["decision"], line["rule"], line["reply"]) == ("defer", "mailbomb_hold", HELD)
    numbers = {
        "campaign": gate.decisions()[10]["campaign"],
        "recipient": VICTIM,
        "count": 11,
        "threshold": 10,
        "window": "24h",
        "hold": "10m",
    }
    assert line["numbers"] == numbers
    assert line["rcpts"] == [
        {
            "rcpt": VICTIM,
            "reply": "450",
            "policy": {"found": "defer", "rule": "mailbomb_hold", "numbers": numbers},
        }
    ]
    assert line["policy"]["mode"] == "enforce" and line["size"] is None


async def test_hold_only_delays_another_message_and_ends(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    """A different message from the same sender is deferred during the hold (the gate cannot
    know at RCPT that it is different) and accepted once the hold has passed; a copy of the
    bombed campaign is then refused at end of DATA again, which renews the hold."""
    gate = await make_gate()
    runtime = gate.gate.runtime
    base = runtime.clock()
    runtime.clock = lambda: base
    await bomb(gate)
    assert await send(gate, CLEAN) == HELD
    runtime.clock = lambda: base + 599
    assert await send(gate, CLEAN) == HELD
    runtime.clock = lambda: base + 600
    assert (await send(gate, CLEAN)).startswith("250")
    assert (await send(gate, campaign_copy(VICTIM, 12))).startswith(BOMB_11)
    runtime.clock = lambda: base + 1199
    assert await send(gate, campaign_copy(VICTIM, 13)) == HELD
    assert len(upstream.messages) == 11


async def test_other_senders_and_recipients_are_not_held(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate()
    await bomb(gate)
    # Another envelope sender of the customer: decided at end of DATA (the mail-bomb rule counts
    # per customer, so a copy is refused there; a different message passes).
    assert (await send(gate, CLEAN, sender="ann@acme.example")).startswith("250")
    assert (await send(gate, campaign_copy(VICTIM, 5), sender="bob@acme.example")).startswith(
        BOMB_11
    )
    # Another recipient from the held sender.
    assert (await send(gate, campaign_copy("x@example.org", 1), ("x@example.org",))).startswith(
        "250"
    )


async def test_hold_ends_when_a_copy_would_be_accepted_again(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate()
    runtime = gate.gate.runtime
    base = runtime.clock()
    for i in range(10):
        runtime.clock = lambda i=i: base + i * 3600  # type: ignore[misc]
        assert (await send(gate, campaign_copy(VICTIM, i))).startswith("250")
    runtime.clock = lambda: base + 86400 - 30
    assert (await send(gate, campaign_copy(VICTIM, 10))).startswith(BOMB_11)
    runtime.clock = lambda: base + 86400 - 1
    assert await send(gate, campaign_copy(VICTIM, 11)) == HELD
    # The first send has left the window: a copy is accepted again, 9m30s before the hold's
    # longest end.
    runtime.clock = lambda: base + 86400
    assert (await send(gate, campaign_copy(VICTIM, 12))).startswith("250")


def count_hold_reads(gate: RunningGate) -> list[list[str]]:
    """The recipients of every holds read the gate makes from now on (one list per read)."""
    holds = enforcer(gate).holds
    reads: list[list[str]] = []
    original = holds.read

    async def counting_read(customer: str, sender: str, recipients: Any) -> Any:
        reads.append(list(recipients))
        return await original(customer, sender, recipients)

    holds.read = counting_read  # type: ignore[method-assign]
    return reads


async def test_pipelined_rcpts_one_read_only_the_held_one_deferred(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate()
    await bomb(gate)
    reads = count_hold_reads(gate)
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.send(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<{VICTIM}>\r\n"
            "RCPT TO:<b@example.org>\r\n".encode()
        )
        replies = [await c.reply() for _ in range(4)]
        assert replies[0].startswith("250") and replies[1].startswith("250"), replies
        assert replies[2] == HELD and replies[3].startswith("250"), replies
        assert (await c.data(CLEAN)).startswith("250")
    assert reads == [["a@example.org", VICTIM, "b@example.org"]]
    assert upstream.messages[-1].rcpts == ["a@example.org", "b@example.org"]
    line = gate.decisions()[-1]
    assert line["decision"] == "accept"
    assert [r["reply"] for r in line["rcpts"]] == ["250", "450", "250"]
    assert line["rcpts"][1]["policy"]["rule"] == "mailbomb_hold"


async def test_store_failure_at_rcpt_falls_through_to_end_of_data(
    make_gate: MakeGate, upstream: RecordingUpstream, redis_server: RedisServer
) -> None:
    gate = await make_gate(
        BASE_CONFIG.replace('url = "{redis_url}"', 'url = "{redis_url}"\ntimeout = "0.5s"')
    )
    await bomb(gate)
    redis_server.stop()
    try:
        reply = await send(gate, campaign_copy(VICTIM, 11))
    finally:
        redis_server.start()
    assert reply.startswith("451 4.3.0"), reply  # RCPT relayed; end of DATA: store failure
    line = gate.decisions()[-1]
    assert (line["rule"], line["rcpts"][0]["reply"]) == ("store_failure", "250")


async def test_no_hold_when_turned_off_or_monitored(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate(extra='[policy]\nmailbomb_hold = "0s"\n')
    await bomb(gate)
    assert (await send(gate, CLEAN)).startswith("250")
    assert (await send(gate, campaign_copy(VICTIM, 11))).startswith(BOMB_11)


async def test_rcpt_skips_the_read_while_no_hold_can_apply(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    """``may_hold``: after a read found no holds the gate's RCPTs read nothing (for
    ``NONE_CACHE``); a hold written by this process makes them read again at once; a policy
    that cannot hold never reads."""
    gate = await make_gate()
    acme = gate.gate.runtime.config.customers[0]
    policy = gate.gate.runtime.policy
    reads = count_hold_reads(gate)
    assert (await send(gate, CLEAN)).startswith("250")
    assert not enforcer(gate).may_hold(policy, acme)
    assert (await send(gate, CLEAN)).startswith("250")
    assert len(reads) <= 1  # the first one, unless an earlier test's read is still remembered
    reads.clear()
    await bomb(gate)  # the 11th copy is refused: a hold is written
    assert enforcer(gate).may_hold(policy, acme)
    assert await send(gate, campaign_copy(VICTIM, 11)) == HELD
    assert reads[-1] == [VICTIM]
    off = await make_gate(extra='[policy]\nmailbomb_hold = "0s"\n')
    assert not enforcer(off).may_hold(off.gate.runtime.policy, acme)


# -- monitor mode counts what was sent ------------------------------------------------------


async def test_monitor_mode_counts_what_was_sent(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    """Every copy is sent, and counted: the 12th and 13th are found as messages 12 and 13 (they
    were 11 and 11 when monitored messages went uncounted), nothing is held at RCPT, and
    enforcing afterwards refuses copy 14 as message 14."""
    watch = await make_gate(extra='[policy]\nmode = "monitor"\n')
    replies = await bomb(watch, 13)
    assert all(r.startswith("250") for r in replies), replies
    assert len(upstream.messages) == 13
    lines = watch.decisions()
    assert [x["policy"]["found"] for x in lines] == ["accept"] * 10 + ["reject"] * 3
    assert [x["policy"]["numbers"]["count"] for x in lines[10:]] == [11, 12, 13]
    assert {x["decision"] for x in lines} == {"accept"}
    assert await enforcer(watch).holds.read("acme", SENDER, [VICTIM]) == [None]
    enforce = await make_gate()
    assert (await send(enforce, campaign_copy(VICTIM, 13))).startswith(
        "550 5.7.1 Refused: this would be message 14 of"
    )


async def test_monitored_mailbomb_rule_counts_and_bulk_still_enforced(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    gate = await make_gate(extra='mailbomb_action = "monitor"\n')  # in [[customer]]: acme's own
    replies = await bomb(gate, 12)
    assert all(r.startswith("250") for r in replies), replies
    assert [x["policy"]["numbers"]["count"] for x in gate.decisions()[10:]] == [11, 12]
    assert (await send(gate, CLEAN)).startswith("250")  # never held: the rule is monitored
    # The bulk rule is still enforced: 19 more recipients make 20, the 21st is refused.
    for i in range(19):
        rcpt = f"u{i}@example.org"
        assert (await send(gate, campaign_copy(rcpt, i), (rcpt,))).startswith("250")
    reply = await send(gate, campaign_copy("late@example.org", 1), ("late@example.org",))
    assert reply.startswith("550 5.7.1 Refused: this message is one of 21"), reply


async def test_monitor_mode_marks_a_campaign_sent_in_bulk(
    make_gate: MakeGate, upstream: RecordingUpstream
) -> None:
    watch = await make_gate(extra='[policy]\nmode = "monitor"\n')
    for i in range(22):
        rcpt = f"user{i}@example.org"
        assert (await send(watch, campaign_copy(rcpt, i), (rcpt,))).startswith("250")
    lines = watch.decisions()
    assert [x["policy"]["rule"] for x in lines[19:]] == [
        "campaign",
        "unsolicited_bulk",
        "unsolicited_bulk",
    ]
    runtime = watch.gate.runtime
    views = await enforcer(watch).inspection.campaigns("acme", runtime.clock(), 86400)
    assert len(views) == 1 and views[0].bulk_until is not None  # sent in bulk: marked
    assert views[0].recipients == 20  # the set stops growing at the threshold
