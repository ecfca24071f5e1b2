"""Mail-bomb holds: what an enforced mail-bomb refusal leaves behind for the RCPT stage (issue 4).

Responsible for: writing a hold per (customer, envelope sender, recipient) after a message was
refused as a mail bomb at end of DATA (one script, ``lua/mailbomb_hold.lua``, which also works
out when the hold must end), and reading the holds of a transaction's recipients at RCPT (one
``MGET`` per batch of pipelined RCPTs, none while the customer is known to have no holds).
Whether a hold defers a RCPT is the pure core's call (``core.rules.campaign.hold_verdict``).
Must never: decide policy, read the policy clock (only a monotonic one, for the cache), or let a
Redis exception escape (``StoreError``).

Keys (the customer's hash tag, so ``MGET`` and the script run on Redis Cluster)::

    {prefix}:{{customer}}:cust:mbhold:{sender hash}:{recipient hash}   STRING JSON, PX = the hold
    {prefix}:{{customer}}:cust:mbhold:any                              STRING, PX = longest hold

``mbhold:any`` lives as long as any hold of the customer may: a read that finds it absent
remembers for ``NONE_CACHE`` seconds (per process) that the customer has no holds, and reads of
its recipients are skipped meanwhile (most customers never have one; the doors then skip even
the read's coroutine, the milter its event loop).  Staleness contract: a hold written by this
process is honoured by every RCPT read that starts after the write returned (the write clears
that memory, and a read that ran while a write of this process was in flight is not
remembered); one written by another gate or milter is honoured at the latest by the reads
that start ``NONE_CACHE`` seconds after it was written.  Until then its RCPTs are relayed and
end of DATA decides, as it always does, so the delay can only let a held sender's message be
judged in full, never refuse anything more.

Sender and recipient are stored as ``counting.recipient_key`` hashes (normalized, lower-cased),
so no address is stored.  A hold lives until it ends (``PX``), at most ``mailbomb_hold``.
"""

from __future__ import annotations

import json
import time
import weakref
from collections.abc import Callable, Sequence

from mailguard.core.rules.campaign import MailbombHold
from mailguard.store.counting import CampaignKeys, recipient_key
from mailguard.store.redis_store import RedisStore, float_arg, lua_script

HOLD = "mbhold"
ANY = "any"
NONE_CACHE = 1.0  # seconds a "no holds" answer is remembered per process


def parse_hold(raw: bytes | str | None) -> MailbombHold | None:
    """A stored hold, or None (absent, or not a hold this version wrote)."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return MailbombHold(
            campaign=str(data["c"]),
            count=int(data["n"]),
            threshold=int(data["t"]),
            window=float(data["w"]),
            until=float(data["u"]),
        )
    except (ValueError, TypeError, KeyError):
        return None


class _State:
    """What a process knows about its holds, per store (see ``MailbombHolds``)."""

    __slots__ = ("in_flight", "none_until", "started")

    def __init__(self) -> None:
        self.none_until: dict[str, float] = {}  # customer -> until when it has no holds
        # Per customer, hold writes of this process: started so far, and in flight now.  A read
        # caches "no holds" only if no write was in flight or started while it ran (Redis may
        # run a concurrent read before the write; the marker it read is then already stale).
        self.started: dict[str, int] = {}
        self.in_flight: dict[str, int] = {}


_STATES: weakref.WeakKeyDictionary[RedisStore, _State] = weakref.WeakKeyDictionary()


class MailbombHolds:
    """Holds on a ``RedisStore`` (see the module docstring).

    The cache of "no holds" and the count of hold writes in flight belong to the store, not to
    this object: every ``MailbombHolds`` of one ``RedisStore`` shares them.  The gate and the
    milter build a new enforcer (and so a new ``MailbombHolds``) on every reload but keep the
    store, so a hold write still in flight on the old one is seen by the new one's reads, and
    the write's end clears the new one's cache (the staleness contract above holds across a
    reload).  Objects sharing a store must use the same ``monotonic`` clock.
    """

    def __init__(self, store: RedisStore, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._hold = store.script(lua_script("mailbomb_hold"))
        self._monotonic = monotonic
        state = _STATES.get(store)
        if state is None:
            state = _STATES[store] = _State()
        self._none_until = state.none_until
        self._started = state.started
        self._in_flight = state.in_flight

    def none_cached(self, customer: str) -> bool:
        """True while this process knows ``customer`` has no holds (see the module docstring);
        a plain dict read, safe from any thread."""
        return self._none_until.get(customer, 0.0) > self._monotonic()

    def any_key(self, customer: str) -> str:
        return self.store.keys.customer_key(customer, HOLD, ANY)

    def key(self, customer: str, sender: str, recipient: str) -> str:
        return self.store.keys.customer_key(
            customer, HOLD, recipient_key(sender), recipient_key(recipient)
        )

    async def hold(
        self,
        customer: str,
        sender: str,
        campaign: str,
        refused: Sequence[tuple[str, int]],
        now: float,
        *,
        hold: float,
        mailbomb_messages: int,
        mailbomb_window: float,
    ) -> tuple[float | None, ...]:
        """Hold ``refused`` (recipient, the refused message's number to it) for ``sender`` after
        a mail-bomb refusal of a message of ``campaign``; per recipient, when its hold ends (None:
        not held, see ``lua/mailbomb_hold.lua``).  ``StoreError`` if the store fails."""
        if not refused:
            return ()
        if not hold > 0:
            raise ValueError(f"hold must be positive, not {hold!r}")
        keys = CampaignKeys.of(self.store, customer, campaign)
        script_keys: list[str] = []
        for recipient, _ in refused:
            script_keys += [
                self.key(customer, sender, recipient),
                keys.mailbomb_prefix + recipient_key(recipient),
            ]
        script_keys.append(self.any_key(customer))
        args = [
            float_arg("now", now),
            float_arg("hold", hold),
            float_arg("mailbomb_window", mailbomb_window),
            str(int(mailbomb_messages)),
            campaign,
            *(str(int(number)) for _, number in refused),
        ]
        self._none_until.pop(customer, None)
        self._started[customer] = self._started.get(customer, 0) + 1
        self._in_flight[customer] = self._in_flight.get(customer, 0) + 1
        try:
            raw = await self.store.run_script("mailbomb_hold", self._hold, script_keys, args)
        finally:
            self._in_flight[customer] -= 1
            if not self._in_flight[customer]:
                del self._in_flight[customer]
            self._none_until.pop(customer, None)
        ends = (float(x) for x in raw)
        return tuple(end if end > 0 else None for end in ends)

    async def read(
        self, customer: str, sender: str, recipients: Sequence[str]
    ) -> list[MailbombHold | None]:
        """The holds of ``sender`` to each of ``recipients`` (one ``MGET``); None where there is
        none.  ``StoreError`` if the store fails."""
        if not recipients:
            return []
        if self.none_cached(customer):
            return [None] * len(recipients)
        keys = [self.key(customer, sender, r) for r in recipients]
        started = self._monotonic()
        quiet = customer not in self._in_flight
        writes = self._started.get(customer, 0)
        raw = await self.store.command("mailbomb_holds", "MGET", self.any_key(customer), *keys)
        if raw[0] is None:
            if quiet and self._started.get(customer, 0) == writes:
                self._none_until[customer] = started + NONE_CACHE
            return [None] * len(recipients)
        return [parse_hold(x) for x in raw[1:]]
