"""The policy core: facts about a transaction in, a ``Decision`` out.

Responsible for: running the configured rules at the two stages a before-queue proxy has (RCPT,
where one recipient can be refused, and end of DATA, where only the whole message can be) and
applying the rollout safety nets: ``monitor`` mode logs what would have been refused and refuses
nothing; ``soft_bounce`` turns 5xx refusals into 4xx.  With no rules, everything is accepted.
Must never: do I/O, read a clock, or import a front end; counters a rule needs come in as facts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from mailguard.config.schema import CampaignLimits, PolicyConfig
from mailguard.core.rules import campaign as campaign_rules
from mailguard.core.verdict import Accept, Defer, Reject, Verdict


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What is known about the client when a transaction starts."""

    client_ip: str
    customer: str | None
    auth_user: str | None
    helo: str | None


@dataclass(frozen=True, slots=True)
class RcptFacts:
    """One recipient being added to a transaction; ``accepted`` are those already accepted."""

    session: SessionFacts
    mail_from: str
    recipient: str
    accepted: tuple[str, ...]
    now: float


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """A complete message at end of DATA.  ``size`` is in octets as received (dot-stuffed)."""

    session: SessionFacts
    mail_from: str
    recipients: tuple[str, ...]
    size: int
    now: float
    content: bytes = field(repr=False, default=b"")


class Rule(Protocol):
    """A small named rule.  Returning None means the rule has nothing to say."""

    name: str

    def check_rcpt(self, facts: RcptFacts) -> Verdict | None: ...

    def check_message(self, facts: MessageFacts) -> Verdict | None: ...


@dataclass(frozen=True, slots=True)
class Decision:
    """What the client gets (``verdict``) and what the rules found (``found``).

    They differ in monitor mode (found a refusal, verdict accept) and with soft_bounce
    (found a reject, verdict the matching defer).
    """

    verdict: Verdict
    found: Verdict
    mode: str

    @property
    def refused(self) -> bool:
        return not isinstance(self.verdict, Accept)


class Policy:
    """Runs rules in order; the first refusal wins."""

    def __init__(self, config: PolicyConfig, rules: Sequence[Rule] = ()) -> None:
        self._config = config
        self._rules = tuple(rules) if config.mode != "off" else ()

    @property
    def active(self) -> bool:
        """False when no rule can refuse anything, so doors may skip evaluation entirely."""
        return bool(self._rules)

    def rcpt(self, facts: RcptFacts) -> Decision:
        for rule in self._rules:
            found = rule.check_rcpt(facts)
            if found is not None and not isinstance(found, Accept):
                return self._apply(found)
        return self._accept()

    def message(self, facts: MessageFacts) -> Decision:
        for rule in self._rules:
            found = rule.check_message(facts)
            if found is not None and not isinstance(found, Accept):
                return self._apply(found)
        return self._accept()

    @property
    def counts_campaigns(self) -> bool:
        """True when the AUP's mail rules run (they need the store), i.e. mode is not off."""
        return self._config.mode != "off"

    def campaign(
        self,
        limits: CampaignLimits,
        count: campaign_rules.CampaignCount,
        sender: campaign_rules.SenderFacts,
    ) -> Decision:
        """The AUP mail rules' decision for one message, with the rule's action applied
        (``monitor``: found and logged, not refused) and then the global mode."""
        found, action = campaign_rules.decide(self._config, limits, count, sender)
        if isinstance(found, Accept):
            return Decision(found, found, self._config.mode)
        if action == "monitor":
            return Decision(Accept(rule=found.rule, numbers=found.numbers), found, "monitor")
        return self._apply(found)

    def checks_holds(self, limits: CampaignLimits) -> bool:
        """Can :meth:`mailbomb_hold` defer anything for a customer with ``limits``?  (When not,
        the doors skip reading the holds at RCPT.)"""
        config = self._config
        return (
            config.mode == "enforce"
            and config.mailbomb_hold > 0
            and limits.mailbomb_action != "monitor"
        )

    def mailbomb_hold(
        self,
        limits: CampaignLimits,
        recipient: str,
        hold: campaign_rules.MailbombHold | None,
        now: float,
    ) -> Decision | None:
        """The RCPT-time deferral of ``recipient`` under the stored ``hold`` of this envelope
        sender and recipient (``campaign_rules.hold_verdict``), or None: relay the RCPT."""
        if hold is None:
            return None
        found = campaign_rules.hold_verdict(self._config, limits, recipient, hold, now)
        if found is None:
            return None
        return Decision(found, found, self._config.mode)

    def _accept(self) -> Decision:
        accept = Accept()
        return Decision(accept, accept, self._config.mode)

    def _apply(self, found: Reject | Defer) -> Decision:
        mode = self._config.mode
        if mode == "monitor":
            return Decision(Accept(rule=found.rule, numbers=found.numbers), found, mode)
        if isinstance(found, Reject) and self._config.soft_bounce:
            return Decision(found.softened(), found, mode)
        return Decision(found, found, mode)
