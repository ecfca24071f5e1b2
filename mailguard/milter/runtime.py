"""What all milter connections of one process share: config, customers, policy, store bridge.

Responsible for: identifying customers, and the end-of-message decision through the same AUP
core as the gate (``CampaignEnforcer.decide``), run on the one event loop of ``LoopThread``
with a bounded wait.  Accepting commits the reservation at once (a milter cannot see the final
delivery); a commit that fails or times out turns the accept into the store-failure tempfail,
so nothing is accepted uncounted.  A store failure or timeout becomes the configured
``store_failure_reply``.  At RCPT, the mail-bomb hold (``rcpt_hold``, the gate's
``GateRuntime.rcpt_holds`` for one recipient): a store failure or timeout there relays the
recipient, and end of message decides.
Must never: speak the milter protocol (``session`` does), or wait on the store past ``timeout``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailguard.config.schema import Config, Customer
from mailguard.core.customers import CustomerDirectory
from mailguard.core.policy import Decision, Policy
from mailguard.core.verdict import Accept, Defer
from mailguard.decisionlog import DecisionLog
from mailguard.enforcement import CampaignEnforcer
from mailguard.milter.loop import LoopThread
from mailguard.store.base import StoreError
from mailguard.store.redis_store import RedisStore

log = logging.getLogger("mailguard.milter")


@dataclass(frozen=True, slots=True)
class Setup:
    """What a reload replaces, as one value: the config and everything built from it."""

    config: Config
    directory: CustomerDirectory
    policy: Policy
    enforcer: CampaignEnforcer | None


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end-of-message decision and the campaign it was counted in ("" if none)."""

    decision: Decision
    campaign: str
    policy_ms: float


class MilterRuntime:
    """Shared state of one milter process (used from libmilter's threads)."""

    def __init__(
        self,
        config: Config,
        store: RedisStore | None,
        decision_log: DecisionLog,
        bridge: LoopThread,
        timeout: float,
    ) -> None:
        self.store = store
        self.decision_log = decision_log
        self.bridge = bridge
        self.timeout = timeout
        self.clock: Callable[[], float] = time.time
        self.setup = self._setup(config)

    def _setup(self, config: Config) -> Setup:
        policy = Policy(config.policy)
        enforcer = None
        if self.store is not None and policy.counts_campaigns:
            enforcer = CampaignEnforcer(self.store, config.policy, config.campaign_window)
        return Setup(config, CustomerDirectory(config.customers), policy, enforcer)

    def apply(self, config: Config) -> None:
        """Switch to ``config`` for every later callback (the socket and store stay as they are).
        One attribute is replaced, so a callback never sees half of the old and half of the
        new; a transaction already at end of message finishes under the setup it read."""
        self.setup = self._setup(config)

    @property
    def config(self) -> Config:
        return self.setup.config

    def customer_of(self, client_ip: str, auth_user: str | None) -> Customer | None:
        """The customer of an AUTH user name (when known), else of the client address."""
        directory = self.setup.directory
        if auth_user:
            entry = directory.user(auth_user)
            if entry is not None:
                return entry[0]
        return directory.by_address(client_ip) if client_ip else None

    def rcpt_hold(
        self, customer: Customer, tx_id: str, mail_from: str, recipient: str
    ) -> Decision | None:
        """The RCPT-time deferral of ``recipient`` by a mail-bomb hold, or None (also when the
        store fails or does not answer in time: end of message decides then)."""
        setup = self.setup
        enforcer = setup.enforcer
        if enforcer is None or not enforcer.may_hold(setup.policy, customer):
            return None  # no trip to the event loop (the common case: no holds)
        try:
            [decision] = self.bridge.call(
                enforcer.rcpt_holds(setup.policy, customer, mail_from, [recipient], self.clock()),
                self.timeout,
            )
        except (StoreError, TimeoutError) as exc:
            why = str(exc) or f"no answer within {self.timeout}s"
            log.warning("tx=%s mail-bomb hold not read, relaying the RCPT: %s", tx_id, why)
            return None
        except Exception:  # a bug: relay, and let end of message decide
            log.exception("tx=%s mail-bomb hold not read, relaying the RCPT", tx_id)
            return None
        return decision

    def decide(
        self,
        customer: Customer,
        client_ip: str,
        tx_id: str,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
    ) -> Outcome:
        """Decide the message and, when it is accepted, count it; never raises StoreError."""
        start = time.perf_counter()
        setup = self.setup
        if setup.enforcer is None:
            accept = Accept()
            return Outcome(Decision(accept, accept, setup.config.policy.mode), "", 0.0)
        try:
            decision, campaign = self.bridge.call(
                self._decide(
                    setup, setup.enforcer, customer, client_ip, tx_id, mail_from, recipients,
                    message,
                ),
                self.timeout,
            )  # fmt: skip
        except StoreError as exc:
            decision, campaign = self._degraded(setup, tx_id, str(exc)), ""
        except TimeoutError:
            decision = self._degraded(setup, tx_id, f"no answer within {self.timeout}s")
            campaign = ""
        return Outcome(decision, campaign, (time.perf_counter() - start) * 1000)

    async def _decide(
        self,
        setup: Setup,
        enforcer: CampaignEnforcer,
        customer: Customer,
        client_ip: str,
        tx_id: str,
        mail_from: str,
        recipients: Sequence[str],
        message: bytes,
    ) -> tuple[Decision, str]:
        now = self.clock()
        result = await enforcer.decide(
            setup.policy,
            customer,
            client_ip,
            mail_from,
            tuple(recipients),
            message,
            now,
            reservation_id=tx_id,
        )
        if result.reservation is not None:
            # Accepted: the MTA takes it from here, so it counts now.  A failure raises
            # StoreError (tempfail); a reservation left behind lapses after its time to live.
            await enforcer.settle(result.reservation, sent=True, now=now)
        if result.decision.refused:
            await self._note_refusal(
                enforcer, customer, tx_id, mail_from, result.campaign, result.decision
            )
        return result.decision, result.campaign

    async def _note_refusal(
        self,
        enforcer: CampaignEnforcer,
        customer: Customer,
        tx_id: str,
        mail_from: str,
        campaign: str,
        decision: Decision,
    ) -> None:
        """Keep a refusal for ``mailguard inspect`` (best effort), as the gate does."""
        verdict = decision.verdict
        entry = {
            "ts": self.clock(),
            "tx": tx_id,
            "mail_from": mail_from,
            "campaign": campaign,
            "rule": verdict.rule,
            "numbers": dict(verdict.numbers),
            "reply": verdict.reply() if not isinstance(verdict, Accept) else "",
        }
        try:
            await enforcer.inspection.note_refusal(customer.id, entry)
        except StoreError as exc:
            log.warning("tx=%s could not record the refusal for inspect: %s", tx_id, exc)

    def _degraded(self, setup: Setup, tx_id: str, why: str) -> Decision:
        reply = setup.config.policy.store_failure_reply
        log.error("tx=%s store failure, answering %s: %s", tx_id, reply.code, why)
        verdict = Defer(reply.code, reply.enhanced, reply.text, rule="store_failure")
        return Decision(verdict, verdict, setup.config.policy.mode)
