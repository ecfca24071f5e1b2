"""The reference online clusterer: campaigns, windows, tie-breaks, bounded state."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Collection

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint import (
    SIMILARITY_THRESHOLD,
    ClusterIndex,
    Fingerprint,
    band_keys,
    fingerprint,
    new_cluster_id,
    similarity,
)
from tests.core.fingerprint.messages import PARAGRAPHS, campaign_letter, render

DAY = 86400.0
BASE = list(range(1000, 1128))


def sketch(changed: Collection[int] = (), salt: int = 0) -> Fingerprint:
    """A synthetic sketch: BASE with the given lanes changed."""
    lanes = [value + 5000 + salt if lane in changed else value for lane, value in enumerate(BASE)]
    return Fingerprint("sketch", struct.pack(">128H", *lanes))


def copy(index: int, first: str = "John", paragraphs: int = 0) -> Fingerprint:
    letter = campaign_letter(
        PARAGRAPHS[paragraphs : paragraphs + 3], first, "Smith", f"tok{index}x", index
    )
    return fingerprint(render(letter, ("text", "html", "alternative")[index % 3]))


def test_copies_share_a_cluster_and_other_campaigns_do_not() -> None:
    index = ClusterIndex(DAY)
    first = index.assign(copy(0), 0.0)
    assert [index.assign(copy(i, "Anna"), float(i)) for i in range(1, 6)] == [first] * 5
    other = index.assign(copy(9, paragraphs=6), 10.0)
    assert other != first
    assert index.assign(copy(10, paragraphs=6), 11.0) == other
    assert index.alive(11.0) == [first, other]


def test_window_is_inclusive_and_extended_by_traffic() -> None:
    index = ClusterIndex(100.0)
    cid = index.assign(sketch(), 0.0)
    assert index.assign(sketch(), 100.0) == cid  # exactly the window: still alive
    assert index.assign(sketch(), 199.0) == cid  # extended by the message at 100
    later = index.assign(sketch(), 299.5)  # 100.5 s of silence: a new campaign
    assert later != cid
    assert later == new_cluster_id(sketch(), 299.5)
    assert index.assign(sketch(), 300.0) == later  # and the old one is not revived
    found = index.cluster(later)
    assert found is not None and (found.created, found.last_seen) == (299.5, 300.0)


def test_clock_skew_does_not_move_last_seen_back() -> None:
    index = ClusterIndex(100.0)
    cid = index.assign(sketch(), 50.0)
    assert index.assign(sketch(), 10.0) == cid
    found = index.cluster(cid)
    assert found is not None and found.last_seen == 50.0


def test_best_match_wins_then_the_oldest() -> None:
    assert 0.6 < SIMILARITY_THRESHOLD <= 0.68  # the lane counts below are chosen for it
    index = ClusterIndex(DAY)
    far = index.assign(sketch(range(0, 40)), 0.0)  # 0.69 from BASE
    near = index.assign(sketch(range(40, 60)), 1.0)  # 0.84 from BASE, 0.53 from `far`
    assert near != far
    assert index.assign(sketch(), 2.0) == near

    index = ClusterIndex(DAY)
    older = index.assign(sketch(range(0, 26)), 0.0)
    newer = index.assign(sketch(range(26, 52)), 1.0)  # 0.59 apart: two clusters
    assert newer != older
    assert similarity(sketch(), sketch(range(0, 26))) == similarity(sketch(), sketch(range(26, 52)))
    assert index.assign(sketch(), 2.0) == older  # a tie: the earlier cluster


def test_matches_are_verified_against_the_founder() -> None:
    index = ClusterIndex(DAY)
    founder = index.assign(sketch(), 0.0)
    assert index.assign(sketch(range(0, 40)), 1.0) == founder  # 0.69
    drifted = sketch(range(0, 60))  # 0.53 from the founder, though 0.84 from the last copy
    assert index.assign(drifted, 2.0) != founder


def test_exact_fingerprints() -> None:
    index = ClusterIndex(DAY)
    one = fingerprint(b"Subject: hi\n\nlunch at 12?")
    same = fingerprint(b"Subject: hi\n\nlunch at 1?")
    other = fingerprint(b"Subject: hi\n\ndinner at 12?")
    cid = index.assign(one, 0.0)
    assert index.assign(same, 1.0) == cid
    assert index.assign(other, 2.0) != cid


def test_bucket_cap_bounds_candidates() -> None:
    index = ClusterIndex(DAY, bucket_cap=2)
    # Four clusters that share band 0 only (lanes 4.. differ between them and from BASE).
    ids = [index.assign(sketch(range(4, 128), salt=k), float(k)) for k in range(4)]
    assert len(set(ids)) == 4
    assert index.bucket(band_keys(sketch(range(4, 128), salt=0))[0]) == [ids[3], ids[2]]
    # (most recent first, capped)


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=256, max_size=256), st.sets(st.integers(0, 127)))
def test_the_store_recipe_in_the_docstring(lanes: bytes, changed: set[int]) -> None:
    a = Fingerprint("sketch", lanes)
    other = bytearray(lanes)
    for lane in changed:
        other[2 * lane] ^= 0x80
    b = Fingerprint("sketch", bytes(other))
    raw = a.to_bytes()
    assert band_keys(a) == [f"{i:02x}{raw[4 + 8 * i : 12 + 8 * i].hex()}" for i in range(32)]
    equal = sum(
        raw[4 + 2 * i : 6 + 2 * i] == b.to_bytes()[4 + 2 * i : 6 + 2 * i] for i in range(128)
    )
    needed = math.ceil(SIMILARITY_THRESHOLD * 128)
    assert (similarity(a, b) >= SIMILARITY_THRESHOLD) == (equal >= needed)


def test_invalid_parameters() -> None:
    with pytest.raises(ValueError):
        ClusterIndex(-1.0)
    with pytest.raises(ValueError):
        ClusterIndex(1.0, bucket_cap=0)


def brute_force(events: list[tuple[Fingerprint, float]], window: float) -> list[str]:
    """The docstring's algorithm without caps, order or indexes, as plain sets."""
    clusters: dict[str, tuple[Fingerprint, float, float]] = {}
    buckets: dict[str, tuple[float, set[str]]] = {}  # key -> (touched, ids)
    out = []
    for fp, now in events:
        keys = band_keys(fp)
        live_buckets = {
            k: buckets[k] for k in keys if k in buckets and now - buckets[k][0] <= window
        }
        voted = set().union(*(ids for _, ids in live_buckets.values()))
        best = None
        for cid in voted:
            rep, created, last_seen = clusters[cid]
            if now - last_seen > window:
                continue
            score = similarity(fp, rep)
            if score >= SIMILARITY_THRESHOLD:
                entry = (-score, created, cid)
                best = entry if best is None or entry < best else best
        if best is None:
            cid = new_cluster_id(fp, now)
            clusters[cid] = (fp, now, now)
            for key in keys:
                touched, ids = live_buckets.get(key, (now, set()))
                buckets[key] = (max(touched, now), {*ids, cid})
        else:
            cid = best[2]
            rep, created, last_seen = clusters[cid]
            clusters[cid] = (rep, created, max(last_seen, now))
            for key, (touched, ids) in live_buckets.items():
                if cid in ids:
                    buckets[key] = (max(touched, now), ids)
        out.append(cid)
    return out


@st.composite
def event_streams(draw: st.DrawFn) -> list[tuple[Fingerprint, float]]:
    rng = random.Random(draw(st.integers(0, 2**32)))
    bases = [[rng.randrange(65536) for _ in range(128)] for _ in range(draw(st.integers(1, 4)))]
    events, now = [], 0.0
    for _ in range(draw(st.integers(1, 40))):
        lanes = list(rng.choice(bases))
        for lane in rng.sample(range(128), draw(st.sampled_from([0, 5, 15, 25, 40]))):
            lanes[lane] = rng.randrange(65536)
        now += draw(st.sampled_from([0.0, 1.0, 30.0, 99.0, 150.0]))
        events.append((Fingerprint("sketch", struct.pack(">128H", *lanes)), now))
    return events


@settings(max_examples=150, deadline=None)
@given(event_streams())
def test_index_equals_brute_force_when_nothing_is_capped(
    events: list[tuple[Fingerprint, float]],
) -> None:
    index = ClusterIndex(100.0, bucket_cap=1000, max_candidates=1000)
    assert [index.assign(fp, now) for fp, now in events] == brute_force(events, 100.0)


@settings(max_examples=150, deadline=None)
@given(event_streams(), st.integers(1, 3))
def test_sweeping_never_changes_results(events: list[tuple[Fingerprint, float]], cap: int) -> None:
    swept, kept = ClusterIndex(100.0, bucket_cap=cap), ClusterIndex(100.0, bucket_cap=cap)
    for fp, now in events:
        swept.sweep(now)
        assert swept.assign(fp, now) == kept.assign(fp, now)
    assert swept.alive(events[-1][1]) == kept.alive(events[-1][1])
