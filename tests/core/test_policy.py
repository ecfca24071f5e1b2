"""The policy core's modes (pure): enforce, monitor, soft_bounce, off."""

from __future__ import annotations

from dataclasses import dataclass

from mailguard.config.schema import PolicyConfig
from mailguard.core.policy import MessageFacts, Policy, RcptFacts, SessionFacts
from mailguard.core.verdict import Accept, Reject, Verdict

SESSION = SessionFacts("192.0.2.1", "acme", None, "client.test")
RCPT = RcptFacts(SESSION, "a@acme.example", "b@example.org", (), 1000.0)
MESSAGE = MessageFacts(SESSION, "a@acme.example", ("b@example.org",), 10, 1000.0, b"hi")
REFUSAL = Reject(550, "5.7.1", "no", "always", {"count": 21, "threshold": 20})


@dataclass
class Always:
    name: str = "always"

    def check_rcpt(self, facts: RcptFacts) -> Verdict | None:
        return REFUSAL

    def check_message(self, facts: MessageFacts) -> Verdict | None:
        return None


def test_no_rules_accepts() -> None:
    policy = Policy(PolicyConfig())
    assert not policy.active
    assert isinstance(policy.rcpt(RCPT).verdict, Accept)
    assert isinstance(policy.message(MESSAGE).verdict, Accept)


def test_enforce() -> None:
    decision = Policy(PolicyConfig(), [Always()]).rcpt(RCPT)
    assert decision.refused and decision.verdict is REFUSAL


def test_monitor() -> None:
    decision = Policy(PolicyConfig(mode="monitor"), [Always()]).rcpt(RCPT)
    assert not decision.refused
    assert decision.found is REFUSAL
    assert decision.verdict.numbers == REFUSAL.numbers


def test_soft_bounce() -> None:
    decision = Policy(PolicyConfig(soft_bounce=True), [Always()]).rcpt(RCPT)
    assert decision.verdict.reply() == "450 4.7.1 no"  # type: ignore[union-attr]
    assert decision.found is REFUSAL


def test_off() -> None:
    policy = Policy(PolicyConfig(mode="off"), [Always()])
    assert not policy.active
    assert not policy.rcpt(RCPT).refused
