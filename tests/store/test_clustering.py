"""Contract tests for ``ClusterStore`` (online clustering in the store) against a real redis-server.

Time is injected: no test sleeps to move a window.  A hypothesis state machine holds the Lua
implementation against ``ClusterIndex``, the normative in-memory model: the same sequence of
(fingerprint, now) must give the same ids and the same alive clusters.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from mailguard.core.fingerprint.cluster import ClusterIndex
from mailguard.core.fingerprint.sketch import (
    LANES,
    SIMILARITY_THRESHOLD,
    Fingerprint,
    band_keys,
    fingerprint,
    new_cluster_id,
    similarity,
)
from mailguard.store.base import StoreError
from mailguard.store.clustering import ClusterKeys, ClusterStore, bucket_field, lanes_needed
from mailguard.store.redis_store import RedisStore
from tests.conftest import RedisServer

NOW = 1_700_000_000.25
DAY = 86400.0
CUSTOMER = "acme"

# -- messages --------------------------------------------------------------------------------

NAMES = [
    "Alice Walker", "Bob Jones", "Carol Nguyen", "Dmitri Petrov", "Eve Adams", "Farid Haddad",
    "Grace Kim", "Hector Alvarez", "Ingrid Berg", "Jamal Wright", "Keiko Sato", "Liam Murphy",
]  # fmt: skip

CAMPAIGNS = [
    "Thank you for being a loyal customer. This spring we are opening our new garden centre "
    "on the corner of Mill Street, with seedlings, fruit trees and tools for every season. "
    "Come to the opening weekend for free coffee, a workshop on pruning roses and a raffle "
    "with prizes from local growers. Bring this letter to receive a discount on your first "
    "purchase. We look forward to welcoming you and your family to the shop.",
    "Our annual report on river water quality is now available. Volunteers sampled forty "
    "sites between March and October and measured nitrate, phosphate and dissolved oxygen. "
    "Most upstream sites improved compared with last year, while two sites below the "
    "treatment works still show high nutrient levels after heavy rain. The report explains "
    "the methods, the results for each site and what the council has promised to do next.",
    "The chess club meets again after the summer break. Beginners are welcome on Tuesday "
    "evenings, when two of our coaches explain openings, simple endgames and how to record a "
    "game. On Thursdays we play rated games for the winter league. Membership includes "
    "access to the library of chess books and the club's boards and clocks for home games.",
]
UNRELATED = [
    "Hi, can we move our meeting about the kitchen renovation to Friday afternoon? The "
    "builder needs another day to confirm the price of the tiles and the new sink.",
    "Attached are the minutes of the parents association. We agreed to organise a book sale "
    "in November and to ask the school for a second bicycle shed near the gym entrance.",
    "The server room air conditioning failed overnight; facilities replaced a fan and the "
    "temperature is back to normal. Please report any machines that did not come back up.",
]


def message(body: str, i: int, subject: str = "News from us") -> tuple[bytes, list[str]]:
    """A personalized copy ``i``: name, address, numbers, tokens and dates vary per recipient."""
    name = NAMES[i % len(NAMES)]
    address = f"{name.split()[0].lower()}.{i}@example.org"
    token = uuid.UUID(int=random.Random(i).getrandbits(128)).hex
    text = (
        f"Dear {name},\r\n\r\n{body}\r\n\r\nYour member number is {100000 + 7919 * i} and this "
        f"letter was sent on 2024-05-{1 + i % 28:02d}.\r\n"
        f"Unsubscribe: https://news.example.com/u/{token}?r={i}\r\n"
    )
    raw = f"Subject: {subject}, {name.split()[0]}\r\nTo: {name} <{address}>\r\n\r\n{text}"
    return raw.encode(), [address]


def copy_fp(body: str, i: int) -> Fingerprint:
    raw, recipients = message(body, i)
    return fingerprint(raw, recipients)


def sketch(lanes: list[int], words: int = 100) -> Fingerprint:
    return Fingerprint("sketch", struct.pack(f">{LANES}H", *lanes), words)


def random_sketch(seed: int) -> Fingerprint:
    rng = random.Random(seed)
    return sketch([rng.getrandbits(16) for _ in range(LANES)])


def exact(tag: int) -> Fingerprint:
    return Fingerprint("exact", struct.pack(">Q", tag), 3)


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
async def clusters(store: RedisStore) -> ClusterStore:
    return ClusterStore(store, DAY)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def parse_records(stored: Mapping[Any, Any]) -> dict[str, tuple[float, float, bytes]]:
    """The stored clusters (HGETALL of "rec"): id -> (created, last_seen, rep bytes)."""
    found = {}
    for cid, value in stored.items():
        assert isinstance(cid, bytes)
        assert isinstance(value, bytes)
        created, last_seen = struct.unpack_from(">dd", value)
        rep_len = 4 + 2 * LANES if value[17] == 1 else 12
        assert len(value) == 16 + rep_len + 8 * (32 if value[17] == 1 else 1)  # + band times
        found[cid.decode()] = (created, last_seen, value[16 : 16 + rep_len])
    return found


async def records(raw: Redis, keys: ClusterKeys) -> dict[str, tuple[float, float, bytes]]:
    return parse_records(await raw.hgetall(keys.records))


# -- basics ----------------------------------------------------------------------------------


async def test_same_message_twice_gets_the_same_id(clusters: ClusterStore) -> None:
    fp = copy_fp(CAMPAIGNS[0], 1)
    first = await clusters.assign(CUSTOMER, fp, NOW)
    assert first == new_cluster_id(fp, NOW)  # founded by the first copy
    assert await clusters.assign(CUSTOMER, fp, NOW + 60) == first
    # A replayed call (same fingerprint, same time: a retry after a lost reply) as well.
    assert await clusters.assign(CUSTOMER, fp, NOW) == first


async def test_personalized_copies_get_one_id(clusters: ClusterStore) -> None:
    for body in CAMPAIGNS:
        fps = [copy_fp(body, i) for i in range(12)]
        assert len({fp.data for fp in fps}) > 1  # personalization did change some lanes...
        ids = {await clusters.assign(CUSTOMER, fp, NOW + i) for i, fp in enumerate(fps)}
        assert ids == {new_cluster_id(fps[0], NOW)}  # ...but not the cluster


async def test_unrelated_messages_get_different_ids(clusters: ClusterStore) -> None:
    fps = [copy_fp(body, 0) for body in CAMPAIGNS + UNRELATED]
    fps += [exact(1), exact(2)]
    ids = [await clusters.assign(CUSTOMER, fp, NOW) for fp in fps]
    assert len(set(ids)) == len(fps)
    assert ids == [new_cluster_id(fp, NOW) for fp in fps]
    # Each of them still finds its own cluster.
    assert [await clusters.assign(CUSTOMER, fp, NOW + 1) for fp in fps] == ids


async def test_exact_fingerprints_match_only_when_equal(clusters: ClusterStore) -> None:
    one_liner = fingerprint(b"Subject: hi\r\n\r\nlunch at noon, Bob?\r\n", ["bob@example.org"])
    again = fingerprint(b"Subject: hi\r\n\r\nlunch at noon, Eve?\r\n", ["eve@example.org"])
    assert one_liner.kind == "exact"
    assert one_liner.data == again.data
    first = await clusters.assign(CUSTOMER, one_liner, NOW)
    assert await clusters.assign(CUSTOMER, again, NOW + 1) == first
    other = fingerprint(b"Subject: hi\r\n\r\ndinner at eight?\r\n")
    assert await clusters.assign(CUSTOMER, other, NOW + 2) != first
    # A sketch whose lanes happen to start with the digest's bytes is of another kind: no match.
    lookalike = sketch([*struct.unpack(">4H", one_liner.data), *[0] * (LANES - 4)])
    assert await clusters.assign(CUSTOMER, lookalike, NOW + 3) != first


async def test_customers_are_clustered_separately(clusters: ClusterStore) -> None:
    fp = copy_fp(CAMPAIGNS[0], 1)
    acme = await clusters.assign("acme", fp, NOW)
    globex = await clusters.assign("globex", fp, NOW + 1)
    assert globex != acme
    assert await clusters.assign("acme", copy_fp(CAMPAIGNS[0], 2), NOW + 2) == acme
    assert await clusters.assign("globex", copy_fp(CAMPAIGNS[0], 2), NOW + 2) == globex


# -- the threshold as a lane count -----------------------------------------------------------


@pytest.mark.parametrize(
    "threshold", [SIMILARITY_THRESHOLD, 0.0, -1.0, 1e-9, 0.5, 0.6015625, 0.7, 1.0, 1.5, 1e300]
)
def test_lane_count_rule_equals_the_python_rule(threshold: float) -> None:
    """For every count 0..128: ``count >= lanes_needed(t)`` iff ``count / 128 >= t``."""
    need = lanes_needed(threshold)
    for count in range(LANES + 1):
        assert (count >= need) == (count / LANES >= threshold), (count, need)
    if 0 < threshold <= 1:
        assert need == math.ceil(threshold * LANES)


@given(st.floats(allow_nan=False))
def test_lane_count_rule_equals_the_python_rule_for_any_threshold(threshold: float) -> None:
    need = lanes_needed(threshold)
    assert all((c >= need) == (c / LANES >= threshold) for c in range(LANES + 1))


def test_lane_counts() -> None:
    assert lanes_needed(0.6) == 77  # 77/128 = 0.6015625 >= 0.6 > 76/128
    assert lanes_needed(0.8) == 103  # 103/128 = 0.8046875 >= 0.8 > 102/128
    assert lanes_needed(0.75) == 96  # exactly 0.75
    assert lanes_needed(SIMILARITY_THRESHOLD) == math.ceil(SIMILARITY_THRESHOLD * LANES)
    with pytest.raises(ValueError, match="nan"):
        lanes_needed(math.nan)


async def test_the_threshold_boundary_in_lua(clusters: ClusterStore) -> None:
    base = [random.Random(7).getrandbits(16) for _ in range(LANES)]
    founder = sketch(base)
    cid = await clusters.assign(CUSTOMER, founder, NOW)
    need = lanes_needed(SIMILARITY_THRESHOLD)
    for unequal, matches in ((LANES - need, True), (LANES - need + 1, False)):
        lanes = base[:]
        for i in range(LANES - unequal, LANES):  # the first bands stay equal: it gets votes
            lanes[i] ^= 0x0100 if i % 2 else 0x0001  # differ in the high or the low byte
        fp = sketch(lanes)
        assert (similarity(fp, founder) >= SIMILARITY_THRESHOLD) is matches
        assert (await clusters.assign(CUSTOMER, fp, NOW + 1) == cid) is matches


LANE_FLIPS = st.dictionaries(
    st.integers(4, LANES - 1),  # band 0 (lanes 0..3) stays equal, so the founder is a candidate
    st.sampled_from([0x0001, 0x0100, 0x8000, 0xFFFF]),
    max_size=LANES - 4,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(flips=LANE_FLIPS, threshold=st.sampled_from([0.0, 0.3, 0.6, 0.75, 0.9, 1.0]))
def test_lua_similarity_is_sketch_similarity(
    runner_store: tuple[asyncio.Runner, RedisStore], flips: dict[int, int], threshold: float
) -> None:
    """The script matches a sketch exactly when ``similarity(fp, founder) >= threshold``."""
    runner, store = runner_store
    clusters = ClusterStore(store, DAY, threshold=threshold)
    base = [random.Random(11).getrandbits(16) for _ in range(LANES)]
    founder = sketch(base)
    fp = sketch([lane ^ flips.get(i, 0) for i, lane in enumerate(base)])
    customer = uuid.uuid4().hex
    cid = runner.run(clusters.assign(customer, founder, NOW))
    got = runner.run(clusters.assign(customer, fp, NOW + 1))
    assert (got == cid) == (similarity(fp, founder) >= threshold)


# -- the window ------------------------------------------------------------------------------


async def test_window_expiry_with_injected_time(store: RedisStore) -> None:
    window = 600.0
    clusters = ClusterStore(store, window)
    first = await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[1], 0), NOW)
    # Alive while now - last_seen <= window: exactly one window later it still takes copies...
    assert await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[1], 1), NOW + window) == first
    # ...and each copy extends its life (last_seen moved to NOW + window).
    assert await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[1], 2), NOW + 2 * window) == first
    # Silent for longer than the window: dead, never revived; the next copy founds a new one.
    late = NOW + 3 * window + 0.001
    second = await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[1], 3), late)
    assert second != first
    assert await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[1], 4), late + 1) == second


async def test_every_key_expires(clusters: ClusterStore, raw: Redis) -> None:
    for i in range(6):
        await clusters.assign(CUSTOMER, copy_fp(CAMPAIGNS[i % 3], i), NOW + i)  # found + match
    await clusters.assign(CUSTOMER, exact(5), NOW + 7)
    keys = [key.decode() async for key in raw.scan_iter()]
    assert len(keys) == 3  # rec, seen, and the buckets of the campaigns and the exact fp
    kinds = {key.split(":")[4] for key in keys}
    assert kinds == {"rec", "seen", "bk"}
    for key in keys:
        assert key.startswith(f"mg:{{{CUSTOMER}}}:cust:cl:"), key
        assert 0 < await raw.pttl(key) <= DAY * 1000, key


async def test_key_layout(store: RedisStore, raw: Redis) -> None:
    keys = ClusterKeys.of(store, "a:{b}")
    assert keys.records == "mg:{a:%7Bb%7D}:cust:cl:rec"
    assert keys.seen == "mg:{a:%7Bb%7D}:cust:cl:seen"
    assert keys.buckets == "mg:{a:%7Bb%7D}:cust:cl:bk"
    for fp in (copy_fp(CAMPAIGNS[0], 0), exact(9)):
        assert keys.script_keys(fp) == [keys.records, keys.seen, keys.buckets]
        fields = [bucket_field(band) for band in band_keys(fp)]
        assert len(set(fields)) == len(fields) == (32 if fp.kind == "sketch" else 1)
        assert all(len(field) == 9 for field in fields)
    clusters = ClusterStore(store, DAY)
    fp = copy_fp(CAMPAIGNS[0], 0)
    cid = await clusters.assign("a:{b}", fp, NOW)
    assert sorted(await raw.keys()) == sorted(k.encode() for k in keys.script_keys(fp))
    stored = await records(raw, keys)
    assert stored == {cid: (NOW, NOW, fp.to_bytes())}
    assert await raw.zrange(keys.seen, 0, -1, withscores=True) == [(cid.encode(), NOW)]
    assert await raw.hlen(keys.buckets) == 32
    bucket = await raw.hget(keys.buckets, bucket_field(band_keys(fp)[0]))
    assert bucket == struct.pack(">d", NOW) + cid.encode()


async def test_memory_stays_bounded(store: RedisStore, raw: Redis) -> None:
    window = 100.0
    clusters = ClusterStore(store, window)
    keys = ClusterKeys.of(store, CUSTOMER)
    dead = 200
    for i in range(dead):  # 200 unrelated messages: 200 clusters
        await clusters.assign(CUSTOMER, random_sketch(i), NOW + i * 0.01)
    assert await raw.hlen(keys.records) == await raw.zcard(keys.seen) == dead
    # A window later they are all dead: every call deletes up to 16 of them (and founds one).
    later = NOW + 10 + window
    sizes = []
    for k in range(20):
        await clusters.assign(CUSTOMER, random_sketch(1000 + k), later + k)
        sizes.append(await raw.hlen(keys.records))
        assert await raw.zcard(keys.seen) == sizes[-1]
    # After call k: 200 - 16k dead (while any are left) and k live clusters.
    full = dead // 16  # 12 calls delete 16 each, the 13th the last 8
    assert sizes == [dead - 15 * k for k in range(1, full + 1)] + list(range(full + 1, 21))
    # The dead clusters' bucket entries went with them: 32 buckets of each live cluster are left.
    assert await raw.hlen(keys.buckets) == 32 * 20
    assert 0 < await raw.pttl(keys.buckets) <= window * 1000


def band0_sibling(base: list[int], k: int) -> Fingerprint:
    """A sketch sharing only band 0 (lanes 0..3) with ``base`` and with the other siblings."""
    return sketch([lane ^ (k + 1) if i >= 4 else lane for i, lane in enumerate(base)])


async def test_buckets_keep_bucket_cap_ids(store: RedisStore, raw: Redis) -> None:
    clusters = ClusterStore(store, 100.0, bucket_cap=2)
    base = [random.Random(3).getrandbits(16) for _ in range(LANES)]
    ids = [await clusters.assign(CUSTOMER, band0_sibling(base, k), NOW + k) for k in range(3)]
    assert len(set(ids)) == 3
    band0 = bucket_field(band_keys(sketch(base))[0])
    buckets = ClusterKeys.of(store, CUSTOMER).buckets
    assert await raw.hget(buckets, band0) == struct.pack(">d", NOW + 2) + (ids[2] + ids[1]).encode()
    # ids[0] fell out of the bucket: a copy that shares only band 0 with it no longer finds it
    # (the model does the same; copies share far more than one band).
    assert await clusters.assign(CUSTOMER, band0_sibling(base, 0), NOW + 3) == ids[0]
    assert await raw.hget(buckets, band0) == struct.pack(">d", NOW + 2) + (ids[2] + ids[1]).encode()


async def test_buckets_drop_dead_clusters_and_move_winners_to_the_front(
    store: RedisStore, raw: Redis
) -> None:
    clusters = ClusterStore(store, 100.0, purge=0)
    base = [random.Random(5).getrandbits(16) for _ in range(LANES)]
    band0 = bucket_field(band_keys(sketch(base))[0])
    buckets = ClusterKeys.of(store, CUSTOMER).buckets
    id0 = await clusters.assign(CUSTOMER, band0_sibling(base, 0), NOW)
    id1 = await clusters.assign(CUSTOMER, band0_sibling(base, 1), NOW + 10)
    assert await raw.hget(buckets, band0) == struct.pack(">d", NOW + 10) + (id1 + id0).encode()
    assert await clusters.assign(CUSTOMER, band0_sibling(base, 0), NOW + 20) == id0  # a match
    assert await raw.hget(buckets, band0) == struct.pack(">d", NOW + 20) + (id0 + id1).encode()
    id2 = await clusters.assign(CUSTOMER, band0_sibling(base, 2), NOW + 30)
    assert (
        await raw.hget(buckets, band0) == struct.pack(">d", NOW + 30) + (id2 + id0 + id1).encode()
    )
    # At +115 id1 (last seen at +10) is dead, id0 (+20) and id2 (+30) are alive.
    id3 = await clusters.assign(CUSTOMER, band0_sibling(base, 3), NOW + 115)
    assert (
        await raw.hget(buckets, band0) == struct.pack(">d", NOW + 115) + (id3 + id2 + id0).encode()
    )
    assert await raw.hlen(ClusterKeys.of(store, CUSTOMER).records) == 4  # purge=0: all kept


# -- tie-breaks (the model's rules, checked against ClusterIndex as well) -----------------------


def altered(base: list[int], lanes: range | list[int], tag: int) -> Fingerprint:
    """``base`` with ``lanes`` rewritten to values no other sketch here has."""
    changed = base[:]
    for i in lanes:
        changed[i] = 0xC000 | (tag << 8) | i
    return sketch(changed)


async def check_against_model(
    store: RedisStore, steps: list[tuple[Fingerprint, float]], **options: int
) -> list[str]:
    """Run ``steps`` through a fresh customer of the store and ClusterIndex; same ids."""
    clusters = ClusterStore(store, DAY, threshold=0.6, **options)
    model = ClusterIndex(DAY, 0.6, **options)
    customer = uuid.uuid4().hex
    ids = [await clusters.assign(customer, fp, now) for fp, now in steps]
    assert ids == [model.assign(fp, now) for fp, now in steps]
    return ids


async def test_only_the_first_max_candidates_by_votes_then_created_are_verified(
    store: RedisStore,
) -> None:
    base = [random.Random(13).getrandbits(16) for _ in range(LANES)]
    x = sketch(base)
    a = altered(base, range(32, LANES), 1)  # bands 0..7 of x, 32 equal lanes: no match
    b = altered(base, [*range(0, 32, 4), *range(65, LANES, 4)], 2)  # bands 8..15, 104 lanes
    assert similarity(x, a) < 0.6 <= similarity(x, b)
    assert similarity(a, b) < 0.6
    steps = [(a, NOW), (b, NOW + 1), (x, NOW + 2)]
    # Both have 8 votes; the earlier created (a) comes first and is the only one verified.
    ids = await check_against_model(store, steps, max_candidates=1)
    assert len(set(ids)) == 3
    ids = await check_against_model(store, steps, max_candidates=2)
    assert ids[2] == ids[1]
    # More votes come first whatever the age: c (9 votes: bands 8..16) before a (8).
    c = altered(base, [*range(0, 32, 4), *range(69, LANES, 4)], 3)
    ids = await check_against_model(store, [(a, NOW), (c, NOW + 1), (x, NOW + 2)], max_candidates=1)
    assert ids[2] == ids[1]


async def test_the_winner_is_the_most_similar_then_the_oldest_then_the_smallest_id(
    store: RedisStore,
) -> None:
    base = [random.Random(17).getrandbits(16) for _ in range(LANES)]
    x = sketch(base)
    a = altered(base, range(0, 40), 1)  # 88 equal lanes, 22 votes
    b = altered(base, range(88, LANES), 2)  # 88 equal lanes, 22 votes
    b_closer = altered(base, range(98, LANES), 3)  # 98 equal lanes, 24 votes
    a_closer = altered(base, range(0, 30), 4)  # 98 equal lanes
    a_far_many_votes = altered(base, [*range(0, 40, 4), *range(41, 72, 4)], 5)  # 110, 14 votes
    for one, other in ((a, b), (a, b_closer), (a_closer, b), (a_far_many_votes, b)):
        assert similarity(one, other) < 0.6 <= min(similarity(x, one), similarity(x, other))
    # Equal similarity: the earlier created wins, whichever was founded first.
    ids = await check_against_model(store, [(a, NOW), (b, NOW + 1), (x, NOW + 2)])
    assert ids[2] == ids[0]
    ids = await check_against_model(store, [(b, NOW), (a, NOW + 1), (x, NOW + 2)])
    assert ids[2] == ids[0]
    # Founded at the same time: the smaller id wins.
    ids = await check_against_model(store, [(a, NOW), (b, NOW), (x, NOW + 2)])
    assert ids[2] == min(ids[:2])
    # The more similar wins over the older, and over the one with more votes.
    ids = await check_against_model(store, [(a, NOW), (b_closer, NOW + 1), (x, NOW + 2)])
    assert ids[2] == ids[1]
    ids = await check_against_model(store, [(b, NOW), (a_closer, NOW + 1), (x, NOW + 2)])
    assert ids[2] == ids[1]
    ids = await check_against_model(store, [(b, NOW), (a_far_many_votes, NOW + 1), (x, NOW + 2)])
    assert ids[2] == ids[1]


# -- atomicity -------------------------------------------------------------------------------


@pytest.mark.parametrize("run", range(3))
async def test_concurrent_copies_of_a_new_campaign_get_one_id(redis_url: str, run: int) -> None:
    """50 personalized copies at once over two 'gates' (two pools): exactly one cluster."""
    fps = [copy_fp(CAMPAIGNS[run], i) for i in range(50)]
    # Precondition: every copy matches every other, so whichever comes first founds the cluster.
    assert min(similarity(a, b) for a in fps for b in fps) >= SIMILARITY_THRESHOLD
    stores = [RedisStore(redis_url), RedisStore(redis_url)]
    gates = [ClusterStore(s, DAY) for s in stores]
    try:
        ids = await asyncio.gather(
            *(gates[i % 2].assign(CUSTOMER, fp, NOW) for i, fp in enumerate(fps))
        )
        assert len(set(ids)) == 1
        assert ids[0] in {new_cluster_id(fp, NOW) for fp in fps}
        keys = ClusterKeys.of(stores[0], CUSTOMER)
        assert await stores[0].client.hlen(keys.records) == 1
    finally:
        for s in stores:
            await s.close()


# -- errors and arguments --------------------------------------------------------------------


async def test_store_failures_are_store_errors(
    store: RedisStore, redis_server: RedisServer
) -> None:
    clusters = ClusterStore(store, DAY)
    fp = copy_fp(CAMPAIGNS[0], 0)
    redis_server.stop()  # the next test's fixture restarts it
    with pytest.raises(StoreError, match="cluster_assign failed"):
        await clusters.assign(CUSTOMER, fp, NOW)
    await store.close()
    with pytest.raises(StoreError, match="closed"):
        await clusters.assign(CUSTOMER, fp, NOW)


async def test_bad_arguments(store: RedisStore) -> None:
    fp = copy_fp(CAMPAIGNS[0], 0)
    for window in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="window"):
            ClusterStore(store, window)
    for kwargs in ({"bucket_cap": 0}, {"max_candidates": 1.5}, {"purge": True}, {"purge": -1}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ClusterStore(store, DAY, **kwargs)
    clusters = ClusterStore(store, DAY)
    with pytest.raises(ValueError, match="now"):
        await clusters.assign(CUSTOMER, fp, math.nan)
    with pytest.raises(ValueError, match="customer"):
        await clusters.assign("", fp, NOW)


async def test_the_script_checks_its_arguments(store: RedisStore) -> None:
    clusters = ClusterStore(store, DAY)
    fp = copy_fp(CAMPAIGNS[0], 0)
    keys = ClusterKeys.of(store, CUSTOMER).script_keys(fp)
    args: list[str | bytes] = [repr(NOW), repr(DAY), fp.to_bytes(), "77"]
    args += [new_cluster_id(fp, NOW), "8", "16", "16"]
    with pytest.raises(StoreError, match="bad KEYS/ARGV"):
        await store.run("x", lambda: clusters._assign(keys=keys[:2], args=args))
    with pytest.raises(StoreError, match="bad KEYS/ARGV"):
        await store.run("x", lambda: clusters._assign(keys=keys, args=[*args[:4], "x", *args[5:]]))


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_cluster(cluster_url: str) -> None:
    store = RedisStore(cluster_url, timeout=1.0)
    clusters = ClusterStore(store, DAY)
    customer = f"c{uuid.uuid4().hex[:8]}"
    try:
        fps = [copy_fp(CAMPAIGNS[2], i) for i in range(20)]
        ids = await asyncio.gather(*(clusters.assign(customer, fp, NOW) for fp in fps))
        assert len(set(ids)) == 1
        assert await clusters.assign(customer, copy_fp(UNRELATED[0], 0), NOW) != ids[0]
        assert await clusters.assign(customer, exact(3), NOW) not in ids
    finally:
        await store.close()


# -- the model -------------------------------------------------------------------------------

# Synthetic sketches: 8 segments of 16 lanes (4 bands each), each segment one of two patterns;
# two of them share a multiple of 16 lanes, so there are many votes, ties and near misses.  A
# "nudge" rewrites the last 3 or 4 lanes, which moves 80 equal lanes to 77 (a match at 0.6) or
# 76 (not), 112 to 109 or 108, and so on.  A "spread" rewrites one lane in each of the first 16
# bands: 16 fewer equal lanes but 16 fewer votes, so votes and similarity disagree.
SEGMENTS = 8


def synthetic(pattern: int, nudge: int, spread: int) -> Fingerprint:
    lanes = [
        (segment << 12) | (((pattern >> segment) & 1) << 8) | lane
        for segment in range(SEGMENTS)
        for lane in range(LANES // SEGMENTS)
    ]
    for i in range(nudge):
        lanes[LANES - 1 - i] = 0xF000 | (nudge << 4) | i
    if spread:
        for band in range(16):
            lanes[4 * band + spread] = 0xE000 | (spread << 8) | band
    return sketch(lanes)


REAL_POOL = [copy_fp(body, i) for body in CAMPAIGNS[:2] for i in range(3)] + [
    copy_fp(UNRELATED[0], 0),
    exact(1),
    exact(2),
]


def mask(flipped: frozenset[int]) -> int:
    return sum(1 << segment for segment in flipped)


# Few flipped segments among four, no nudge or spread: many equidistant triples, hence ties
# (e.g. {0, 1} matches {0} and {1} equally at 0.8, which do not match each other).
SIMPLE = st.builds(
    synthetic,
    st.sampled_from(
        [1 << i for i in range(4)] + [(1 << i) | (1 << j) for j in range(4) for i in range(j)]
    ),
    st.just(0),
    st.just(0),
)
FINGERPRINTS = st.one_of(
    SIMPLE,
    SIMPLE,
    SIMPLE,
    st.builds(
        synthetic,
        st.frozensets(st.integers(0, SEGMENTS - 1)).map(mask),
        st.sampled_from([0, 3, 4]),
        st.sampled_from([0, 1, 2]),
    ),
    st.sampled_from(REAL_POOL),
)
MODEL_WINDOW = 100.0
# Mostly small steps, so that clusters live long enough to compete; some cross the window.
DT = st.sampled_from(
    [0.0] * 6 + [0.1, 1.0, 1.0, 10.0, 30.0, 99.9, 100.0, 100.1, 250.0, -1.0, -50.0]
)


class ClusterMachine(RuleBasedStateMachine):
    def __init__(self, runner: asyncio.Runner, store: RedisStore) -> None:
        super().__init__()
        self.runner = runner
        self.store = store
        self.customer = uuid.uuid4().hex  # a fresh customer: no flushing between examples
        self.keys = ClusterKeys.of(store, self.customer)
        self.now = NOW
        self.clusters = ClusterStore(store, MODEL_WINDOW)
        self.model = ClusterIndex(MODEL_WINDOW)

    @initialize(
        bucket_cap=st.sampled_from([1, 2, 8]),
        max_candidates=st.sampled_from([1, 2, 16]),
        threshold=st.sampled_from([SIMILARITY_THRESHOLD, 0.5, 0.6, 0.75, 1.0]),
        purge=st.sampled_from([0, 1, 16]),
    )
    def configure(self, bucket_cap: int, max_candidates: int, threshold: float, purge: int) -> None:
        limits = {"bucket_cap": bucket_cap, "max_candidates": max_candidates}
        self.clusters = ClusterStore(
            self.store, MODEL_WINDOW, threshold=threshold, purge=purge, **limits
        )
        self.model = ClusterIndex(MODEL_WINDOW, threshold, **limits)

    # Time moves with each message (a separate "tick" rule would be switched off in many
    # examples by hypothesis' swarm testing, leaving every cluster with the same ``created``).
    # It goes back (a gate whose clock is behind) only when the store deletes nothing: deleting
    # dead clusters is invisible only while time does not go back past their death.
    @rule(dt=DT, fp=FINGERPRINTS)
    def assign(self, dt: float, fp: Fingerprint) -> None:
        if dt >= 0 or self.clusters.purge == 0:
            self.now += dt
        got = self.runner.run(self.clusters.assign(self.customer, fp, self.now))
        assert got == self.model.assign(fp, self.now)

    @invariant()
    def same_alive_clusters(self) -> None:
        stored = self.runner.run(self.records())
        alive = set(self.model.alive(self.now))
        assert {cid for cid, (_, seen, _) in stored.items() if self.now - seen <= MODEL_WINDOW} == (
            alive
        )
        for cid in alive:
            cluster = self.model.cluster(cid)
            assert cluster is not None
            assert stored[cid] == (cluster.created, cluster.last_seen, cluster.rep.to_bytes())

    async def records(self) -> dict[str, tuple[float, float, bytes]]:
        return parse_records(await self.store.client.hgetall(self.keys.records))

    def teardown(self) -> None:
        async def check_and_clean() -> None:
            client = self.store.client
            keys = [key async for key in client.scan_iter(match=f"mg:{{{self.customer}}}:*")]
            for key in keys:
                assert 0 < await client.pttl(key) <= MODEL_WINDOW * 1000
            if keys:
                await client.delete(*keys)

        self.runner.run(check_and_clean())


@pytest.fixture
def runner_store(redis_url: str) -> Iterator[tuple[asyncio.Runner, RedisStore]]:
    with asyncio.Runner() as runner:
        store = RedisStore(redis_url)
        try:
            yield runner, store
        finally:
            runner.run(store.close())


def test_redis_matches_the_model(runner_store: tuple[asyncio.Runner, RedisStore]) -> None:
    runner, store = runner_store
    run_state_machine_as_test(
        lambda: ClusterMachine(runner, store),  # type: ignore[arg-type]  # a factory works too
        settings=settings(max_examples=100, stateful_step_count=40, deadline=None),
    )


async def test_a_match_rewrites_the_record_not_the_buckets(store: RedisStore, raw: Redis) -> None:
    """A copy joining its cluster moves the buckets' touched time through the cluster's band
    times: the 32 buckets stay as written, and still expire a window after the last copy."""
    window = 100.0
    clusters = ClusterStore(store, window, purge=0)
    keys = ClusterKeys.of(store, CUSTOMER)
    fp = copy_fp(CAMPAIGNS[0], 0)
    cid = await clusters.assign(CUSTOMER, fp, NOW)
    buckets = await raw.hgetall(keys.buckets)
    for k in range(1, 4):
        assert await clusters.assign(CUSTOMER, fp, NOW + 90 * k) == cid
        assert await raw.hgetall(keys.buckets) == buckets
        (value,) = (await raw.hgetall(keys.records)).values()
        assert struct.unpack_from(">dd", value) == (NOW, NOW + 90 * k)
        assert set(struct.unpack_from(">32d", value, 16 + 260)) == {NOW + 90 * k}
    # Alive through every band at +370 (buckets written at NOW, band times at +270) ...
    model = ClusterIndex(window)
    for now in (NOW, NOW + 90, NOW + 180, NOW + 270):
        model.assign(fp, now)
    other = band0_sibling([random.Random(7).getrandbits(16) for _ in range(LANES)], 0)
    assert await clusters.assign(CUSTOMER, fp, NOW + 370) == model.assign(fp, NOW + 370) == cid
    assert await clusters.assign(CUSTOMER, other, NOW + 371) == model.assign(other, NOW + 371)


async def test_the_buckets_are_made_a_hash_table_with_the_same_contents(
    store: RedisStore, raw: Redis
) -> None:
    """A listpack-encoded bucket hash (a customer with few clusters) is converted to a hash
    table by the next call, which only changes how Redis stores it: an HMGET of 32 fields scans
    a listpack field by field."""
    clusters = ClusterStore(store, DAY)
    keys = ClusterKeys.of(store, CUSTOMER)
    fp = copy_fp(CAMPAIGNS[0], 0)
    cid = await clusters.assign(CUSTOMER, fp, NOW)
    assert await raw.object("encoding", keys.buckets) in (b"listpack", b"ziplist")
    buckets = await raw.hgetall(keys.buckets)
    assert await clusters.assign(CUSTOMER, fp, NOW) == cid
    assert await raw.object("encoding", keys.buckets) == b"hashtable"
    assert await raw.hgetall(keys.buckets) == buckets
    assert 0 < await raw.pttl(keys.buckets) <= DAY * 1000
    other = copy_fp(CAMPAIGNS[1], 0)
    assert await clusters.assign(CUSTOMER, other, NOW + 1) != cid
    assert await raw.hlen(keys.buckets) == 64
    assert b":" not in await raw.hkeys(keys.buckets)
