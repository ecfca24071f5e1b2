"""The bounded memo of the fingerprint's caches."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailguard.core.fingerprint.cache import ENTRY_OVERHEAD, BoundedCache


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
