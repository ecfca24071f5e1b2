"""Read-only views of a customer's campaign state, and the short log of recent refusals.

Responsible for: what ``mailguard inspect`` shows an admin: the customer's live campaigns (from
the counting keys of ``mailguard.store.counting``: distinct recipients within the bulk window,
the bulk mark) and the last refusals of the AUP rules, which the gate records here.
Must never: change counters (the refusal log is its own capped list) or decide anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mailguard.store.counting import CAMPAIGN
from mailguard.store.redis_store import RedisStore

REFUSALS = "refusals"
KEEP_REFUSALS = 100
REFUSAL_TTL = 7 * 86400.0


@dataclass(frozen=True, slots=True)
class CampaignView:
    """One campaign as an admin sees it."""

    campaign: str
    recipients: int  # distinct recipients with a committed send within the window
    last_send: float | None  # Unix time of the latest committed send
    bulk_until: float | None  # the bulk mark's end, if the campaign is (still) bulk


class Inspection:
    """Campaign views and the refusal log of one store."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    async def note_refusal(self, customer: str, entry: dict[str, Any]) -> None:
        """Append one refusal (a JSON object) to the customer's capped log."""
        key = self.store.keys.customer_key(customer, REFUSALS)
        line = json.dumps(entry, ensure_ascii=True, default=str)
        redis = self.store.client

        async def call() -> None:
            async with redis.pipeline(transaction=True) as pipe:
                pipe.lpush(key, line)
                pipe.ltrim(key, 0, KEEP_REFUSALS - 1)
                pipe.pexpire(key, int(REFUSAL_TTL * 1000))
                await pipe.execute()

        await self.store.run("note_refusal", call)

    async def refusals(self, customer: str, limit: int = 20) -> list[dict[str, Any]]:
        key = self.store.keys.customer_key(customer, REFUSALS)
        raw = await self.store.run(
            "refusals", lambda: self.store.client.lrange(key, 0, max(0, limit - 1))
        )
        return [json.loads(x) for x in raw]

    async def campaigns(self, customer: str, now: float, window: float) -> list[CampaignView]:
        """The customer's campaigns with a committed send within ``window`` before ``now``,
        busiest first."""
        prefix = self.store.keys.customer_key(customer, CAMPAIGN)
        redis = self.store.client

        async def scan() -> list[str]:
            found = []
            async for key in redis.scan_iter(match=f"{prefix}:*:sent", count=500):
                found.append(key.decode() if isinstance(key, bytes) else str(key))
            return found

        views = []
        keys: list[str] = await self.store.run("campaigns", scan)
        for key in keys:
            campaign = key[len(prefix) + 1 : -len(":sent")]
            base = key[: -len(":sent")]

            async def read(key: str = key, base: str = base) -> tuple[Any, Any, Any]:
                async with redis.pipeline(transaction=False) as pipe:
                    pipe.zcount(key, f"({now - window!r}", "+inf")
                    pipe.zrevrange(key, 0, 0, withscores=True)
                    pipe.get(f"{base}:bulk_until")
                    count, last, bulk = await pipe.execute()
                return count, last, bulk

            count, last, bulk = await self.store.run("campaign", read)
            if not count:
                continue
            bulk_until = float(bulk) if bulk is not None and float(bulk) > now else None
            views.append(
                CampaignView(campaign, int(count), float(last[0][1]) if last else None, bulk_until)
            )
        views.sort(key=lambda v: (-v.recipients, v.campaign))
        return views
