"""The AUP's e-mail rules at end of DATA: the async steps between the pure core and the store.

Responsible for: one message's way through the rules, for every door (the gate now, the milter
later): fingerprint the message (pure), look up opt-in records when the sender is a designated
list server (one HMGET), assign its campaign and reserve the message in the campaign's counters
(one atomic script for both, all or nothing: ``store.counting.CampaignDecider``), and let the pure
core decide.  The door then settles the reservation (one script): commit when the upstream
accepted the message, release otherwise, so only what was sent counts.  So a message costs two
store round trips at end of DATA (three from a designated list server), plus the holds' read at
RCPT below.

When a rule's refusals are only monitored (``[policy] mode = "monitor"`` or the rule's action
``monitor``) the message is reserved all the same and, once sent, counted: monitor mode counts
exactly what was sent, so its figures show what the customer really sent over time.

After an enforced mail-bomb refusal it also writes the *holds* (one more script, only then):
RCPT TO from the same envelope sender to a refused recipient is deferred for a while
(``rcpt_holds``, one ``MGET`` per batch of RCPTs; ``core.rules.campaign`` says exactly when).
Must never: speak SMTP, decide policy itself (``mailguard.core`` does), or read the clock (``now``
is passed in).
"""

from __future__ import annotations

import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from functools import lru_cache
from typing import Any

from mailguard.config.schema import CampaignLimits, Customer, PolicyConfig
from mailguard.core.customers import in_networks
from mailguard.core.fingerprint import fingerprint
from mailguard.core.policy import Decision, Policy
from mailguard.core.rules.campaign import (
    CampaignCount,
    RecipientCount,
    SenderFacts,
    excused,
    has_one_click,
    monitored,
)
from mailguard.optin.store import OptInStore
from mailguard.store.base import StoreError
from mailguard.store.clustering import ClusterStore
from mailguard.store.counting import (
    CampaignCounter,
    CampaignDecider,
    CountingParams,
    Reservation,
    SettleOutcome,
)
from mailguard.store.holds import MailbombHolds
from mailguard.store.inspection import Inspection
from mailguard.store.redis_store import RedisStore

log = logging.getLogger("mailguard")

_HEADERS = BytesHeaderParser(policy=compat32)


@dataclass(frozen=True, slots=True)
class CampaignDecision:
    """The decision for one message, its campaign id, and the reservation to settle (if any)."""

    decision: Decision
    campaign: str
    reservation: Reservation | None


@dataclass(frozen=True, slots=True)
class ListHeaders:
    """The headers the bulk rules read (RFC 2919, RFC 2369, RFC 8058)."""

    list_id: str
    list_unsubscribe: bool
    one_click: bool

    @classmethod
    def of(cls, message: bytes) -> ListHeaders:
        end = message.find(b"\r\n\r\n")
        head = message if end < 0 else message[: end + 2]
        if b"list-" not in head.lower():  # none of the three (most mail): skip the parser
            return _NO_LIST_HEADERS
        parsed = _HEADERS.parsebytes(head)
        return cls(
            str(parsed.get("List-Id", "") or ""),
            bool(str(parsed.get("List-Unsubscribe", "") or "").strip()),
            has_one_click([str(v) for v in parsed.get_all("List-Unsubscribe-Post", [])]),
        )


_NO_LIST_HEADERS = ListHeaders("", False, False)


@lru_cache(maxsize=256)
def _counting_params(limits: CampaignLimits) -> CountingParams:
    return CountingParams(
        bulk_recipients=limits.bulk_recipients,
        bulk_window=limits.bulk_window,
        mailbomb_messages=limits.mailbomb_messages,
        mailbomb_window=limits.mailbomb_window,
    )


@lru_cache(maxsize=256)
def _sender_without_optin(
    designated: bool, transactional: bool, recipients: int, list_unsubscribe: bool, one_click: bool
) -> tuple[SenderFacts, tuple[bool, ...]]:
    """The facts of a sender whose recipients' opt-in records are not looked up (none is taken
    as confirmed), and whom they excuse: most messages share a few of these (frozen) values."""
    sender = SenderFacts(
        designated, transactional, (False,) * recipients, list_unsubscribe, one_click
    )
    return sender, excused(sender)


@lru_cache(maxsize=256)
def _lowered(senders: tuple[str, ...]) -> frozenset[str]:
    return frozenset(s.lower() for s in senders)


class CampaignEnforcer:
    """Runs the AUP's e-mail rules for one message against the shared store."""

    def __init__(self, store: RedisStore, policy_config: PolicyConfig, window: float) -> None:
        """``window``: how long a campaign is remembered after its last message (seconds): the
        longest bulk or mail-bomb window of any customer."""
        self.clusters = ClusterStore(store, window)
        self.counter = CampaignCounter(store)
        self.decider = CampaignDecider(self.clusters, self.counter)
        self.optin = OptInStore(store)
        self.inspection = Inspection(store)
        self.holds = MailbombHolds(store)
        self.policy_config = policy_config
        # customer id -> (the customer, what _rules_of returns for it)
        self._rules: dict[
            str, tuple[Customer, tuple[CampaignLimits, CountingParams, tuple[bool, bool]]]
        ] = {}

    def _rules_of(
        self, customer: Customer
    ) -> tuple[CampaignLimits, CountingParams, tuple[bool, bool]]:
        """``customer``'s limits, the store's counting parameters for them, and which rules only
        monitor (``monitored``); kept per customer (both it and the policy config are frozen)."""
        found = self._rules.get(customer.id)
        if found is not None and found[0] is customer:
            return found[1]
        limits = customer.limits(self.policy_config)
        rules = (limits, _counting_params(limits), monitored(self.policy_config, limits))
        self._rules[customer.id] = (customer, rules)
        return rules

    async def decide(
        self,
        policy: Policy,
        customer: Customer,
        client_ip: str,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
        now: float,
        reservation_id: str,
    ) -> CampaignDecision:
        """Decide ``message`` (the message itself, not dot-stuffed) to ``recipients``.

        When the result is not refused the caller must settle ``reservation``: commit once the
        upstream accepted the message, release otherwise.  Raises ``StoreError``.
        """
        limits, params, monitors = self._rules_of(customer)
        fp = fingerprint(message, recipients)
        headers = ListHeaders.of(message)
        designated = customer.bulk_sender or in_networks(client_ip, customer.bulk_networks)
        transactional = mail_from.lower() in _lowered(customer.transactional_senders)
        if designated and not transactional:
            optin = tuple(await self.optin.has_confirmed(customer.id, headers.list_id, recipients))
            sender = SenderFacts(
                designated, transactional, optin, headers.list_unsubscribe, headers.one_click
            )
            free = excused(sender)
        else:
            sender, free = _sender_without_optin(
                designated,
                transactional,
                len(recipients),
                headers.list_unsubscribe,
                headers.one_click,
            )
        campaign, result = await self.decider.assign_and_reserve(
            customer.id,
            fp,
            recipients,
            now,
            params=params,
            excused=free,
            reservation_id=reservation_id,
            monitored=monitors,
        )
        decided = result.recipients
        if decided.plain:  # every recipient NEW or SEEN: none to name (the common case)
            counts: tuple[RecipientCount, ...] = ()
        else:
            counts = tuple(
                # past the threshold and not excused: what the store calls BULK, also when the
                # recipient is a mail bomb as well (reported MAILBOMB), so a monitored mail-bomb
                # rule never hides an enforced bulk refusal
                RecipientCount(r.recipient, r.past and not ok, r.mailbomb_count)
                for r, ok in zip(decided, free, strict=True)
            )
        count = CampaignCount(campaign, result.distinct, result.bulk, counts, decided.mailbomb_max)
        decision = policy.campaign(limits, count, sender)
        reservation = result.reservation
        if decision.refused and reservation is not None:
            await self.counter.release(reservation, now)  # e.g. hygiene refused a bulk message
            reservation = None
        elif reservation is None and not decision.refused:  # a bug: it would be sent uncounted
            log.error("campaign %s: message %s accepted unreserved", campaign, reservation_id)
        if decision.refused and decision.found.rule == "mailbomb":
            await self._hold(customer, limits, mail_from, campaign, count, now)
        return CampaignDecision(decision, campaign, reservation)

    async def _hold(
        self,
        customer: Customer,
        limits: CampaignLimits,
        mail_from: str,
        campaign: str,
        count: CampaignCount,
        now: float,
    ) -> None:
        """Hold the recipients this message was refused for as a mail bomb (best effort: a
        store failure only means the next copy is decided at end of DATA again)."""
        hold = self.policy_config.mailbomb_hold
        if hold <= 0:
            return
        bombed = [
            (r.recipient, r.mailbomb_count)
            for r in count.recipients
            if r.mailbomb_count > limits.mailbomb_messages
        ]
        try:
            await self.holds.hold(
                customer.id,
                mail_from,
                campaign,
                bombed,
                now,
                hold=hold,
                mailbomb_messages=limits.mailbomb_messages,
                mailbomb_window=limits.mailbomb_window,
            )
        except StoreError as exc:
            log.warning("campaign %s: could not write the mail-bomb hold: %s", campaign, exc)

    def may_hold(self, policy: Policy, customer: Customer) -> bool:
        """False when no RCPT of ``customer`` can be held right now: ``policy`` cannot defer
        anything for its limits (``Policy.checks_holds``), or this process knows the customer
        has no holds (``MailbombHolds.none_cached``, with its staleness contract).  Synchronous
        and cheap, so the doors ask it before :meth:`rcpt_holds` (the common case: no hold)."""
        limits = self._rules_of(customer)[0]
        return policy.checks_holds(limits) and not self.holds.none_cached(customer.id)

    async def rcpt_holds(
        self,
        policy: Policy,
        customer: Customer,
        mail_from: str,
        recipients: Sequence[str],
        now: float,
    ) -> list[Decision | None]:
        """Per recipient, the RCPT-time deferral its mail-bomb hold calls for (None: relay it).
        One store read for all of them, none when no hold can apply (:meth:`may_hold`).
        Raises ``StoreError``: the door then relays the RCPT (end of DATA decides)."""
        if not recipients or not self.may_hold(policy, customer):
            return [None] * len(recipients)
        limits = self._rules_of(customer)[0]
        holds = await self.holds.read(customer.id, mail_from, recipients)
        return [
            policy.mailbomb_hold(limits, recipient, hold, now)
            for recipient, hold in zip(recipients, holds, strict=True)
        ]

    def settle(
        self, reservation: Reservation, *, sent: bool, now: float
    ) -> Coroutine[Any, Any, SettleOutcome]:
        """Count the message if the upstream accepted it, forget it otherwise (to await)."""
        return self.counter.settle(reservation, commit=sent, now=now)
