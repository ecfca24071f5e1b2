"""The gate and the milter log the same decision line for the same input (issue 5).

Each scenario runs twice on a flushed Redis: through ``mailguard milter`` driven by
``miltertest``, and through the gate with a real SMTP client, the same client address, HELO,
envelope and message bytes.  The lines must be equal but for what a door cannot know
(``mailguard.decisionlog``): ``ts``, ``tx``, ``ms``, the upstream's own text after an accepted
message's 250, and the campaign id, which is new per run (compared by pattern instead: which
lines share a campaign).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.campaigns import campaign_copy
from tests.conftest import RedisServer
from tests.gate.conftest import MakeGate, RunningGate, make_gate, upstream  # noqa: F401
from tests.gate.test_two_gates import send
from tests.milter.conftest import RunLua, RunningMilter
from tests.milter.test_miltertest import Tx, session

SENDER = "news@acme.example"
CLEAN = b"Subject: Minutes\r\nFrom: Ann <ann@acme.example>\r\n\r\nThe minutes are attached.\r\n"
BOB = "bob@example.org"

# name -> the (recipient, message) of each transaction, in order
SCENARIOS: dict[str, list[tuple[str, bytes]]] = {
    "clean": [(BOB, CLEAN)],
    "bulk": [(f"user{i}@example.org", campaign_copy(f"user{i}@example.org", i)) for i in range(21)],
    "mailbomb": [(BOB, campaign_copy(BOB, i)) for i in range(11)],
    # the 12th copy: deferred at RCPT by the mail-bomb hold the 11th's refusal left
    "mailbomb_hold": [(BOB, campaign_copy(BOB, i)) for i in range(12)],
}
HELD = (
    "450 4.7.1 Deferred: mail from this sender to <bob@example.org> is held for up to 10m after "
    "message 11 of substantively similar messages to it in 24h was refused; at most 10 are "
    "allowed (AUP: mail bombing). See https://www.example.net/aup"
)


def comparable(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines without the fields that differ between doors by necessity."""
    campaigns: dict[str, int] = {}
    out = []
    for line in lines:
        line = {k: v for k, v in line.items() if k not in ("ts", "tx", "ms")}
        if line["decision"] == "accept":
            line["reply"] = line["reply"][:3]
        if "campaign" in line:
            line["campaign"] = campaigns.setdefault(line["campaign"], len(campaigns))
        holders = [line.get("policy", {}).get("numbers", {}), line.get("numbers", {})]
        holders += [r.get("policy", {}).get("numbers", {}) for r in line["rcpts"]]
        for holder in holders:
            if "campaign" in holder:
                holder["campaign"] = campaigns.setdefault(holder["campaign"], len(campaigns))
        out.append(line)
    return out


async def through_gate(
    gate: RunningGate, txs: list[tuple[str, bytes]], replies: list[str] | None = None
) -> list[dict[str, Any]]:
    before = len(gate.decisions())
    for rcpt, message in txs:
        reply = await send(gate.port, rcpt, message)
        if replies is not None:
            replies.append(reply)
    # A transaction the client ended by closing (after a refused RCPT) is logged when the gate
    # notices the close.
    for _ in range(500):
        if len(gate.decisions()) >= before + len(txs):
            break
        await asyncio.sleep(0.01)
    return gate.decisions()[before:]


def through_milter(
    milter: RunningMilter,
    miltertest: RunLua,
    txs: list[tuple[str, bytes]],
    echoed: list[str] | None = None,
) -> list[dict[str, Any]]:
    before = len(milter.decisions())
    out = miltertest(session(milter.spec, "127.0.0.1", [Tx(SENDER, [r], m) for r, m in txs]))
    if echoed is not None:
        echoed += out
    return milter.wait_for_decisions(before + len(txs))[before:]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
async def test_same_decision_lines(
    scenario: str,
    milter: RunningMilter,
    miltertest: RunLua,
    make_gate: MakeGate,  # noqa: F811
    redis_server: RedisServer,
) -> None:
    txs = SCENARIOS[scenario]
    by_milter = through_milter(milter, miltertest, txs)
    redis_server.flush()
    by_gate = await through_gate(await make_gate(), txs)
    assert len(by_milter) == len(by_gate) == len(txs), (by_milter, by_gate)
    pairs = zip(comparable(by_gate), comparable(by_milter), strict=True)
    for n, (gate_line, milter_line) in enumerate(pairs):
        assert gate_line == milter_line, n
    expected_last = {
        "clean": "accept",
        "bulk": "reject",
        "mailbomb": "reject",
        "mailbomb_hold": "defer",
    }[scenario]
    assert by_gate[-1]["decision"] == expected_last, by_gate[-1]
    if scenario != "mailbomb_hold":
        assert [x["decision"] for x in by_gate[:-1]] == ["accept"] * (len(txs) - 1)


async def test_twelfth_copy_refused_at_rcpt_by_both_doors(
    milter: RunningMilter,
    miltertest: RunLua,
    make_gate: MakeGate,  # noqa: F811
    redis_server: RedisServer,
) -> None:
    """Both doors defer the 12th copy of a campaign to one recipient at RCPT, before any data:
    the gate answers the hold's 450 4.7.1 to RCPT TO, the milter answers envrcpt with the same
    reply (setreply + tempfail: miltertest reads "replycode" and never reaches end of message),
    and both log the same line: decision defer, rule mailbomb_hold, that reply."""
    txs = SCENARIOS["mailbomb_hold"]
    echoed: list[str] = []
    by_milter = through_milter(milter, miltertest, txs, echoed)
    redis_server.flush()
    replies: list[str] = []
    by_gate = await through_gate(await make_gate(), txs, replies)
    assert [x.startswith("250") for x in replies] == [True] * 10 + [False, False]
    assert replies[10].startswith("550 5.7.1 Refused: this would be message 11 "), replies[10]
    assert replies[11] == HELD
    assert "R rcpt11 replycode" in echoed and not any(x.startswith("R eom11") for x in echoed)
    assert next(x for x in echoed if x.startswith("R eom10 ")).startswith("R eom10 replycode")
    for line in (by_gate[11], by_milter[11]):
        assert (line["decision"], line["rule"], line["reply"]) == ("defer", "mailbomb_hold", HELD)
        assert line["rcpts"][0]["reply"] == "450" and line["size"] is None
        assert line["rcpts"][0]["policy"]["rule"] == "mailbomb_hold"
    assert comparable(by_gate) == comparable(by_milter)


async def test_same_decision_line_with_redis_stopped(
    milter: RunningMilter,
    miltertest: RunLua,
    make_gate: MakeGate,  # noqa: F811
    redis_server: RedisServer,
) -> None:
    gate = await make_gate()
    txs = [(BOB, CLEAN)]
    redis_server.stop()
    try:
        by_milter = through_milter(milter, miltertest, txs)
        by_gate = await through_gate(gate, txs)
    finally:
        redis_server.start()
    assert comparable(by_gate) == comparable(by_milter)
    [line] = by_gate
    assert (line["decision"], line["rule"]) == ("defer", "store_failure"), line
    assert line["reply"].startswith("451 4.3.0"), line
