"""The policy hook: rules are asked at RCPT and at end of DATA; refusals carry their codes;
monitor mode logs and refuses nothing; soft_bounce turns 5xx into 4xx; store failures defer."""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.config.schema import PolicyConfig
from mailguard.core.policy import MessageFacts, Policy, RcptFacts
from mailguard.core.verdict import Defer, Reject, Verdict
from mailguard.store.base import StoreError
from tests.gate.conftest import MakeGate, RecordingUpstream
from tests.gate.smtpraw import RawClient


@dataclass
class BlockWord:
    """A rule for the test: refuse recipients named ``blocked`` and bodies saying ``forbidden``."""

    name: str = "block_word"
    fail_store: bool = False

    def check_rcpt(self, facts: RcptFacts) -> Verdict | None:
        if facts.recipient.startswith("blocked@"):
            return Reject(
                550,
                "5.7.1",
                "Refused: blocked recipient (AUP: test)",
                self.name,
                {"count": 1, "threshold": 0},
            )
        return None

    def check_message(self, facts: MessageFacts) -> Verdict | None:
        if self.fail_store:
            raise StoreError("store redis://test: reserve timed out after 2s")
        if b"forbidden" in facts.content:
            return Defer(451, "4.7.1", "Deferred: forbidden word", self.name, {"words": 1})
        return None


async def exchange(gate, body: bytes) -> tuple[str, str, str]:  # type: ignore[no-untyped-def]
    async with RawClient(gate.host, gate.port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        blocked = await c.cmd("RCPT TO:<blocked@example.org>")
        ok = await c.cmd("RCPT TO:<fine@example.org>")
        return blocked, ok, await c.data(body)


async def test_rcpt_and_message_refusals(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    runtime.policy = Policy(runtime.config.policy, [BlockWord()])
    blocked, ok, final = await exchange(gate, b"Subject: x\r\n\r\nforbidden\r\n")
    assert blocked == "550 5.7.1 Refused: blocked recipient (AUP: test)"
    assert ok.startswith("250")
    assert final == "451 4.7.1 Deferred: forbidden word"
    assert upstream.messages == []
    line = gate.decisions()[-1]
    assert line["decision"] == "defer"
    assert line["rule"] == "block_word"
    assert line["numbers"] == {"words": 1}
    assert line["rcpts"][0] == {"rcpt": "blocked@example.org", "reply": "550"}


async def test_monitor_mode_refuses_nothing(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    runtime.policy = Policy(PolicyConfig(mode="monitor"), [BlockWord()])
    blocked, ok, final = await exchange(gate, b"Subject: x\r\n\r\nforbidden\r\n")
    assert blocked.startswith("250") and ok.startswith("250") and final.startswith("250")
    assert upstream.messages[0].rcpts == ["blocked@example.org", "fine@example.org"]
    line = gate.decisions()[-1]
    assert line["decision"] == "accept"
    assert line["policy"] == {
        "mode": "monitor",
        "found": "defer",
        "rule": "block_word",
        "numbers": {"words": 1},
    }


async def test_soft_bounce(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    runtime.policy = Policy(PolicyConfig(soft_bounce=True), [BlockWord()])
    blocked, _, _ = await exchange(gate, b"Subject: x\r\n\r\nfine\r\n")
    assert blocked == "450 4.7.1 Refused: blocked recipient (AUP: test)"


async def test_store_failure_defers(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    runtime.policy = Policy(runtime.config.policy, [BlockWord(fail_store=True)])
    _, _, final = await exchange(gate, b"Subject: x\r\n\r\nfine\r\n")
    assert final.startswith("451 4.3.0"), final
    assert upstream.messages == []
    assert gate.decisions()[-1]["rule"] == "store_failure"


async def test_policy_off_accepts(make_gate: MakeGate, upstream: RecordingUpstream):
    gate = await make_gate()
    runtime = gate.gate.runtime
    runtime.policy = Policy(PolicyConfig(mode="off"), [BlockWord()])
    assert not runtime.policy.active
    blocked, _, final = await exchange(gate, b"Subject: x\r\n\r\nforbidden\r\n")
    assert blocked.startswith("250") and final.startswith("250")
