"""Contract tests for ``CampaignCounter`` (bulk and mail-bomb counting) against a real redis-server.

Time is injected: no test sleeps to move a window.  A hypothesis state machine holds the Redis
implementation against ``Model``, a plain-Python statement of the same semantics.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import struct
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from mailguard.store.base import StoreError
from mailguard.store.counting import (
    CampaignCounter,
    CampaignKeys,
    CountingParams,
    RecipientResult,
    Reservation,
    ReserveResult,
    SettleOutcome,
    Verdict,
    recipient_key,
)
from mailguard.store.redis_store import RedisStore

NOW = 1_700_000_000.0
DAY = 86400.0
CUSTOMER = "acme"
CAMPAIGN = "3f9a0c"
DEFAULT = CountingParams()  # 20 recipients / 24h, 10 messages / 24h, reservations live 900 s


def rcpt(i: int) -> str:
    return f"user{i}@example.org"


@pytest.fixture
async def counter(redis_url: str) -> AsyncIterator[CampaignCounter]:
    store = RedisStore(redis_url)
    try:
        yield CampaignCounter(store)
    finally:
        await store.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def send(
    counter: CampaignCounter,
    recipients: Sequence[str],
    now: float = NOW,
    *,
    params: CountingParams = DEFAULT,
    excused: Sequence[bool] | None = None,
    campaign: str = CAMPAIGN,
) -> ReserveResult:
    """Reserve and, if allowed, commit at the same time (a message the upstream accepted)."""
    result = await counter.reserve(
        CUSTOMER, campaign, recipients, now, params=params, excused=excused
    )
    if result.reservation is not None:
        assert await counter.commit(result.reservation, now) is SettleOutcome.COMMITTED
    return result


def verdicts(result: ReserveResult) -> list[Verdict]:
    return [r.verdict for r in result.recipients]


# -- bulk ------------------------------------------------------------------------------------


async def test_twenty_pass_the_twenty_first_is_refused(counter: CampaignCounter) -> None:
    for i in range(1, 21):
        result = await send(counter, [rcpt(i)], NOW + i)
        assert result.allowed
        assert result.recipients[0] == RecipientResult(
            rcpt(i), recipient_key(rcpt(i)), Verdict.NEW, i, 1
        )
        assert result.distinct == i
        assert not result.bulk
    refused = await send(counter, [rcpt(21)], NOW + 21)
    assert not refused.allowed
    assert refused.reservation is None
    assert verdicts(refused) == [Verdict.BULK]
    assert refused.recipients[0].number == 21
    assert refused.distinct == 21  # "one of 21 substantively similar messages"
    assert refused.bulk
    assert refused.params.bulk_recipients == 20
    # Refusing did not count it: the next new recipient is number 21 again.
    again = await send(counter, [rcpt(22)], NOW + 22)
    assert (again.distinct, again.recipients[0].number) == (21, 21)


async def test_one_message_to_many_is_decided_as_a_whole(counter: CampaignCounter) -> None:
    result = await send(counter, [rcpt(i) for i in range(25)])
    assert not result.allowed
    assert verdicts(result) == [Verdict.NEW] * 20 + [Verdict.BULK] * 5
    assert [r.number for r in result.recipients] == list(range(1, 26))
    assert result.distinct == 25
    assert [r.recipient for r in result.refused] == [rcpt(i) for i in range(20, 25)]
    # Nothing was reserved: twenty of them still pass.
    assert (await send(counter, [rcpt(i) for i in range(20)])).allowed


async def test_already_counted_recipients_do_not_count_twice(counter: CampaignCounter) -> None:
    for i in range(20):
        assert (await send(counter, [rcpt(i)], NOW + i)).allowed
    for i in range(20):
        result = await send(counter, [rcpt(i).upper()], NOW + 100 + i)  # case does not matter
        assert verdicts(result) == [Verdict.SEEN]
        assert (result.distinct, result.recipients[0].number) == (20, 0)
    result = await send(counter, [rcpt(5), rcpt(20)], NOW + 200)
    assert verdicts(result) == [Verdict.SEEN, Verdict.BULK]
    assert result.distinct == 21


async def test_recipient_results_are_parsed_when_first_used(counter: CampaignCounter) -> None:
    """``plain`` and ``mailbomb_max`` come from the reply as it is; the parsed results agree."""
    params = CountingParams(bulk_recipients=3, mailbomb_messages=2)
    seen = []
    for k, recipients in enumerate(
        [[rcpt(1), rcpt(2)], [rcpt(2), rcpt(3)], [rcpt(1), rcpt(4)], [rcpt(2), rcpt(2)]]
    ):
        result = await send(counter, recipients, NOW + k, params=params)
        lazy = result.recipients
        summary = (lazy.plain, lazy.mailbomb_max, len(lazy), result.allowed)
        parsed = tuple(lazy)  # parses
        assert summary == (lazy.plain, lazy.mailbomb_max, len(parsed), result.allowed)
        assert lazy.plain == all(r.verdict in (Verdict.NEW, Verdict.SEEN) for r in parsed)
        assert lazy.mailbomb_max == max(r.mailbomb_count for r in parsed)
        assert lazy == parsed and lazy[0] == parsed[0] and lazy[:1] == parsed[:1]
        seen.append((verdicts(result), lazy.plain, lazy.mailbomb_max))
    assert seen == [
        ([Verdict.NEW, Verdict.NEW], True, 1),
        ([Verdict.SEEN, Verdict.NEW], True, 2),
        ([Verdict.SEEN, Verdict.BULK], False, 2),
        ([Verdict.MAILBOMB, Verdict.MAILBOMB], False, 3),
    ]


async def test_a_large_bulk_set_is_looked_up_by_score(counter: CampaignCounter) -> None:
    """Past 128 recipients sent to in the window the script counts and looks them up by score
    instead of reading them whole: the same verdicts and numbers."""
    params = CountingParams(bulk_recipients=300)
    for large in (False, True):
        campaign = f"set-{large}"
        first = 140 if large else 100
        result = await send(
            counter, [rcpt(i) for i in range(first)], NOW, params=params, campaign=campaign
        )
        assert result.distinct == first
        held = await counter.reserve(
            CUSTOMER, campaign, [rcpt(1000)], NOW + 1, params=params, reservation_id="h"
        )
        assert verdicts(held) == [Verdict.NEW] and held.recipients[0].number == first + 1
        result = await send(
            counter, [rcpt(5), rcpt(1000), rcpt(1001)], NOW + 2, params=params, campaign=campaign
        )
        assert verdicts(result) == [Verdict.SEEN, Verdict.SEEN, Verdict.NEW]
        assert [r.number for r in result.recipients] == [0, 0, first + 2]
        assert result.distinct == first + 2
        # The first message leaves the window; those sent to again later stay in the set.
        result = await send(
            counter, [rcpt(6), rcpt(1002)], NOW + DAY, params=params, campaign=campaign
        )
        assert verdicts(result) == [Verdict.NEW, Verdict.NEW]
        assert [r.number for r in result.recipients] == [4, 5]


async def test_one_recipient_twice_in_one_message_counts_once(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1)
    result = await send(counter, ["Bob@Example.org", " <bob@example.org> "], params=params)
    assert result.allowed
    assert verdicts(result) == [Verdict.NEW, Verdict.NEW]
    assert result.distinct == 1
    assert result.reservation is not None
    assert len(result.reservation.recipient_keys) == 1


async def test_bulk_window_expiry_frees_quota(counter: CampaignCounter) -> None:
    for i in range(20):
        assert (await send(counter, [rcpt(i)], NOW)).allowed
    assert not (await send(counter, [rcpt(20)], NOW + DAY - 0.001)).allowed
    # The window is (now - 24h, now]: sends exactly 24h old have left it.
    result = await send(counter, [rcpt(20)], NOW + DAY)
    assert verdicts(result) == [Verdict.NEW]
    assert result.distinct == 1


async def test_the_bulk_window_slides(counter: CampaignCounter) -> None:
    hour = 3600.0
    for i in range(20):  # one an hour
        assert (await send(counter, [rcpt(i)], NOW + i * hour)).allowed
    assert not (await send(counter, [rcpt(20)], NOW + DAY - 1)).allowed
    assert (await send(counter, [rcpt(20)], NOW + DAY)).allowed  # the first left the window
    assert not (await send(counter, [rcpt(21)], NOW + DAY + hour - 1)).allowed
    assert (await send(counter, [rcpt(21)], NOW + DAY + hour)).allowed


async def test_release_frees_quota(counter: CampaignCounter) -> None:
    reservations = []
    for i in range(20):
        result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(i)], NOW)
        assert result.reservation is not None
        reservations.append(result.reservation)
    assert not (await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(20)], NOW)).allowed
    assert await counter.release(reservations[3], NOW + 1) is SettleOutcome.RELEASED
    assert await counter.release(reservations[3], NOW + 1) is SettleOutcome.UNKNOWN  # idempotent
    result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(20)], NOW + 2)
    assert result.allowed
    assert result.recipients[0].number == 20
    # The released recipient is new again (retrying a deferred message costs nothing more).
    assert verdicts(await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(3)], NOW + 3)) == [Verdict.BULK]


async def test_commit_counts_and_settling_is_idempotent(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1)
    result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    assert result.reservation is not None
    assert await counter.commit(result.reservation, NOW + 1) is SettleOutcome.COMMITTED
    assert await counter.commit(result.reservation, NOW + 2) is SettleOutcome.UNKNOWN
    assert await counter.release(result.reservation, NOW + 2) is SettleOutcome.UNKNOWN
    # Still counted, long after the reservation's ttl: committed sends count for the window.
    later = NOW + 3 * DEFAULT.reservation_ttl
    again = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1), rcpt(2)], later, params=params)
    assert verdicts(again) == [Verdict.SEEN, Verdict.BULK]
    assert again.recipients[0].mailbomb_count == 2


async def test_a_send_counts_from_its_commit_time(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1, bulk_window=100.0, mailbomb_window=100.0)
    result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    assert result.reservation is not None
    await counter.commit(result.reservation, NOW + 50)
    assert not (
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(2)], NOW + 149, params=params)
    ).allowed
    assert (await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(2)], NOW + 150, params=params)).allowed


async def test_unsettled_reservations_expire(counter: CampaignCounter) -> None:
    ttl = DEFAULT.reservation_ttl
    reservations = []
    for i in range(20):
        result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(i)], NOW)
        assert result.reservation is not None
        assert result.reservation.expires_at == NOW + ttl
        reservations.append(result.reservation)
    assert not (await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(20)], NOW + ttl - 0.001)).allowed
    # A settle racing with the expiry: not settled in time, so it counts nothing.
    assert await counter.commit(reservations[0], NOW + ttl) is SettleOutcome.EXPIRED
    result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(20)], NOW + ttl)
    assert verdicts(result) == [Verdict.NEW]
    assert result.distinct == 1
    assert result.recipients[0].mailbomb_count == 1
    # The lazy purge removed the others; settling them now finds nothing.
    assert await counter.commit(reservations[1], NOW + ttl) is SettleOutcome.UNKNOWN
    assert (await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW + ttl)).distinct == 2


async def test_campaigns_and_customers_are_counted_separately(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1)
    assert (await send(counter, [rcpt(1)], params=params, campaign="a")).allowed
    assert (await send(counter, [rcpt(2)], params=params, campaign="b")).allowed
    assert not (await send(counter, [rcpt(3)], params=params, campaign="a")).allowed
    other = await counter.reserve("globex", "a", [rcpt(3)], NOW, params=params)
    assert other.allowed


# -- excused recipients (designated list server with confirmed opt-in) ------------------------


async def test_excused_recipients_pass_the_bulk_threshold(counter: CampaignCounter) -> None:
    recipients = [rcpt(i) for i in range(100)]
    result = await send(counter, recipients, excused=[True] * 100)
    assert result.allowed
    assert verdicts(result) == [Verdict.NEW] * 20 + [Verdict.EXCUSED] * 80
    assert result.distinct == 100
    assert result.bulk
    # One recipient without opt-in: the whole message is refused, for that recipient only.
    excused = [True] * 100 + [False]
    result = await send(counter, [*recipients, rcpt(100)], NOW + 1, excused=excused)
    assert not result.allowed
    assert [r.recipient for r in result.refused] == [rcpt(100)]
    assert result.refused[0].verdict is Verdict.BULK
    # Past-threshold recipients never join the set (bounded memory): they are new each time.
    assert verdicts(result)[:22] == [Verdict.SEEN] * 20 + [Verdict.EXCUSED] * 2


async def test_excused_recipients_are_not_excused_from_mail_bombing(
    counter: CampaignCounter,
) -> None:
    for k in range(10):
        result = await send(counter, [rcpt(1)], NOW + k, excused=[True])
        assert result.allowed
        assert result.recipients[0].mailbomb_count == k + 1
    result = await send(counter, [rcpt(1)], NOW + 10, excused=[True])
    assert verdicts(result) == [Verdict.MAILBOMB]
    assert result.mailbomb_count == 11


async def test_a_bulk_campaign_stays_bulk_while_it_keeps_sending(counter: CampaignCounter) -> None:
    """The documented approximation: the bulk mark outlives the set while commits refresh it."""
    params = CountingParams(bulk_recipients=2, bulk_window=100.0, mailbomb_window=100.0)
    assert (
        await send(counter, [rcpt(0), rcpt(1), rcpt(2)], excused=[True] * 3, params=params)
    ).bulk
    # 90 s later: rcpt(0..1) are still in the set; a new one is past the threshold anyway.
    result = await send(counter, [rcpt(3)], NOW + 90, excused=[True], params=params)
    assert verdicts(result) == [Verdict.EXCUSED]
    # 150 s: the set is empty, but the campaign sent 60 s ago, so it is still bulk.
    result = await send(counter, [rcpt(4)], NOW + 150, params=params)
    assert verdicts(result) == [Verdict.BULK]
    assert result.distinct == 3  # a lower bound: the threshold plus this one
    # Silent for a whole window after its last send: no longer bulk.
    result = await send(counter, [rcpt(4)], NOW + 190, params=params)
    assert verdicts(result) == [Verdict.NEW]
    assert not result.bulk


async def test_a_released_bulk_message_does_not_mark_the_campaign(
    counter: CampaignCounter,
) -> None:
    params = CountingParams(bulk_recipients=1)
    result = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(0), rcpt(1)], NOW, params=params, excused=[True, True]
    )
    assert result.reservation is not None
    await counter.release(result.reservation, NOW)
    assert verdicts(await send(counter, [rcpt(5)], params=params)) == [Verdict.NEW]


# -- mail bomb -------------------------------------------------------------------------------


async def test_mail_bomb_ten_pass_the_eleventh_is_refused(counter: CampaignCounter) -> None:
    hour = 3600.0
    for k in range(10):  # 10 copies, one an hour
        assert (await send(counter, [rcpt(1)], NOW + k * hour)).allowed
    result = await send(counter, [rcpt(1)], NOW + 10 * hour)
    assert verdicts(result) == [Verdict.MAILBOMB]
    assert result.recipients[0].mailbomb_count == 11
    assert not result.bulk
    # Any 24 hours, not a calendar day: the first copy leaves the window at exactly +24h.
    assert not (await send(counter, [rcpt(1)], NOW + DAY - 0.001)).allowed
    result = await send(counter, [rcpt(1)], NOW + DAY)
    assert result.allowed
    assert result.recipients[0].mailbomb_count == 10
    assert not (await send(counter, [rcpt(1)], NOW + DAY + hour - 0.001)).allowed
    assert (await send(counter, [rcpt(1)], NOW + DAY + hour)).allowed


async def test_mail_bomb_counts_live_reservations(counter: CampaignCounter) -> None:
    params = CountingParams(mailbomb_messages=2)
    first = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    second = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    assert first.reservation is not None
    assert second.reservation is not None
    third = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    assert verdicts(third) == [Verdict.MAILBOMB]
    assert third.mailbomb_count == 3
    await counter.release(second.reservation, NOW)
    third = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    assert third.allowed
    assert third.mailbomb_count == 2
    # An expired reservation no longer counts either.
    later = NOW + params.reservation_ttl
    assert (await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], later, params=params)).allowed


async def test_all_or_nothing(counter: CampaignCounter, raw: Redis) -> None:
    params = CountingParams(mailbomb_messages=1)
    assert (await send(counter, [rcpt(1)], params=params)).allowed
    before = sorted([k async for k in raw.scan_iter()])
    result = await send(counter, [rcpt(2), rcpt(1), rcpt(3)], NOW + 1, params=params)
    assert not result.allowed
    assert verdicts(result) == [Verdict.NEW, Verdict.MAILBOMB, Verdict.NEW]
    assert sorted([k async for k in raw.scan_iter()]) == before  # nothing written
    result = await send(counter, [rcpt(2), rcpt(3)], NOW + 1, params=params)
    assert [r.number for r in result.recipients] == [2, 3]


async def test_mail_bomb_wins_over_bulk_in_the_verdict(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1, mailbomb_messages=1)
    assert (await send(counter, [rcpt(1), rcpt(2)], params=params, excused=[False, True])).allowed
    result = await send(counter, [rcpt(2)], NOW + 1, params=params)
    assert verdicts(result) == [Verdict.MAILBOMB]  # and past the threshold too
    assert result.recipients[0].number == 2


# -- storage ---------------------------------------------------------------------------------


async def test_every_key_expires(counter: CampaignCounter, raw: Redis) -> None:
    params = CountingParams(bulk_recipients=2, bulk_window=3600.0, reservation_ttl=60.0)
    await send(counter, [rcpt(0), rcpt(1), rcpt(2)], params=params, excused=[True] * 3)
    pending = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(3), rcpt(0)], NOW, params=params, excused=[True, False]
    )
    assert pending.allowed
    released = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(4)], NOW, params=params, excused=[True]
    )
    assert released.reservation is not None
    await counter.release(released.reservation, NOW)
    await send(counter, [rcpt(9)], params=params, campaign="other")
    keys = [key.decode() async for key in raw.scan_iter()]
    kinds = {key.split(":")[-1] if ":mb:" not in key else "mb" for key in keys}
    assert kinds == {"sent", "held", "pend", "resv", "resx", "bulk_until", "mb"}
    limit = params.key_ttl * 1000
    assert params.key_ttl == DAY + 60
    for key in keys:
        assert 0 < await raw.pttl(key) <= limit, key
        assert key.startswith(f"mg:{{{CUSTOMER}}}:cust:camp:"), key


async def test_key_layout(counter: CampaignCounter, raw: Redis) -> None:
    result = await counter.reserve(CUSTOMER, "c:1", ["Bob@Example.ORG"], NOW)
    assert result.reservation is not None
    keys = CampaignKeys.of(counter.store, CUSTOMER, "c:1")
    assert keys.sent == "mg:{acme}:cust:camp:c%3A1:sent"
    mb = "mg:{acme}:cust:camp:c%3A1:mb:" + recipient_key("bob@example.org")
    assert keys.script_keys([recipient_key("bob@example.org")])[-1] == mb
    stored = sorted([key.decode() async for key in raw.scan_iter()])
    assert stored == sorted([keys.held, keys.pend, keys.resv, keys.resx])  # no log until a commit
    assert len(recipient_key("x" * 1000)) == 32
    assert not any("bob" in key.lower() for key in stored)  # no address is stored


async def test_a_replayed_reserve_counts_once(counter: CampaignCounter) -> None:
    params = CountingParams(bulk_recipients=1)
    first = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params, reservation_id="m1"
    )
    replay = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params, reservation_id="m1"
    )
    assert replay == first
    assert replay.recipients[0].mailbomb_count == 1
    other = await counter.reserve(
        CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params, reservation_id="m2"
    )
    assert verdicts(other) == [Verdict.SEEN]
    assert other.mailbomb_count == 2


async def test_redis_errors_become_store_errors(counter: CampaignCounter, raw: Redis) -> None:
    keys = CampaignKeys.of(counter.store, CUSTOMER, CAMPAIGN)
    await raw.set(keys.sent, "not a sorted set")
    with pytest.raises(StoreError, match=r"campaign_reserve failed: .*WRONGTYPE"):
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW)
    forged = Reservation(CUSTOMER, CAMPAIGN, "x", (recipient_key(rcpt(1)),), NOW)
    await raw.delete(keys.sent)
    result = await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(2)], NOW, reservation_id="x")
    assert result.allowed
    with pytest.raises(StoreError, match="recipients do not match"):
        await counter.commit(forged, NOW)


async def test_bad_arguments(counter: CampaignCounter) -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        await counter.reserve(CUSTOMER, CAMPAIGN, [], NOW)
    with pytest.raises(TypeError):
        await counter.reserve(CUSTOMER, CAMPAIGN, "bob@example.org", NOW)
    with pytest.raises(ValueError, match="one flag per recipient"):
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, excused=[True, False])
    with pytest.raises(ValueError, match="campaign"):
        await counter.reserve(CUSTOMER, "", [rcpt(1)], NOW)
    with pytest.raises(ValueError, match="customer"):
        await counter.reserve("", CAMPAIGN, [rcpt(1)], NOW)
    with pytest.raises(ValueError, match="now"):
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], float("nan"))
    with pytest.raises(ValueError, match="reservation id"):
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, reservation_id="")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bulk_recipients": -1},
        {"bulk_recipients": 1.5},
        {"mailbomb_messages": True},
        {"bulk_window": 0},
        {"mailbomb_window": float("inf")},
        {"reservation_ttl": -5.0},
    ],
)
def test_bad_params(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        CountingParams(**kwargs)  # type: ignore[arg-type]


# -- concurrency -----------------------------------------------------------------------------


@pytest.mark.parametrize("run", range(5))
async def test_concurrent_messages_get_exactly_the_threshold(redis_url: str, run: int) -> None:
    """50 connections over two 'gate processes' (two pools): exactly 20 accepted, every run."""
    stores = [RedisStore(redis_url), RedisStore(redis_url)]
    counters = [CampaignCounter(store) for store in stores]

    async def message(i: int) -> bool:
        counter = counters[i % 2]
        result = await counter.reserve(CUSTOMER, f"camp{run}", [rcpt(i)], NOW)
        if result.reservation is None:
            return False
        await asyncio.sleep(0)  # let the others interleave between reserve and commit
        assert await counter.commit(result.reservation, NOW) is SettleOutcome.COMMITTED
        return True

    try:
        accepted = await asyncio.gather(*(message(i) for i in range(50)))
        assert sum(accepted) == 20
        result = await counters[0].reserve(CUSTOMER, f"camp{run}", [rcpt(99)], NOW + 1)
        assert result.distinct == 21
    finally:
        for store in stores:
            await store.close()


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_cluster(cluster_url: str) -> None:
    store = RedisStore(cluster_url, timeout=10.0)
    counter = CampaignCounter(store)
    customer = f"c{uuid.uuid4().hex[:8]}"
    params = CountingParams(bulk_recipients=20, mailbomb_messages=2)
    try:

        async def message(i: int) -> bool:
            result = await counter.reserve(customer, CAMPAIGN, [rcpt(i)], NOW, params=params)
            if result.reservation is None:
                return False
            assert await counter.commit(result.reservation, NOW) is SettleOutcome.COMMITTED
            return True

        accepted = await asyncio.gather(*(message(i) for i in range(50)))
        assert sum(accepted) == 20
        many = [rcpt(i) for i in range(30)]
        result = await counter.reserve(
            customer, CAMPAIGN, many, NOW + 1, excused=[True] * 30, params=params
        )
        assert result.allowed
        assert result.reservation is not None
        assert await counter.commit(result.reservation, NOW + 1) is SettleOutcome.COMMITTED
        result = await counter.reserve(
            customer, CAMPAIGN, many, NOW + 2, excused=[True] * 30, params=params
        )
        assert not result.allowed
        bombed = [i for i, r in enumerate(result.recipients) if r.verdict is Verdict.MAILBOMB]
        assert bombed == [i for i in range(30) if accepted[i]]  # their third copy
        assert {r.verdict for r in result.refused} == {Verdict.MAILBOMB}
    finally:
        await store.close()


# -- the model -------------------------------------------------------------------------------


@dataclass
class ModelReservation:
    campaign: str
    recipients: list[str]  # distinct keys, in order
    counted: list[bool]  # in the bulk set (else past the threshold)
    reserved_at: float
    expires_at: float
    committed_at: float | None = None
    settled: bool = False


@dataclass
class Model:
    """The counting semantics stated over a plain list of reservations (no incremental state).

    Only ``bulk_until`` is kept incrementally, since it depends on the order of commits.
    """

    params: CountingParams
    reservations: dict[str, ModelReservation] = field(default_factory=dict)
    bulk_until: dict[str, float] = field(default_factory=dict)

    def live(self, res: ModelReservation, now: float) -> bool:
        return not res.settled and now < res.expires_at

    def bulk_set(self, campaign: str, now: float) -> set[str]:
        members: set[str] = set()
        for res in self.reservations.values():
            if res.campaign != campaign:
                continue
            sent = res.committed_at is not None and res.committed_at > now - self.params.bulk_window
            if sent or self.live(res, now):
                members.update(r for r, c in zip(res.recipients, res.counted, strict=True) if c)
        return members

    def mailbomb_count(self, campaign: str, recipient: str, now: float) -> int:
        cutoff = now - self.params.mailbomb_window
        return sum(
            1
            for res in self.reservations.values()
            if res.campaign == campaign
            and recipient in res.recipients
            and (
                (res.committed_at is not None and res.committed_at > cutoff)
                or self.live(res, now)  # a live reservation counts, however old
            )
        )

    def reserve(
        self, campaign: str, recipients: list[str], excused: list[bool], now: float, rid: str
    ) -> tuple[bool, int, bool, list[tuple[Verdict, int, int]]]:
        p = self.params
        members = self.bulk_set(campaign, now)
        marked = now < self.bulk_until.get(campaign, -1.0)
        unique: dict[str, bool] = {}
        for r, e in zip(recipients, excused, strict=True):
            key = recipient_key(r)
            unique[key] = unique.get(key, False) or e
        new = past = 0
        decided: dict[str, tuple[Verdict, int, int]] = {}
        counted = []
        for key, exc in unique.items():
            if key in members:
                verdict, number = Verdict.SEEN, 0
            elif not marked and len(members) + new < p.bulk_recipients:
                new += 1
                verdict, number = Verdict.NEW, len(members) + new
            else:
                past += 1
                number = max(len(members) + new, p.bulk_recipients) + past
                verdict = Verdict.EXCUSED if exc else Verdict.BULK
            counted.append(verdict in (Verdict.NEW, Verdict.SEEN))
            mb = self.mailbomb_count(campaign, key, now) + 1
            if mb > p.mailbomb_messages:
                verdict = Verdict.MAILBOMB
            decided[key] = (verdict, number, mb)
        allowed = all(v.allowed for v, _, _ in decided.values())
        distinct = len(members) + new
        if past:
            distinct = max(distinct, p.bulk_recipients) + past
        if allowed:
            self.reservations[rid] = ModelReservation(
                campaign, list(unique), counted, now, now + p.reservation_ttl
            )
        results = [decided[recipient_key(r)] for r in recipients]
        return allowed, distinct, marked or past > 0, results

    def settle(self, rid: str, commit: bool, now: float) -> set[SettleOutcome]:
        """The outcomes the store may answer (an expired one may already have been purged)."""
        res = self.reservations[rid]
        if res.settled:
            return {SettleOutcome.UNKNOWN}
        res.settled = True
        if not now < res.expires_at:
            return {SettleOutcome.EXPIRED, SettleOutcome.UNKNOWN}
        if not commit:
            return {SettleOutcome.RELEASED}  # settled, never committed: as if it never was
        res.committed_at = now
        until = self.bulk_until.get(res.campaign, -1.0)
        if not all(res.counted) or now < until:
            self.bulk_until[res.campaign] = max(until, now + self.params.bulk_window)
        return {SettleOutcome.COMMITTED}


MODEL_PARAMS = CountingParams(
    bulk_recipients=3,
    bulk_window=100.0,
    mailbomb_messages=2,
    mailbomb_window=50.0,
    reservation_ttl=10.0,
)
POOL = ["a@x.example", "B@x.example", "c@x.example", "d@y.example", "e@y.example", "f@y.example"]


class CountingMachine(RuleBasedStateMachine):
    reservations = Bundle("reservations")

    def __init__(self, runner: asyncio.Runner, counter: CampaignCounter) -> None:
        super().__init__()
        self.runner = runner
        self.counter = counter
        self.customer = uuid.uuid4().hex  # a fresh customer: no flushing between examples
        self.model = Model(MODEL_PARAMS)
        self.now = NOW

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 9.999, 10.0, 25.0, 49.0, 50.0, 99.0, 100.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @rule(
        target=reservations,
        campaign=st.sampled_from(["one", "two"]),
        picks=st.lists(
            st.tuples(st.sampled_from(POOL), st.booleans(), st.booleans()), min_size=1, max_size=4
        ),
    )
    def reserve(self, campaign: str, picks: list[tuple[str, bool, bool]]) -> Reservation | None:
        recipients = [r.upper() if shout else r for r, shout, _ in picks]
        excused = [e for _, _, e in picks]
        rid = uuid.uuid4().hex
        result = self.runner.run(
            self.counter.reserve(
                self.customer,
                campaign,
                recipients,
                self.now,
                params=MODEL_PARAMS,
                excused=excused,
                reservation_id=rid,
            )
        )
        allowed, distinct, bulk, expected = self.model.reserve(
            campaign, recipients, excused, self.now, rid
        )
        got = [(r.verdict, r.number, r.mailbomb_count) for r in result.recipients]
        assert got == expected
        assert (result.allowed, result.distinct, result.bulk) == (allowed, distinct, bulk)
        return result.reservation

    @rule(reservation=reservations, commit=st.booleans())
    def settle(self, reservation: Reservation | None, commit: bool) -> None:
        if reservation is None:
            return
        outcome = self.runner.run(self.counter.settle(reservation, commit=commit, now=self.now))
        assert outcome in self.model.settle(reservation.id, commit, self.now)

    def teardown(self) -> None:
        """Every key of this machine's customer expires; then drop them (keep the db small)."""

        async def check_and_drop() -> None:
            keys: list[str] = []
            for campaign in ("one", "two"):
                layout = CampaignKeys.of(self.counter.store, self.customer, campaign)
                keys += layout.script_keys([recipient_key(r) for r in POOL])
            client = self.counter.store.client
            ttls = [await client.pttl(key) for key in keys]
            await client.delete(*keys)
            assert all(ttl == -2 or 0 < ttl <= MODEL_PARAMS.key_ttl * 1000 for ttl in ttls)
            # The layout above is right: a recent send is still in its recipient's log.
            cutoff = self.now - MODEL_PARAMS.mailbomb_window
            sent = [r.committed_at for r in self.model.reservations.values() if r.committed_at]
            assert any(ttl != -2 for ttl in ttls) or not any(t > cutoff for t in sent)

        self.runner.run(check_and_drop())


@pytest.fixture
def runner_counter(redis_url: str) -> Iterator[tuple[asyncio.Runner, CampaignCounter]]:
    with asyncio.Runner() as runner:
        store = RedisStore(redis_url)
        try:
            yield runner, CampaignCounter(store)
        finally:
            runner.run(store.close())


def test_redis_matches_the_model(runner_counter: tuple[asyncio.Runner, CampaignCounter]) -> None:
    runner, counter = runner_counter

    class Machine(CountingMachine):
        def __init__(self) -> None:
            super().__init__(runner, counter)

    run_state_machine_as_test(
        Machine,
        settings=settings(max_examples=150, stateful_step_count=30, deadline=None),
    )


async def test_cluster_sequential(cluster_url: str) -> None:
    """The scripts on a real 3-node Redis Cluster: all keys of a customer in one slot."""
    store = RedisStore(cluster_url, timeout=5.0)
    counter = CampaignCounter(store)
    customer = f"s{uuid.uuid4().hex[:8]}"
    try:
        allowed = []
        for i in range(21):
            result = await counter.reserve(customer, CAMPAIGN, [rcpt(i)], NOW)
            allowed.append(result.allowed)
            if result.reservation is not None:
                assert await counter.commit(result.reservation, NOW) is SettleOutcome.COMMITTED
        assert allowed == [True] * 20 + [False]
    finally:
        await store.close()


# -- Reservation records written before the compact form (an upgrade in place) ----------------


def as_json_record(compact: bytes) -> bytes:
    """The JSON record the scripts wrote before the compact form, for the same reservation."""
    assert compact[0] == 2
    expiry, bulk_window, mb_window, length, xlen, n = struct.unpack_from(">dddBBH", compact, 1)
    at = 1 + struct.calcsize(">dddBBH")
    ttl_ms = compact[at : at + xlen].decode()
    at += xlen
    hashes = [compact[at + i * length : at + (i + 1) * length].decode() for i in range(n)]
    at += n * length
    kinds = [1 if c == ord("1") else 0 for c in compact[at : at + n]]
    at += n
    result = [int(v) for v in struct.unpack_from(f">{3 + 3 * n}d", compact, at)]
    record = {
        "e": f"{expiry:.17g}",
        "h": hashes,
        "k": kinds,
        "w": f"{bulk_window:.17g}",
        "m": f"{mb_window:.17g}",
        "x": ttl_ms,
        "r": result,
    }
    return json.dumps(record).encode()


async def to_json_records(counter: CampaignCounter, raw: Redis, campaign: str) -> int:
    """Rewrite every reservation record of ``campaign`` in the JSON form."""
    keys = CampaignKeys.of(counter.store, CUSTOMER, campaign)
    records = await raw.hgetall(keys.resv)
    for rid, value in records.items():
        await raw.hset(keys.resv, rid, as_json_record(value))
    return len(records)


async def campaign_state(counter: CampaignCounter, raw: Redis, campaign: str) -> dict[str, object]:
    keys = CampaignKeys.of(counter.store, CUSTOMER, campaign)
    state: dict[str, object] = {
        "sent": await raw.zrange(keys.sent, 0, -1, withscores=True),
        "held": await raw.hgetall(keys.held),
        "pend": await raw.hgetall(keys.pend),
        "resx": await raw.zrange(keys.resx, 0, -1, withscores=True),
        "resv": sorted(await raw.hkeys(keys.resv)),
        "bulk_until": await raw.get(keys.bulk_until),
    }
    for i in range(6):
        log = keys.mailbomb_prefix + recipient_key(rcpt(i))
        state[f"mb{i}"] = await raw.zrange(log, 0, -1, withscores=True)
    return state


async def test_reservations_recorded_as_json_are_settled_replayed_and_purged(
    counter: CampaignCounter, raw: Redis
) -> None:
    """Reservations made before the compact record (JSON) count exactly like new ones."""
    params = CountingParams(bulk_recipients=2, mailbomb_messages=3, reservation_ttl=60.0)
    outcomes: dict[str, list[object]] = {}
    for campaign, convert in (("native", False), ("json", True)):
        seen: list[object] = []
        rcpts = [rcpt(0), rcpt(1), rcpt(2)]
        first = await counter.reserve(
            CUSTOMER,
            campaign,
            rcpts,
            NOW,
            params=params,
            excused=[False, False, True],
            reservation_id="a",
        )
        second = await counter.reserve(
            CUSTOMER,
            campaign,
            [rcpt(3)],
            NOW + 1,
            params=params,
            excused=[True],
            reservation_id="b",
        )
        third = await counter.reserve(
            CUSTOMER,
            campaign,
            [rcpt(4), rcpt(0)],
            NOW + 2,
            params=params,
            excused=[True, True],
            reservation_id="c",
        )
        assert first.reservation and second.reservation and third.reservation
        if convert:
            assert await to_json_records(counter, raw, campaign) == 3
        keys = CampaignKeys.of(counter.store, CUSTOMER, campaign)
        assert (await raw.hget(keys.resv, "a"))[:1] == (b"{" if convert else b"\x02")
        replay = await counter.reserve(
            CUSTOMER,
            campaign,
            rcpts,
            NOW + 3,
            params=params,
            excused=[False, False, True],
            reservation_id="a",
        )
        assert replay.reservation is not None  # the first answer again, nothing counted twice
        assert (replay.recipients, replay.distinct, replay.bulk) == (
            first.recipients,
            first.distinct,
            first.bulk,
        )
        forged = Reservation(CUSTOMER, campaign, "a", first.reservation.recipient_keys[:2], NOW)
        with pytest.raises(StoreError, match="recipients do not match"):
            await counter.commit(forged, NOW + 3)
        seen.append(await counter.commit(first.reservation, NOW + 3))
        seen.append(await counter.release(third.reservation, NOW + 4))
        seen.append(await campaign_state(counter, raw, campaign))
        # "b" expires unsettled: the next reserve purges it.
        later = await counter.reserve(
            CUSTOMER,
            campaign,
            [rcpt(5), rcpt(1)],
            NOW + 70,
            params=params,
            excused=[True, False],
            reservation_id="d",
        )
        seen.append(later)
        seen.append(await campaign_state(counter, raw, campaign))
        assert later.reservation is not None
        seen.append(await counter.commit(second.reservation, NOW + 71))
        seen.append(await counter.commit(later.reservation, NOW + 71))
        seen.append(await campaign_state(counter, raw, campaign))
        outcomes[campaign] = [
            replace_campaign(x, campaign) if isinstance(x, ReserveResult) else x for x in seen
        ]
    assert outcomes["json"] == outcomes["native"]
    assert outcomes["native"][0] == SettleOutcome.COMMITTED
    assert outcomes["native"][1] == SettleOutcome.RELEASED
    assert outcomes["native"][5] == SettleOutcome.UNKNOWN  # expired and purged


def replace_campaign(result: ReserveResult, campaign: str) -> ReserveResult:
    """``result`` with its reservation's campaign blanked, to compare two campaigns."""
    if result.reservation is None:
        return result
    return dataclasses.replace(
        result, reservation=dataclasses.replace(result.reservation, campaign="")
    )


async def test_recipient_hashes_of_different_lengths_are_recorded_as_json(
    counter: CampaignCounter, raw: Redis
) -> None:
    """The compact record needs hashes of one length; others (not from this module) get JSON."""
    keys = CampaignKeys.of(counter.store, CUSTOMER, CAMPAIGN)
    hashes = ["h1", "hash-2"]
    args = [repr(NOW), "r1", "20", repr(DAY), "10", repr(DAY), "900.0", "0"]
    args += [hashes[0], "0", hashes[1], "0"]
    raw_result = await counter.store.run(
        "x", lambda: counter._reserve(keys=keys.script_keys(hashes), args=args)
    )
    assert [int(v) for v in raw_result] == [1, 2, 0, 1, 1, 1, 1, 2, 1]
    assert (await raw.hget(keys.resv, "r1"))[:1] == b"{"
    replay = await counter.store.run(
        "x", lambda: counter._reserve(keys=keys.script_keys(hashes), args=args)
    )
    assert replay == raw_result
    reservation = Reservation(CUSTOMER, CAMPAIGN, "r1", tuple(hashes), NOW + 900)
    assert await counter.commit(reservation, NOW + 1) == SettleOutcome.COMMITTED
    assert await raw.zrange(keys.sent, 0, -1) == [b"h1", b"hash-2"]
    assert await raw.exists(keys.held, keys.pend, keys.resv, keys.resx) == 0


async def test_cached_campaign_keys_equal_the_escaped_ones(counter: CampaignCounter) -> None:
    from mailguard.store.counting import _CampaignPrefixes

    prefixes = _CampaignPrefixes(counter.store)
    for customer in ("acme", "a:{b}%c d", "é"):
        for campaign in ("0123456789abcdef", "c:1", "0123456789ABCDEF", "0123456789abcdef0"):
            expected = CampaignKeys.of(counter.store, customer, campaign)
            assert prefixes.keys(customer, campaign) == expected
            assert prefixes.keys(customer, campaign) == expected  # cached
    with pytest.raises(ValueError, match="campaign"):
        prefixes.keys("acme", "")
    with pytest.raises(ValueError, match="customer"):
        prefixes.keys("", "0123456789abcdef")


async def test_a_huge_key_ttl_is_recorded_as_json(counter: CampaignCounter, raw: Redis) -> None:
    """The compact record keeps the key ttl's text in at most 255 bytes; a longer one (absurd
    windows) falls back to JSON, and the reservation still settles."""
    params = CountingParams(bulk_window=1e260, mailbomb_window=1.0, reservation_ttl=60.0)
    keys = CampaignKeys.of(counter.store, CUSTOMER, CAMPAIGN)
    with pytest.raises(StoreError):  # Redis refuses to set such an expiry
        await counter.reserve(CUSTOMER, CAMPAIGN, [rcpt(1)], NOW, params=params)
    record = await raw.hget(keys.resv, next(iter(await raw.hkeys(keys.resv))))
    assert record[:1] == b"{"
