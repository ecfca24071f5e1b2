"""Mail-bomb holds (``store.holds``, ``lua/mailbomb_hold.lua``) against a real redis-server, and
the monitored-rules flag of the reserve script: a message refused only by a monitored rule is
reserved, and counted when committed (monitor counts what was sent)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis.asyncio import Redis

from mailguard.store.counting import (
    CampaignCounter,
    CountingParams,
    SettleOutcome,
    Verdict,
)
from mailguard.store.holds import NONE_CACHE, MailbombHolds, parse_hold
from mailguard.store.redis_store import RedisStore

NOW = 1_700_000_000.0
DAY = 86400.0
CAMPAIGN = "3f9a0c"
SENDER = "News@Acme.example"
VICTIM = "victim@example.org"
PARAMS = CountingParams(bulk_recipients=20, mailbomb_messages=10)


def customer() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


async def commit(
    counter: CampaignCounter,
    cust: str,
    rcpts: list[str],
    now: float,
    params: CountingParams = PARAMS,
    monitored: tuple[bool, bool] = (False, False),
) -> list[Verdict]:
    result = await counter.reserve(cust, CAMPAIGN, rcpts, now, params=params, monitored=monitored)
    if result.reservation is not None:
        assert await counter.commit(result.reservation, now) is SettleOutcome.COMMITTED
    return [r.verdict for r in result.recipients]


async def hold(holds: MailbombHolds, cust: str, now: float, count: int = 11) -> float | None:
    [end] = await holds.hold(
        cust,
        SENDER,
        CAMPAIGN,
        [(VICTIM, count)],
        now,
        hold=600.0,
        mailbomb_messages=10,
        mailbomb_window=DAY,
    )
    return end


async def test_hold_lasts_at_most_the_configured_time(store: RedisStore) -> None:
    counter, holds, cust = CampaignCounter(store), MailbombHolds(store), customer()
    for i in range(10):
        await commit(counter, cust, [VICTIM], NOW + i)
    assert await commit(counter, cust, [VICTIM], NOW + 20) == [Verdict.MAILBOMB]
    assert await hold(holds, cust, NOW + 20) == NOW + 20 + 600
    [found] = await holds.read(cust, "news@acme.EXAMPLE", [f"<{VICTIM.upper()}>"])
    assert found is not None
    assert (found.campaign, found.count, found.threshold) == (CAMPAIGN, 11, 10)
    assert (found.window, found.until) == (DAY, NOW + 620)
    # Another sender, or another recipient, has no hold.
    assert await holds.read(cust, "other@acme.example", [VICTIM]) == [None]
    assert await holds.read(cust, SENDER, ["someone@example.org", VICTIM]) == [None, found]
    ttl = await store.client.pttl(holds.key(cust, SENDER, VICTIM))
    assert 599_000 < ttl <= 600_000


async def test_hold_ends_when_a_copy_would_be_accepted_again(store: RedisStore) -> None:
    """Refused 23h59m50s after the first of ten sends: a copy is accepted again 10 s later, so
    the hold ends then, not 10 minutes later."""
    counter, holds, cust = CampaignCounter(store), MailbombHolds(store), customer()
    for i in range(10):
        await commit(counter, cust, [VICTIM], NOW + i * 3600)
    late = NOW + DAY - 10
    assert await commit(counter, cust, [VICTIM], late) == [Verdict.MAILBOMB]
    assert await hold(holds, cust, late) == NOW + DAY
    # ... and indeed: at NOW + DAY the first send has left the window.
    assert await commit(counter, cust, [VICTIM], NOW + DAY) == [Verdict.SEEN]
    assert await commit(counter, cust, [VICTIM], NOW + DAY + 1) == [Verdict.MAILBOMB]


async def test_no_hold_when_only_live_reservations_made_the_count(store: RedisStore) -> None:
    """Refused because of reservations still in flight (they may be released): nothing known
    for sure about the next copy, so nothing is held."""
    counter, holds, cust = CampaignCounter(store), MailbombHolds(store), customer()
    for i in range(10):
        result = await counter.reserve(cust, CAMPAIGN, [VICTIM], NOW + i, params=PARAMS)
        assert result.reservation is not None  # held, never committed
    assert await hold(holds, cust, NOW + 20) is None
    assert await holds.read(cust, SENDER, [VICTIM]) == [None]


async def test_a_later_refusal_replaces_the_hold(store: RedisStore) -> None:
    counter, holds, cust = CampaignCounter(store), MailbombHolds(store), customer()
    for i in range(10):
        await commit(counter, cust, [VICTIM], NOW + i)
    assert await hold(holds, cust, NOW + 20) == NOW + 620
    assert await hold(holds, cust, NOW + 700, count=12) == NOW + 1300
    [found] = await holds.read(cust, SENDER, [VICTIM])
    assert found is not None and (found.count, found.until) == (12, NOW + 1300)


async def test_hold_arguments_checked(store: RedisStore) -> None:
    holds = MailbombHolds(store)
    assert await holds.hold("acme", SENDER, CAMPAIGN, [], NOW, hold=1, mailbomb_messages=1,
                            mailbomb_window=1) == ()  # fmt: skip
    with pytest.raises(ValueError, match="hold must be positive"):
        await holds.hold("acme", SENDER, CAMPAIGN, [(VICTIM, 2)], NOW, hold=0,
                         mailbomb_messages=1, mailbomb_window=1)  # fmt: skip


def test_parse_hold_ignores_what_it_cannot_read() -> None:
    assert parse_hold(None) is None
    assert parse_hold(b"not json") is None
    assert parse_hold(b'{"c": "x"}') is None
    found = parse_hold(b'{"c":"x","n":11,"t":10,"w":86400,"u":1.5,"a":1}')
    assert found is not None and found.until == 1.5 and found.window == 86400.0


async def test_store_failure_raises_store_error(redis_url: str) -> None:
    from mailguard.store.base import StoreError

    store = RedisStore(redis_url)
    await store.close()
    with pytest.raises(StoreError):
        await MailbombHolds(store).read("acme", SENDER, [VICTIM])


# -- monitored rules: reserved and counted although refused -----------------------------------


async def test_monitored_mailbomb_is_reserved_and_counted(store: RedisStore) -> None:
    counter, cust = CampaignCounter(store), customer()
    for i in range(10):
        await commit(counter, cust, [VICTIM], NOW + i)
    for n in (11, 12, 13):
        result = await counter.reserve(
            cust, CAMPAIGN, [VICTIM], NOW + n, params=PARAMS, monitored=(False, True)
        )
        assert [r.verdict for r in result.recipients] == [Verdict.MAILBOMB]
        assert result.recipients[0].mailbomb_count == n
        assert not result.allowed and result.reservation is not None
        assert await counter.commit(result.reservation, NOW + n) is SettleOutcome.COMMITTED
    # Not monitored (or a bulk-only monitor): refused and not reserved.
    for flags in ((False, False), (True, False)):
        result = await counter.reserve(
            cust, CAMPAIGN, [VICTIM], NOW + 20, params=PARAMS, monitored=flags
        )
        assert result.reservation is None and result.recipients[0].mailbomb_count == 14


async def test_monitored_bulk_is_reserved_and_marks_the_campaign_bulk(
    store: RedisStore,
) -> None:
    counter, cust = CampaignCounter(store), customer()
    for i in range(20):
        assert await commit(counter, cust, [f"u{i}@example.org"], NOW) == [Verdict.NEW]
    result = await counter.reserve(
        cust, CAMPAIGN, ["late@example.org"], NOW + 1, params=PARAMS, monitored=(True, False)
    )
    [late] = result.recipients
    assert late.verdict is Verdict.BULK and late.past and result.reservation is not None
    assert await counter.commit(result.reservation, NOW + 1) is SettleOutcome.COMMITTED
    raw: Redis = store.client  # type: ignore[assignment]
    keys = [k async for k in raw.scan_iter(match=f"*{{{cust}}}*bulk_until")]
    assert len(keys) == 1 and float(await raw.get(keys[0])) == NOW + 1 + DAY


async def test_a_monitored_mailbomb_does_not_reserve_an_enforced_bulk_refusal(
    store: RedisStore,
) -> None:
    """One recipient bombed (monitored), another past the bulk threshold (enforced): not
    reserved, and the bombed one, past the threshold too, reports ``past``."""
    counter, cust = CampaignCounter(store), customer()
    params = CountingParams(bulk_recipients=1, mailbomb_messages=1)
    assert await commit(counter, cust, [VICTIM], NOW, params) == [Verdict.NEW]
    result = await counter.reserve(
        cust, CAMPAIGN, [VICTIM, "new@example.org"], NOW + 1, params=params,
        monitored=(False, True),
    )  # fmt: skip
    assert [r.verdict for r in result.recipients] == [Verdict.MAILBOMB, Verdict.BULK]
    assert [r.past for r in result.recipients] == [False, True]
    assert result.reservation is None
    result = await counter.reserve(
        cust, CAMPAIGN, [VICTIM, "new@example.org"], NOW + 1, params=params,
        monitored=(True, True),
    )  # fmt: skip
    assert result.reservation is not None


async def test_holds_on_cluster(cluster_url: str) -> None:
    store = RedisStore(cluster_url, timeout=10.0)
    counter, holds, cust = CampaignCounter(store), MailbombHolds(store), customer()
    try:
        for i in range(10):
            await commit(counter, cust, [VICTIM], NOW + i)
        assert await hold(holds, cust, NOW + 20) == NOW + 620
        found = await holds.read(cust, SENDER, [VICTIM, "other@example.org"])
        assert found[0] is not None and found[0].until == NOW + 620 and found[1] is None
    finally:
        await store.close()


async def test_no_holds_is_remembered_briefly_and_a_local_hold_clears_it(
    store: RedisStore, redis_url: str
) -> None:
    """``mbhold:any``: a customer without holds costs no read for ``NONE_CACHE`` seconds; a
    hold written here is seen at once, one written by another process within that time."""
    clock = [100.0]
    counter, cust = CampaignCounter(store), customer()
    here = MailbombHolds(store, monotonic=lambda: clock[0])
    other_store = RedisStore(redis_url, timeout=2.0)
    try:
        there = MailbombHolds(other_store, monotonic=lambda: clock[0])
        assert await here.read(cust, SENDER, [VICTIM]) == [None]
        assert here.none_cached(cust)
        for i in range(10):
            await commit(counter, cust, [VICTIM], NOW + i)
        assert await commit(counter, cust, [VICTIM], NOW + 20) == [Verdict.MAILBOMB]
        assert await hold(there, cust, NOW + 20) is not None  # another process holds
        assert await here.read(cust, SENDER, [VICTIM]) == [None]  # not seen yet: cached
        clock[0] += NONE_CACHE
        [found] = await here.read(cust, SENDER, [VICTIM])
        assert found is not None and not here.none_cached(cust)
        # Written here: the cache of the other store's customer is cleared at once.
        assert await there.read(customer(), SENDER, [VICTIM]) == [None]
        other = customer()
        assert await there.read(other, SENDER, [VICTIM]) == [None] and there.none_cached(other)
        for i in range(10):
            await commit(counter, other, [VICTIM], NOW + i)
        assert await commit(counter, other, [VICTIM], NOW + 20) == [Verdict.MAILBOMB]
        assert await hold(there, other, NOW + 20) is not None
        assert not there.none_cached(other)
        assert (await there.read(other, SENDER, [VICTIM]))[0] is not None
        # The marker lives as long as the longest hold.
        ttl = await store.client.pttl(here.any_key(other))
        assert 599_000 < ttl <= 600_000
    finally:
        await other_store.close()


async def test_no_holds_costs_one_mget_per_cache_period(store: RedisStore, redis_url: str) -> None:
    """Counted on the server (INFO commandstats): reads of a customer without holds issue one
    MGET, then none until ``NONE_CACHE`` has passed."""
    clock = [100.0]
    holds, cust = MailbombHolds(store, monotonic=lambda: clock[0]), customer()
    raw = Redis.from_url(redis_url)
    try:
        await raw.config_resetstat()
        for _ in range(50):
            assert await holds.read(cust, SENDER, [VICTIM, "b@example.org"]) == [None, None]
            clock[0] += NONE_CACHE / 100
        assert (await raw.info("commandstats"))["cmdstat_mget"]["calls"] == 1
        clock[0] += NONE_CACHE
        assert await holds.read(cust, SENDER, [VICTIM]) == [None]
        assert (await raw.info("commandstats"))["cmdstat_mget"]["calls"] == 2
    finally:
        await raw.aclose()


@pytest.mark.parametrize("reloaded", [False, True], ids=["same", "after-reload"])
async def test_a_read_concurrent_with_a_local_hold_is_not_remembered(
    store: RedisStore, reloaded: bool
) -> None:
    """Redis may run a read before a concurrent hold write of the same process (here: both in
    one pipelined batch, the read first): its "no holds" must not be remembered.  Also when the
    read is made by another ``MailbombHolds`` on the same store (a reload builds a new enforcer):
    the state belongs to the store, so the write's end clears the new one's cache too."""
    counter, writer, cust = CampaignCounter(store), MailbombHolds(store), customer()
    reader = MailbombHolds(store) if reloaded else writer
    for i in range(10):
        await commit(counter, cust, [VICTIM], NOW + i)
    read = asyncio.create_task(reader.read(cust, SENDER, [VICTIM]))
    await asyncio.sleep(0)  # the read's MGET is queued first
    assert await hold(writer, cust, NOW + 20) is not None
    assert await read == [None]  # ran before the hold
    assert not reader.none_cached(cust)
    [found] = await reader.read(cust, SENDER, [VICTIM])
    assert found is not None
