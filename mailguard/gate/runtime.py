"""What all sessions of one gate process share: config, customers, policy, upstream pool, store.

Responsible for: connection admission (overall and per client address), the async policy
``evaluate`` steps (running the pure core, turning store failures into the configured degraded
reply), AUTH verification off the event loop and AUTH failure counting, and atomic config
reload (new connections get the new config; running ones keep theirs).
Must never: speak SMTP itself or import uvloop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import ssl
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import TYPE_CHECKING

from argon2 import PasswordHasher
from argon2.exceptions import Argon2Error, InvalidHashError

from mailguard.config.schema import Config, Customer
from mailguard.core.customers import CustomerDirectory, in_networks
from mailguard.core.policy import Decision, MessageFacts, Policy, RcptFacts
from mailguard.core.verdict import Accept, Defer
from mailguard.decisionlog import DecisionLog
from mailguard.enforcement import CampaignDecision, CampaignEnforcer
from mailguard.gate.upstream import UpstreamPool
from mailguard.store.base import Store, StoreError
from mailguard.store.redis_store import RedisStore

if TYPE_CHECKING:
    from mailguard.gate.session import GateSession, Transaction

log = logging.getLogger("mailguard.gate")


@functools.cache
def _dummy_hash() -> str:
    """A real hash to verify unknown users against, so response time does not reveal them.

    Made on first use: hashing allocates argon2's 64 MiB once, which every gate would otherwise
    carry in its peak RSS even with AUTH unused.
    """
    return PasswordHasher().hash("mailguard-dummy-password")


class GateRuntime:
    """Shared state of one gate process."""

    def __init__(self, config: Config, store: Store, decision_log: DecisionLog) -> None:
        self.store = store
        self.decision_log = decision_log
        self.sessions: set[GateSession] = set()
        self.per_client: collections.Counter[str] = collections.Counter()
        self.draining = False
        self._hasher = PasswordHasher()
        self._date_cache = (0, "")
        # The policy's clock (Unix seconds); tests move it to cover windows without sleeping.
        self.clock: Callable[[], float] = time.time
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Switch to ``config`` for new connections (listeners and store are not rebuilt).

        Everything that can fail (the TLS certificate) is built before anything is switched,
        so a failure leaves the running config whole.  Raises OSError / ssl.SSLError.
        """
        tls_context = tls_context_of(config)
        directory = CustomerDirectory(config.customers)
        policy = Policy(config.policy)
        helo = config.upstream.helo_name or config.server.hostname
        old = getattr(self, "pool", None)
        pool = old
        if old is None or old.config != config.upstream or old.helo != helo:
            pool = UpstreamPool(config.upstream, helo)
        self.config, self.directory, self.policy = config, directory, policy
        self.tls_context = tls_context
        self.enforcer = self._enforcer(config, policy)
        if pool is not old:
            assert pool is not None
            self.pool = pool
            if old is not None:
                # Connections in use return to ``old`` (their own pool), which closes them.
                self._closing_pool = asyncio.get_running_loop().create_task(old.close())

    # -- admission ---------------------------------------------------------------------------

    def admit(self, session: GateSession) -> str | None:
        """Register a new connection, or return the 421 reply that refuses it."""
        server = self.config.server
        if self.draining:
            return "421 4.3.2 Service shutting down, please try again later"
        ip = session.client_ip
        if server.proxy_protocol and not in_networks(ip, server.proxy_trusted_networks):
            return "421 4.7.0 PROXY protocol is only accepted from configured load balancers"
        if len(self.sessions) >= server.max_connections:
            return "421 4.7.0 Too many connections, please try again later"
        # Behind a load balancer the per-client limit applies to the address in the PROXY
        # header (``readdress``), not to the balancer.
        if not server.proxy_protocol and self.per_client[ip] >= server.max_connections_per_client:
            return "421 4.7.0 Too many connections from your address, please try again later"
        self.sessions.add(session)
        self.per_client[ip] += 1
        return None

    def readdress(self, session: GateSession, ip: str) -> str | None:
        """Move a session to the client address a PROXY header named, or refuse it."""
        if self.per_client[ip] >= self.config.server.max_connections_per_client:
            return "421 4.7.0 Too many connections from your address, please try again later"
        self._release_address(session.client_ip)
        session.client_ip = ip
        self.per_client[ip] += 1
        return None

    def _release_address(self, ip: str) -> None:
        self.per_client[ip] -= 1
        if self.per_client[ip] <= 0:
            del self.per_client[ip]

    def forget(self, session: GateSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self._release_address(session.client_ip)

    # -- policy --------------------------------------------------------------------------------

    async def evaluate_rcpt(self, facts: RcptFacts, tx: Transaction) -> Decision:
        """The RCPT-stage decision for one recipient."""
        start = time.perf_counter()
        try:
            return self.policy.rcpt(facts)
        except StoreError as exc:
            return self._degraded(exc, tx)
        finally:
            tx.policy_ms += (time.perf_counter() - start) * 1000

    async def evaluate_message(self, facts: MessageFacts, tx: Transaction) -> Decision:
        """The end-of-DATA decision for the whole message."""
        start = time.perf_counter()
        try:
            return self.policy.message(facts)
        except StoreError as exc:
            return self._degraded(exc, tx)
        finally:
            tx.policy_ms += (time.perf_counter() - start) * 1000

    def _enforcer(self, config: Config, policy: Policy) -> CampaignEnforcer | None:
        """The AUP e-mail rules need the Redis store; None when the policy is off."""
        if not policy.counts_campaigns or not isinstance(self.store, RedisStore):
            return None
        return CampaignEnforcer(self.store, config.policy, config.campaign_window)

    async def evaluate_campaign(
        self, customer: Customer, client_ip: str, tx: Transaction, message: bytes
    ) -> CampaignDecision:
        """The AUP e-mail rules for ``message`` (the message itself, not dot-stuffed)."""
        assert self.enforcer is not None
        start = time.perf_counter()
        try:
            return await self.enforcer.decide(
                self.policy,
                customer,
                client_ip,
                tx.mail_from.address,
                tuple(tx.accepted),
                message,
                self.clock(),
                reservation_id=tx.id,
            )
        except StoreError as exc:
            return CampaignDecision(self._degraded(exc, tx), "", None)
        finally:
            tx.policy_ms += (time.perf_counter() - start) * 1000

    def may_hold(self, customer: Customer) -> bool:
        """False when no RCPT of ``customer`` can be held right now
        (``CampaignEnforcer.may_hold``): :meth:`rcpt_holds` would relay them all."""
        enforcer = self.enforcer
        return enforcer is not None and enforcer.may_hold(self.policy, customer)

    async def rcpt_holds(
        self, customer: Customer, tx: Transaction, recipients: list[str]
    ) -> list[Decision | None]:
        """Per recipient, the RCPT-time deferral of a mail-bomb hold (None: relay it); one store
        read for the batch (callers skip the call when not :meth:`may_hold`).  A store failure
        relays them all: end of DATA decides (and answers the configured store-failure reply if
        the store is still down)."""
        none: list[Decision | None] = [None] * len(recipients)
        if self.enforcer is None:
            return none
        start = time.perf_counter()
        try:
            return await self.enforcer.rcpt_holds(
                self.policy, customer, tx.mail_from.address, recipients, self.clock()
            )
        except StoreError as exc:
            log.warning("tx=%s mail-bomb holds not read, relaying the RCPTs: %s", tx.id, exc)
            return none
        finally:
            tx.policy_ms += (time.perf_counter() - start) * 1000

    async def note_refusal(self, customer: Customer, tx: Transaction, decision: Decision) -> None:
        """Keep a refusal of the AUP rules for ``mailguard inspect`` (best effort)."""
        if self.enforcer is None:
            return
        verdict = decision.verdict
        entry = {
            "ts": self.clock(),
            "tx": tx.id,
            "mail_from": tx.mail_from.address,
            "campaign": tx.campaign,
            "rule": verdict.rule,
            "numbers": dict(verdict.numbers),
            "reply": verdict.reply() if not isinstance(verdict, Accept) else "",
        }
        try:
            await self.enforcer.inspection.note_refusal(customer.id, entry)
        except StoreError as exc:
            log.warning("tx=%s could not record the refusal for inspect: %s", tx.id, exc)

    async def settle(self, tx: Transaction, *, sent: bool) -> None:
        """Count the transaction's message if it was sent, forget its reservation otherwise.
        A store failure here is logged: the reservation then lapses after its time to live."""
        reservation, tx.reservation = tx.reservation, None
        if reservation is None or self.enforcer is None:
            return
        try:
            await self.enforcer.settle(reservation, sent=sent, now=self.clock())
        except StoreError as exc:
            log.error("tx=%s could not settle reservation (sent=%s): %s", tx.id, sent, exc)

    def _degraded(self, exc: StoreError, tx: Transaction) -> Decision:
        reply = self.config.policy.store_failure_reply
        log.error("tx=%s store failure, answering %s: %s", tx.id, reply.code, exc)
        verdict = Defer(reply.code, reply.enhanced, reply.text, rule="store_failure")
        return Decision(verdict, verdict, self.config.policy.mode)

    # -- AUTH --------------------------------------------------------------------------------

    async def auth_blocked(self, ip: str) -> bool:
        server = self.config.server
        try:
            count = await self.store.auth_failures(ip, time.time(), server.auth_failure_window)
        except StoreError as exc:
            log.error("store failure while checking AUTH failures of %s: %s", ip, exc)
            raise
        return count >= server.max_auth_failures_per_client

    async def note_auth_failure(self, ip: str) -> bool:
        """Count a failed AUTH; True when the address has now used up its allowance."""
        server = self.config.server
        try:
            count = await self.store.note_auth_failure(ip, time.time(), server.auth_failure_window)
        except StoreError as exc:
            log.error("store failure while counting an AUTH failure of %s: %s", ip, exc)
            raise
        return count >= server.max_auth_failures_per_client

    async def verify_user(self, name: str, password: bytes) -> Customer | None:
        """The customer whose user ``name`` has ``password``, checked in a worker thread."""
        entry = self.directory.user(name)
        stored = entry[1].password_hash if entry else _dummy_hash()
        ok = await asyncio.get_running_loop().run_in_executor(None, self._verify, stored, password)
        return entry[0] if ok and entry else None

    def _verify(self, stored: str, password: bytes) -> bool:
        try:
            return self._hasher.verify(stored, password)
        except (Argon2Error, InvalidHashError):
            return False

    # -- helpers --------------------------------------------------------------------------------

    def long_line(self, body: bytes) -> bool:
        """True when a line of ``body`` (CRLF-separated) exceeds max_line_length with its CRLF.

        Splitting is linear; a regex like ``[^\r\n]{999}`` restarts at every offset and costs
        about 100x more on ordinary 50 KB messages (measured).
        """
        limit = self.config.server.max_line_length
        if not limit:
            return False
        lines = body.split(b"\r\n")
        if max(map(len, lines)) + 2 <= limit:
            return False
        # Lines starting with "." carry a stuffing dot that is not part of the message.
        return any(len(x) - x.startswith(b".") + 2 > limit for x in lines if len(x) + 2 > limit)

    def rfc2822_now(self) -> str:
        """The current date for Received headers, formatted once per second."""
        now = int(time.time())
        if self._date_cache[0] != now:
            self._date_cache = (now, formatdate(now, localtime=False))
        return self._date_cache[1]


def tls_context_of(config: Config) -> ssl.SSLContext | None:
    """The server TLS context for ``config``; OSError / ssl.SSLError if the files are bad."""
    server = config.server
    if server.tls_certificate is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(server.tls_certificate), str(server.tls_key))
    return context
