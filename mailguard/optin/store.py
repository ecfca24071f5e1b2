"""``OptInStore``: confirmed opt-in records in Redis, on a ``RedisStore``'s connection.

Responsible for: keeping opt-in records per customer, list and recipient; answering
``has_confirmed`` for a whole message's recipients in one round trip (HMGET: it runs at end of
DATA for bulk mail); importing idempotently and revoking at once, each write a compare-and-set
Lua script (``lua/optin_write.lua``) so concurrent imports, adds and revocations never lose one
another's changes; turning every Redis failure into ``StoreError`` (through ``RedisStore.run``:
bounded by ``[store] timeout``, password hidden).
Must never: read a clock (times come in as arguments), decide policy, or let a Redis
exception escape.

Key layout (names built by ``mailguard.store.keys.Keys.customer_key``, so the prefix, the
customer's hash tag and the escaping are the store's)::

    {prefix}:{{customer}}:cust:optin:default          hash  recipient -> record JSON, for
                                                            mail without List-Id
    {prefix}:{{customer}}:cust:optin:list:{list_id}   hash  the same, for one List-Id
    {prefix}:{{customer}}:cust:optin:lists            set   the customer's list ids ("" for
                                                            the default list), for export

e.g. ``mg:{acme}:cust:optin:list:news.example.com``.  All keys of one customer share its hash
tag, so the write script runs unchanged on Redis Cluster.  Values are ``OptInRecord.to_json``.

Expiry: every key gets one (ARCHITECTURE: every key written expires), here a long retention,
``retention`` seconds (default 10 years), refreshed on every write to the list (an import that
changes nothing refreshes it too).  The AUP wants the confirmation kept for as long as the list
exists; a list untouched for the whole retention period is taken as gone.  Reads (the hot path)
never refresh it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from typing import Any, Final, TypeVar

from mailguard.optin.records import (
    FieldError,
    Format,
    OptInRecord,
    Outcome,
    format_line,
    header_line,
    is_active_json,
    lookup_form,
    merge,
    normalize_list_id,
    normalize_recipient,
)
from mailguard.store.base import StoreError
from mailguard.store.redis_store import RedisStore

T = TypeVar("T")

YEAR: Final = 365.25 * 24 * 3600.0
DEFAULT_RETENTION: Final = 10 * YEAR
IMPORT_BATCH: Final = 500  # records per script call (keeps each call short for Redis)
SCAN_COUNT: Final = 1000
MAX_ATTEMPTS: Final = 20  # compare-and-set retries under concurrent writes to the same records

KIND: Final = "optin"


@cache
def _lua(name: str) -> str:
    return resources.files("mailguard.optin").joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass
class ImportReport:
    """Counts of what an import did, and the records it did not write (with why)."""

    added: int = 0
    updated: int = 0
    unchanged: int = 0
    kept: int = 0  # differ from the stored record, which was kept (import without replace)
    kept_revoked: int = 0  # revoked after this confirmation: the unsubscribe stands
    not_written: list[tuple[Outcome, OptInRecord]] = field(default_factory=list)

    def count(self, outcome: Outcome, record: OptInRecord) -> None:
        setattr(self, outcome.value, getattr(self, outcome.value) + 1)
        if outcome in (Outcome.KEPT, Outcome.KEPT_REVOKED):
            self.not_written.append((outcome, record))

    @property
    def total(self) -> int:
        return self.added + self.updated + self.unchanged + self.kept + self.kept_revoked


@dataclass(frozen=True, slots=True)
class Revocation:
    """The result of ``revoke``: the record now stored (``None``: there was none), and whether
    this call revoked it (``False`` when it already was)."""

    record: OptInRecord | None
    changed: bool


class OptInStore:
    """Opt-in records on the connection of a ``RedisStore`` (see the module docstring).

    Every method raises ``StoreError`` when Redis fails or times out, and ``ValueError``
    (``FieldError``) for arguments that are not valid, before touching Redis.
    """

    def __init__(
        self,
        store: RedisStore,
        *,
        retention: float = DEFAULT_RETENTION,
        batch: int = IMPORT_BATCH,
    ) -> None:
        if not (math.isfinite(retention) and retention >= 1):
            raise ValueError(f"retention must be at least 1 second, not {retention!r}")
        if batch < 1:
            raise ValueError(f"batch must be positive, not {batch!r}")
        self._store = store
        self._redis = store.client
        self._retention_ms = str(math.ceil(retention * 1000))
        self._batch = batch
        self._write = store.script(_lua("optin_write"))

    # -- key names ----------------------------------------------------------------------------

    def list_key(self, customer: str, list_id: str) -> str:
        """The hash of one list's records (``list_id`` normalized; ``""`` the default list)."""
        if list_id:
            return self._store.keys.customer_key(customer, KIND, "list", list_id)
        return self._store.keys.customer_key(customer, KIND, "default")

    def lists_key(self, customer: str) -> str:
        """The set of the customer's list ids."""
        return self._store.keys.customer_key(customer, KIND, "lists")

    # -- reads ----------------------------------------------------------------------------------

    async def has_confirmed(
        self, customer: str, list_id: str, recipients: Sequence[str]
    ) -> list[bool]:
        """For each recipient (as given in RCPT TO), whether an active record confirms it.

        One HMGET.  ``list_id`` may be a raw ``List-Id`` header value; one that is not valid,
        like a recipient that is not a valid address, matches no record (``False``).
        """
        try:
            list_id = normalize_list_id(list_id)
        except FieldError:
            return [False] * len(recipients)
        forms = [lookup_form(r) for r in recipients]
        fields = list(dict.fromkeys(f for f in forms if f is not None))
        if not fields:
            return [False] * len(recipients)
        key = self.list_key(customer, list_id)
        values = await self._hmget("optin has_confirmed", key, fields)
        active: dict[str, bool] = {}
        for name, raw in zip(fields, values, strict=True):
            if raw is not None:
                try:
                    active[name] = is_active_json(raw)
                except ValueError as exc:
                    raise self._corrupt(key, name, exc) from None
        return [f is not None and active.get(f, False) for f in forms]

    async def get(self, customer: str, list_id: str, recipient: str) -> OptInRecord | None:
        """The stored record (active or revoked) of ``recipient`` in a list, or ``None``."""
        list_id = normalize_list_id(list_id)
        recipient = normalize_recipient(recipient)
        key = self.list_key(customer, list_id)
        (raw,) = await self._hmget("optin get", key, [recipient])
        return None if raw is None else self._decode(customer, list_id, key, recipient, raw)

    async def find(self, customer: str, recipient: str) -> list[OptInRecord]:
        """The records of ``recipient`` in every list of the customer (by list id)."""
        recipient = normalize_recipient(recipient)
        found = []
        for list_id in await self.lists(customer):
            record = await self.get(customer, list_id, recipient)
            if record is not None:
                found.append(record)
        return found

    async def lists(self, customer: str) -> list[str]:
        """The customer's list ids, sorted (``""``, the default list, first)."""
        key = self.lists_key(customer)
        members = await self._store.run("optin lists", lambda: self._redis.smembers(key))
        return sorted(_text(m) for m in members)

    async def iterate(
        self, customer: str, list_id: str | None = None
    ) -> AsyncIterator[OptInRecord]:
        """Every stored record (revoked ones too) of one list, or of all lists (``None``).

        Lists in ``lists()`` order, records in the store's order; pages of HSCAN, so a large
        list is never held in memory at once (only the recipients seen, to drop repeats).
        """
        lists = [normalize_list_id(list_id)] if list_id is not None else await self.lists(customer)
        for name in lists:
            key = self.list_key(customer, name)
            seen: set[bytes] = set()
            cursor = 0
            while True:
                cursor, page = await self._hscan(key, cursor)
                for raw_field, raw in page.items():
                    if raw_field in seen:
                        continue
                    seen.add(raw_field)
                    yield self._decode(customer, name, key, _text(raw_field), raw)
                if cursor == 0:
                    break

    async def export(
        self, customer: str, list_id: str | None = None, fmt: Format = "csv"
    ) -> AsyncIterator[str]:
        """The lines of a ``fmt`` file with ``iterate``'s records (importable again)."""
        header = header_line(fmt)
        if header:
            yield header
        async for record in self.iterate(customer, list_id):
            yield format_line(record, fmt)

    # -- writes ---------------------------------------------------------------------------------

    async def add(self, record: OptInRecord) -> Outcome:
        """Store one record, replacing a different one (but never undoing a later unsubscribe:
        ``records.merge``).  Returns what happened."""
        report = await self.import_records([record], replace=True)
        for outcome in Outcome:
            if getattr(report, outcome.value):
                return outcome
        raise AssertionError("import of one record counted nothing")  # pragma: no cover

    async def import_records(
        self, records: Iterable[OptInRecord], *, replace: bool
    ) -> ImportReport:
        """Store ``records`` (any customers and lists) by ``records.merge``; idempotent.

        Every record is checked (``check_normalized``) before anything is written.  Records
        are written in batches of one list each, a batch atomically; a failure part-way leaves
        the earlier batches written, and running the import again completes it.
        """
        pending = list(records)
        for record in pending:
            record.check_normalized()
        report = ImportReport()
        for customer, list_id, chunk in _chunks(pending, self._batch):
            for outcome, record in await self._write_chunk(customer, list_id, chunk, replace):
                report.count(outcome, record)
        return report

    async def revoke(self, customer: str, list_id: str, recipient: str, at: datetime) -> Revocation:
        """Revoke the record of ``recipient`` (an unsubscribe), effective for the next lookup.

        The record is kept, with ``revoked_at`` = ``at`` (not before its ``confirmed_at``).  An
        already revoked record keeps its first revocation time.
        """
        if at.utcoffset() is None:
            raise ValueError("revoke: 'at' must be a datetime with a time zone")
        list_id = normalize_list_id(list_id)
        recipient = normalize_recipient(recipient)
        key = self.list_key(customer, list_id)
        for _ in range(MAX_ATTEMPTS):
            (raw,) = await self._hmget("optin revoke", key, [recipient])
            if raw is None:
                return Revocation(None, False)
            record = self._decode(customer, list_id, key, recipient, raw)
            if not record.active:
                return Revocation(record, False)
            revoked = dataclasses.replace(record, revoked_at=max(at, record.confirmed_at))
            if not await self._cas("optin revoke", customer, list_id, [(recipient, raw, revoked)]):
                return Revocation(revoked, True)
        raise self._contention("optin revoke")

    # -- internals ------------------------------------------------------------------------------

    async def _write_chunk(
        self, customer: str, list_id: str, chunk: list[OptInRecord], replace: bool
    ) -> list[tuple[Outcome, OptInRecord]]:
        key = self.list_key(customer, list_id)
        recipients = [r.recipient for r in chunk]
        for _ in range(MAX_ATTEMPTS):
            current = await self._hmget("optin import", key, recipients)
            results: list[tuple[Outcome, OptInRecord]] = []
            writes: list[tuple[str, bytes | None, OptInRecord]] = []
            for record, raw in zip(chunk, current, strict=True):
                stored = (
                    None
                    if raw is None
                    else self._decode(customer, list_id, key, record.recipient, raw)
                )
                outcome, new = merge(stored, record, replace=replace)
                results.append((outcome, record))
                if new is not None:
                    writes.append((record.recipient, raw, new))
            if not await self._cas("optin import", customer, list_id, writes):
                return results
        raise self._contention("optin import")

    async def _cas(
        self,
        operation: str,
        customer: str,
        list_id: str,
        writes: Sequence[tuple[str, bytes | None, OptInRecord]],
    ) -> list[int]:
        """Run the write script; the numbers of the writes whose expected value was stale."""
        keys = [self.list_key(customer, list_id), self.lists_key(customer)]
        args: list[str | bytes] = [list_id, self._retention_ms]
        for recipient, expected, record in writes:
            args += [recipient, b"" if expected is None else expected, record.to_json()]
        result = await self._store.run(operation, lambda: self._write(keys=keys, args=args))
        return [int(n) for n in result]

    async def _hmget(self, operation: str, key: str, fields: list[str]) -> list[bytes | None]:
        result: list[bytes | str | None] = await self._store.run(
            operation, _call(self._redis.hmget, key, fields)
        )
        return [_bytes(v) if v is not None else None for v in result]

    async def _hscan(self, key: str, cursor: int) -> tuple[int, dict[bytes, bytes]]:
        cursor, page = await self._store.run(
            "optin export", _call(self._redis.hscan, key, cursor, count=SCAN_COUNT)
        )
        if not isinstance(page, dict):  # pragma: no cover  (only with no_values=True)
            raise StoreError(f"store {self._store.url}: optin export: HSCAN returned no values")
        return int(cursor), {_bytes(k): _bytes(v) for k, v in page.items()}

    def _decode(
        self, customer: str, list_id: str, key: str, recipient: str, raw: bytes
    ) -> OptInRecord:
        try:
            return OptInRecord.from_json(customer, list_id, raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise self._corrupt(key, recipient, exc) from None

    def _corrupt(self, key: str, recipient: str, exc: Exception) -> StoreError:
        return StoreError(
            f"store {self._store.url}: opt-in record of {recipient!r} in {key} is corrupt: {exc}"
        )

    def _contention(self, operation: str) -> StoreError:
        return StoreError(
            f"store {self._store.url}: {operation}: the records kept changing under concurrent "
            f"writes ({MAX_ATTEMPTS} attempts); try again"
        )


def _call(
    function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any
) -> Callable[[], Awaitable[T]]:
    return lambda: function(*args, **kwargs)


def _bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _chunks(
    records: Sequence[OptInRecord], size: int
) -> Iterator[tuple[str, str, list[OptInRecord]]]:
    """Batches of at most ``size`` records of one customer and list, in input order per list;
    a recipient repeated in the input starts a new batch, so the later record is merged over
    the earlier one as if they had been imported one after the other."""
    current: dict[tuple[str, str], dict[str, OptInRecord]] = {}
    for record in records:
        group = (record.customer, record.list_id)
        batch = current.setdefault(group, {})
        if record.recipient in batch or len(batch) >= size:
            yield *group, list(batch.values())
            batch = current[group] = {}
        batch[record.recipient] = record
    for group, batch in current.items():
        if batch:
            yield *group, list(batch.values())
