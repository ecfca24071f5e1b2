"""A size-limited memo for the fingerprint's per-line and per-sentence results.

Responsible for: keeping at most ``entries`` items with keys of at most ``longest`` (in
``len``) and about ``budget`` in all (the key's size in memory, ``sys.getsizeof``, so a ``str``
of four-byte characters counts four bytes a character; plus the size of the value, as the
caller measures it, plus a per-entry overhead); when new items would pass a limit it is emptied
first.  Campaign copies repeat their lines and sentences, so a plain dict read hits most of the
time; the limits keep it small in every gate worker whatever the mail.
Must never: change a result (it only saves time), or grow past its limits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from sys import getsizeof
from typing import Generic, TypeVar

K = TypeVar("K", str, bytes)
V = TypeVar("V")

ENTRY_OVERHEAD = 160  # bytes a dict entry and its objects cost beyond their contents, roughly


class BoundedCache(dict[K, V], Generic[K, V]):
    """A dict with ``keep``: add computed items within the limits (module docstring)."""

    def __init__(self, entries: int, budget: int, longest: int, size: Callable[[V], int]) -> None:
        super().__init__()
        self.entries, self.budget, self.longest = entries, budget, longest
        self._size = size
        self.used = 0  # the budget in use

    def values_of(self, keys: Sequence[K], compute: Callable[[list[K]], Sequence[V]]) -> list[V]:
        """The value of every key: cached ones from here, the others from one ``compute`` call
        on the distinct missing keys (in order), which are then kept."""
        found = list(map(self.get, keys))
        if None not in found:
            return found  # type: ignore[return-value]  # no None
        missing = list(dict.fromkeys(k for k, f in zip(keys, found, strict=True) if f is None))
        computed = dict(zip(missing, compute(missing), strict=True))
        self.keep(computed)
        return [f if f is not None else computed[k] for k, f in zip(keys, found, strict=True)]

    def keep(self, computed: Mapping[K, V]) -> None:
        kept = {k: v for k, v in computed.items() if len(k) <= self.longest}
        size = sum(self._cost(k, v) for k, v in kept.items())
        replaced = sum(self._cost(k, self[k]) for k in kept if k in self)  # no longer count
        if len(self) + len(kept) > self.entries or self.used - replaced + size > self.budget:
            self.clear()
        else:
            self.used -= replaced
        self.update(kept)
        self.used += size

    def keep_one(self, key: K, value: V) -> None:
        """``keep({key: value})`` without building a mapping (one item per message)."""
        if len(key) > self.longest:
            return
        size = self._cost(key, value)
        old = self.get(key)
        replaced = 0 if old is None else self._cost(key, old)
        if len(self) + 1 > self.entries or self.used - replaced + size > self.budget:
            self.clear()
        else:
            self.used -= replaced
        self[key] = value
        self.used += size

    def _cost(self, key: K, value: V) -> int:
        return getsizeof(key) + self._size(value) + ENTRY_OVERHEAD

    def clear(self) -> None:
        super().clear()
        self.used = 0


def probed_key(about: bytes, data: bytes, probe: int) -> bytes:
    """A short key for long ``data`` described by ``about``: both lengths, ``about``, and
    ``data`` itself when at most ``2 * probe`` bytes long, else its first and last ``probe``
    bytes.  Unambiguous (the lengths say where each part ends), but not unique: a cache keyed
    by it keeps ``data`` and counts a hit only when the whole of it is equal too."""
    probed = data if len(data) <= 2 * probe else data[:probe] + data[-probe:]
    return b"%d %d " % (len(about), len(data)) + about + probed


T = TypeVar("T")


class IdentityCache(Generic[T, V]):
    """Values by the identity of an object, which is kept (so its ``id`` is not reused while
    its entry lives): a read costs no hash of the object's contents.  Meant for objects
    another cache hands out again (the same ``str`` for a repeated part, :mod:`.mime`).  At
    most ``entries`` items and about ``budget`` in all (``size`` of the object and its value,
    plus a per-entry overhead); emptied first when a new item would pass a limit, and an item
    bigger than the whole budget is not kept."""

    def __init__(self, entries: int, budget: int, size: Callable[[T, V], int]) -> None:
        self.entries, self.budget = entries, budget
        self._size = size
        self._items: dict[int, tuple[T, V]] = {}
        self.used = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: T) -> V | None:
        found = self._items.get(id(key))
        return found[1] if found is not None and found[0] is key else None

    def keep(self, key: T, value: V) -> None:
        size = self._size(key, value) + ENTRY_OVERHEAD
        if size > self.budget:
            return
        if len(self._items) + 1 > self.entries or self.used + size > self.budget:
            self.clear()
        self._items[id(key)] = (key, value)
        self.used += size

    def clear(self) -> None:
        self._items.clear()
        self.used = 0
