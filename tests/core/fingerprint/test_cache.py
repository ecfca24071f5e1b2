"""The bounded memo of the fingerprint's caches."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint.cache import ENTRY_OVERHEAD, BoundedCache, IdentityCache


def _cache() -> BoundedCache[str, bytes]:
    return BoundedCache(4, 3 * ENTRY_OVERHEAD, 6, len)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text("abc", max_size=8), st.binary(max_size=60)), max_size=30))
def test_keep_one_is_keep_of_one_item(items: list[tuple[str, bytes]]) -> None:
    one, many = _cache(), _cache()
    for key, value in items:
        one.keep_one(key, value)
        many.keep({key: value})
        assert dict(one) == dict(many) and one.used == many.used
        assert len(one) <= one.entries and one.used <= one.budget
        assert all(len(k) <= one.longest for k in one)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.binary(max_size=60)), max_size=30))
def test_identity_cache_reads_by_the_object_within_its_limits(
    items: list[tuple[int, bytes]],
) -> None:
    cache: IdentityCache[list[int], bytes] = IdentityCache(
        4, 3 * ENTRY_OVERHEAD + 80, lambda key, value: len(value)
    )
    objects = [[i] for i in range(6)]  # equal lists are not the same object
    for index, value in items:
        key = objects[index]
        cache.keep(key, value)
        assert cache.get(key) == value
        assert cache.get([index]) is None  # an equal but other object
        assert len(cache) <= cache.entries and cache.used <= cache.budget
    cache.clear()
    assert len(cache) == 0 and cache.used == 0 and all(cache.get(o) is None for o in objects)


def test_identity_cache_skips_an_item_bigger_than_its_budget() -> None:
    cache: IdentityCache[str, bytes] = IdentityCache(4, 100 + ENTRY_OVERHEAD, lambda k, v: len(v))
    key = "k"
    cache.keep(key, b"x" * 101)
    assert cache.get(key) is None and cache.used == 0
