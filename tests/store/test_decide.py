"""``CampaignDecider``: cluster assignment and reservation in one script equal the two calls.

The one-call script runs the bodies of ``cluster_assign.lua`` and ``campaign_reserve.lua``
unchanged; these tests hold it against the two separate calls on a second key prefix of the same
redis-server (the two scripts are themselves held against their models in test_clustering.py
and test_counting.py).
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint.sketch import LANES, Fingerprint
from mailguard.store.base import StoreError
from mailguard.store.clustering import ClusterStore
from mailguard.store.counting import (
    CampaignCounter,
    CampaignDecider,
    CampaignKeys,
    CountingParams,
    SettleOutcome,
    Verdict,
)
from mailguard.store.redis_store import RedisStore

NOW = 1_700_000_000.0
DAY = 86400.0
CUSTOMER = "acme"
PARAMS = CountingParams(bulk_recipients=3, mailbomb_messages=2, reservation_ttl=10.0)


def sketch(seed: int, changed: int = 0) -> Fingerprint:
    """A sketch; ``changed`` lanes (of 128) differ from the sketch of the same seed."""
    rng = random.Random(seed)
    lanes = [rng.getrandbits(16) for _ in range(LANES)]
    for i in range(changed):
        lanes[i] ^= 0xFFFF
    return Fingerprint("sketch", struct.pack(f">{LANES}H", *lanes), 100)


def exact(tag: int) -> Fingerprint:
    return Fingerprint("exact", struct.pack(">Q", tag), 3)


class Pair:
    """The same operations through the one-call decider and through the two separate calls."""

    def __init__(self, one: RedisStore, two: RedisStore) -> None:
        self.decider = CampaignDecider(ClusterStore(one, DAY), CampaignCounter(one))
        self.clusters = ClusterStore(two, DAY)
        self.counter = CampaignCounter(two)

    async def check(
        self,
        fp: Fingerprint,
        recipients: list[str],
        now: float,
        excused: list[bool] | None = None,
        rid: str = "",
    ) -> tuple[str, bool]:
        rid = rid or f"r{random.getrandbits(64):x}"
        campaign, got = await self.decider.assign_and_reserve(
            CUSTOMER, fp, recipients, now, params=PARAMS, excused=excused, reservation_id=rid
        )
        expected_campaign = await self.clusters.assign(CUSTOMER, fp, now)
        expected = await self.counter.reserve(
            CUSTOMER,
            expected_campaign,
            recipients,
            now,
            params=PARAMS,
            excused=excused,
            reservation_id=rid,
        )
        assert campaign == expected_campaign
        assert got == expected
        if got.reservation is not None:
            assert expected.reservation is not None
            commit = random.random() < 0.8
            one = await self.decider.counter.settle(got.reservation, commit=commit, now=now)
            two = await self.counter.settle(expected.reservation, commit=commit, now=now)
            assert one == two
            assert one in (SettleOutcome.COMMITTED, SettleOutcome.RELEASED)
        return campaign, got.allowed


@pytest.fixture
async def pair(redis_url: str) -> AsyncIterator[Pair]:
    one, two = RedisStore(redis_url, key_prefix="one"), RedisStore(redis_url, key_prefix="two")
    try:
        yield Pair(one, two)
    finally:
        await one.close()
        await two.close()


async def test_one_call_equals_two(pair: Pair) -> None:
    rcpts = [f"user{i}@example.org" for i in range(6)]
    campaigns = set()
    for k in range(40):
        fp = [sketch(1, k % 7), sketch(2, k % 5), exact(k % 3)][k % 3]
        chosen = random.Random(k).sample(rcpts, 1 + k % 4)
        campaign, _ = await pair.check(fp, chosen, NOW + k * 60, excused=[k % 2 == 0] * len(chosen))
        campaigns.add(campaign)
    assert len(campaigns) == 3  # near copies joined their campaign, the others founded one


async def test_the_campaign_keys_are_those_settle_uses(pair: Pair, redis_url: str) -> None:
    decider = pair.decider
    campaign, result = await decider.assign_and_reserve(
        CUSTOMER, sketch(9), ["bob@example.org"], NOW, params=PARAMS
    )
    assert result.reservation is not None
    assert result.reservation.campaign == campaign
    keys = CampaignKeys.of(decider.store, CUSTOMER, campaign)
    client = decider.store.client
    assert await client.exists(keys.resv, keys.held, keys.pend, keys.resx) == 4
    assert await decider.counter.commit(result.reservation, NOW) is SettleOutcome.COMMITTED
    assert await client.exists(keys.sent) == 1


async def test_a_replayed_call_counts_once(pair: Pair) -> None:
    decider = pair.decider
    calls = [
        decider.assign_and_reserve(
            CUSTOMER, exact(5), ["bob@example.org"], NOW, params=PARAMS, reservation_id="m1"
        )
        for _ in range(2)
    ]
    first, replay = [await c for c in calls]
    assert first == replay
    _, other = await decider.assign_and_reserve(
        CUSTOMER, exact(5), ["bob@example.org"], NOW, params=PARAMS, reservation_id="m2"
    )
    assert other.mailbomb_count == 2


async def test_errors_of_either_part_become_store_errors(pair: Pair) -> None:
    decider = pair.decider
    campaign, _ = await decider.assign_and_reserve(CUSTOMER, exact(7), ["a@example.org"], NOW)
    keys = CampaignKeys.of(decider.store, CUSTOMER, campaign)
    await decider.store.client.set(keys.sent, "not a sorted set")
    with pytest.raises(StoreError, match=r"campaign_decide failed: .*WRONGTYPE"):
        await decider.assign_and_reserve(CUSTOMER, exact(7), ["a@example.org"], NOW + 1)
    with pytest.raises(ValueError, match="one flag per recipient"):
        await decider.assign_and_reserve(
            CUSTOMER, exact(7), ["a@example.org"], NOW, excused=[True, True]
        )


async def test_concurrent_copies_get_exactly_the_threshold(redis_url: str) -> None:
    """50 copies of a new campaign over two stores ('gate processes'): one campaign, 20 sent."""
    stores = [RedisStore(redis_url), RedisStore(redis_url)]
    deciders = [CampaignDecider(ClusterStore(s, DAY), CampaignCounter(s)) for s in stores]

    async def message(i: int) -> tuple[str, bool]:
        decider = deciders[i % 2]
        campaign, result = await decider.assign_and_reserve(
            CUSTOMER, sketch(3, i % 20), [f"user{i}@example.org"], NOW
        )
        if result.reservation is None:
            assert [r.verdict for r in result.recipients] == [Verdict.BULK]
            return campaign, False
        await asyncio.sleep(0)
        assert await decider.counter.commit(result.reservation, NOW) is SettleOutcome.COMMITTED
        return campaign, True

    try:
        results = await asyncio.gather(*(message(i) for i in range(50)))
        assert len({c for c, _ in results}) == 1
        assert sum(ok for _, ok in results) == 20
    finally:
        for store in stores:
            await store.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.integers(0, 3),  # which fingerprint
            st.lists(st.integers(0, 5), min_size=1, max_size=4),  # recipients
            st.booleans(),  # excused
            st.sampled_from([0.0, 1.0, 5.0, 10.0, 3600.0]),  # time step
        ),
        min_size=1,
        max_size=15,
    )
)
def test_one_call_equals_two_for_any_sequence(
    redis_url: str, steps: list[tuple[int, list[int], bool, float]]
) -> None:
    async def run() -> None:
        one = RedisStore(redis_url, key_prefix="one")
        two = RedisStore(redis_url, key_prefix="two")
        try:
            await one.client.flushdb()
            pair = Pair(one, two)
            now = NOW
            fps = [sketch(1), sketch(1, 30), exact(1), sketch(2)]
            for which, picks, flag, dt in steps:
                now += dt
                recipients = [f"u{p}@example.org" for p in picks]
                await pair.check(fps[which], recipients, now, excused=[flag] * len(picks))
        finally:
            await one.close()
            await two.close()

    asyncio.run(run())
