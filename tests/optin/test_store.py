"""``OptInStore`` against a real redis-server (the session's, flushed per test).

Times are passed in; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import Redis

from mailguard.optin.records import (
    FieldError,
    Format,
    OptInRecord,
    Outcome,
    parse_file,
)
from mailguard.optin.store import DEFAULT_RETENTION, OptInStore
from mailguard.store.base import StoreError
from mailguard.store.redis_store import RedisStore

NOW = datetime(2025, 1, 1, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
LIST = "news.example.com"


def rec(recipient: str = "bob@example.org", **changes: object) -> OptInRecord:
    base = OptInRecord(
        customer="acme",
        recipient=recipient,
        confirmed_at=T1,
        source_ip="192.0.2.1",
        evidence=f"<confirm.{recipient}>",
        imported_at=NOW,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


@pytest.fixture
def optin(store: RedisStore) -> OptInStore:
    return OptInStore(store)


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_add_get(optin: OptInStore) -> None:
    bob = rec()
    assert await optin.get("acme", "", "bob@example.org") is None
    assert await optin.add(bob) is Outcome.ADDED
    assert await optin.get("acme", "", "bob@EXAMPLE.org") == bob
    assert await optin.get("acme", LIST, "bob@example.org") is None  # another list
    assert await optin.get("other", "", "bob@example.org") is None  # another customer
    assert await optin.add(dataclasses.replace(bob, imported_at=NOW + timedelta(1))) is (
        Outcome.UNCHANGED
    )
    changed = dataclasses.replace(bob, evidence="<other@x>")
    assert await optin.add(changed) is Outcome.UPDATED
    assert await optin.get("acme", "", "bob@example.org") == changed


async def test_key_layout_and_retention(optin: OptInStore, raw: Redis) -> None:
    await optin.add(rec(list_id=LIST))
    await optin.add(rec())
    keys = sorted(k.decode() if isinstance(k, bytes) else k for k in await raw.keys("*"))
    assert keys == [
        "mg:{acme}:cust:optin:default",
        "mg:{acme}:cust:optin:list:news.example.com",
        "mg:{acme}:cust:optin:lists",
    ]
    for key in keys:
        ttl = await raw.pttl(key)
        assert DEFAULT_RETENTION * 1000 - 60_000 < ttl <= DEFAULT_RETENTION * 1000
    assert await raw.smembers("mg:{acme}:cust:optin:lists") == {b"", LIST.encode()}


async def test_retention_is_configurable_and_refreshed_on_write(
    store: RedisStore, raw: Redis
) -> None:
    optin = OptInStore(store, retention=3600)
    await optin.add(rec())
    key = optin.list_key("acme", "")
    assert 3_590_000 < await raw.pttl(key) <= 3_600_000
    await raw.pexpire(key, 1000)
    await optin.import_records([rec()], replace=False)  # unchanged, but the list was touched
    assert await raw.pttl(key) > 3_590_000
    await raw.pexpire(key, 1000)
    await optin.has_confirmed("acme", "", ["bob@example.org"])  # reads never refresh
    assert await raw.pttl(key) <= 1000


async def test_has_confirmed_batch(optin: OptInStore, store: RedisStore) -> None:
    people = [f"user{i}@example.org" for i in range(100)]
    report = await optin.import_records([rec(p, list_id=LIST) for p in people], replace=False)
    assert report.added == 100
    await optin.add(rec("Mixed.Case@bücher.example", list_id=LIST))
    asked = [
        *people,
        "nobody@example.org",
        "USER1@example.org",  # local parts are not folded
        "user2@EXAMPLE.ORG",  # domains are
        "Mixed.Case@xn--bcher-kva.example",
        "not an address",
        "user3@example.org",  # repeated
    ]
    calls = 0
    original = store.run

    async def counting(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "run", counting)
        answer = await optin.has_confirmed("acme", f"Our News <{LIST.upper()}>", asked)
    assert calls == 1  # one round trip for the whole message
    assert answer == [True] * 100 + [False, False, True, True, False, True]
    assert await optin.has_confirmed("acme", "", people[:3]) == [False] * 3  # default list
    assert await optin.has_confirmed("acme", "not a list id", people[:1]) == [False]
    assert await optin.has_confirmed("acme", LIST, []) == []


async def test_revoke_takes_effect_at_once_and_keeps_the_evidence(optin: OptInStore) -> None:
    await optin.add(rec())
    assert await optin.has_confirmed("acme", "", ["bob@example.org"]) == [True]
    result = await optin.revoke("acme", "", "bob@EXAMPLE.org", NOW)
    assert result.changed
    assert result.record == rec(revoked_at=NOW)
    assert await optin.has_confirmed("acme", "", ["bob@example.org"]) == [False]
    assert await optin.get("acme", "", "bob@example.org") == rec(revoked_at=NOW)
    again = await optin.revoke("acme", "", "bob@example.org", NOW + timedelta(days=1))
    assert (again.changed, again.record) == (False, rec(revoked_at=NOW))  # the first time stays
    missing = await optin.revoke("acme", "", "carol@example.org", NOW)
    assert (missing.changed, missing.record) == (False, None)
    # a revocation before the confirmation (clock skew) is clamped to the confirmation
    await optin.add(rec("dave@example.org"))
    early = await optin.revoke("acme", "", "dave@example.org", T1 - timedelta(days=1))
    assert early.record is not None and early.record.revoked_at == T1
    with pytest.raises(ValueError, match="time zone"):
        await optin.revoke("acme", "", "bob@example.org", datetime(2025, 1, 1))


async def test_an_older_confirmation_never_undoes_an_unsubscribe(optin: OptInStore) -> None:
    await optin.add(rec())
    await optin.revoke("acme", "", "bob@example.org", NOW)
    report = await optin.import_records([rec()], replace=True)
    assert (report.kept_revoked, report.not_written) == (1, [(Outcome.KEPT_REVOKED, rec())])
    assert await optin.add(rec(imported_at=NOW + timedelta(1))) is Outcome.KEPT_REVOKED
    assert await optin.has_confirmed("acme", "", ["bob@example.org"]) == [False]
    renewed = rec(confirmed_at=NOW + timedelta(hours=1))
    assert await optin.add(renewed) is Outcome.UPDATED  # a new confirmation: subscribed again
    assert await optin.has_confirmed("acme", "", ["bob@example.org"]) == [True]


async def test_import_is_idempotent_and_reports(optin: OptInStore, raw: Redis) -> None:
    first = [rec(f"u{i}@example.org") for i in range(5)]
    report = await optin.import_records(first, replace=False)
    assert (report.added, report.updated, report.unchanged, report.kept) == (5, 0, 0, 0)
    snapshot = await raw.hgetall(optin.list_key("acme", ""))
    later = [dataclasses.replace(r, imported_at=NOW + timedelta(days=1)) for r in first]
    report = await optin.import_records(later, replace=False)
    assert (report.added, report.updated, report.unchanged, report.kept) == (0, 0, 5, 0)
    assert await raw.hgetall(optin.list_key("acme", "")) == snapshot  # not even imported_at
    changed = [dataclasses.replace(first[0], evidence="<new@x>"), rec("new@example.org")]
    report = await optin.import_records(changed, replace=False)
    assert (report.added, report.updated, report.unchanged, report.kept) == (1, 0, 0, 1)
    assert await optin.get("acme", "", "u0@example.org") == first[0]
    report = await optin.import_records(changed, replace=True)
    assert (report.added, report.updated, report.unchanged, report.kept) == (0, 1, 1, 0)
    assert await optin.get("acme", "", "u0@example.org") == changed[0]


async def test_import_batches_lists_and_repeats(store: RedisStore) -> None:
    optin = OptInStore(store, batch=3)
    records = [rec(f"u{i}@example.org", list_id=LIST if i % 2 else "") for i in range(10)]
    # the same recipient twice: applied in order, as two imports would be
    records.append(dataclasses.replace(records[0], evidence="<second@x>"))
    report = await optin.import_records(records, replace=True)
    assert (report.added, report.updated) == (10, 1)
    assert (await optin.get("acme", "", "u0@example.org")) == records[-1]
    assert await optin.lists("acme") == ["", LIST]


async def test_import_checks_every_record_before_writing(optin: OptInStore, raw: Redis) -> None:
    bad = rec(recipient="Bob@EXAMPLE.org")  # not normalized
    with pytest.raises(FieldError, match="recipient"):
        await optin.import_records([rec(), bad], replace=False)
    assert await raw.keys("*") == []


async def test_export_round_trip(optin: OptInStore, redis_url: str) -> None:
    records = [rec(f"u{i}@example.org") for i in range(30)]
    records += [rec(f"v{i}@bücher.example", list_id=LIST, requested_at=T1) for i in range(1200)]
    await optin.import_records(records, replace=False)
    await optin.revoke("acme", LIST, "v7@bücher.example", NOW)
    stored = {(r.list_id, r.recipient): r async for r in optin.iterate("acme")}
    assert len(stored) == 1230
    default = [r async for r in optin.iterate("acme", "")]
    assert sorted(r.recipient for r in default) == sorted(f"u{i}@example.org" for i in range(30))
    assert [r async for r in optin.iterate("other")] == []
    formats: tuple[Format, ...] = ("csv", "jsonl")
    for fmt in formats:
        text = "".join([line async for line in optin.export("acme", None, fmt)])
        parsed = parse_file(text, fmt=fmt, source="x", customer="acme", imported_at=NOW)
        assert {(r.list_id, r.recipient): r for r in parsed.records} == stored
        # ... and into an empty store and out again
        other = RedisStore(redis_url, key_prefix=f"copy{fmt}")
        try:
            copy = OptInStore(other)
            report = await copy.import_records(parsed.records, replace=False)
            assert report.added == 1230
            assert {(r.list_id, r.recipient): r async for r in copy.iterate("acme")} == stored
        finally:
            await other.close()


async def test_concurrent_revoke_and_import_lose_nothing(optin: OptInStore) -> None:
    people = [f"u{i}@example.org" for i in range(200)]
    await optin.import_records([rec(p) for p in people], replace=False)
    updated = [dataclasses.replace(rec(p), evidence="<v2@x>") for p in people]
    revokes = [optin.revoke("acme", "", p, NOW) for p in people[::2]]
    await asyncio.gather(optin.import_records(updated, replace=True), *revokes)
    answers = await optin.has_confirmed("acme", "", people)
    # every revocation stands whatever the interleaving (the import never overwrites it with
    # an older confirmation, and a revocation never writes over a record it did not read)
    assert answers == [i % 2 == 1 for i in range(200)]
    for p in people[1::2]:
        record = await optin.get("acme", "", p)
        assert record is not None and record.evidence == "<v2@x>"


async def test_store_failures_become_store_error(redis_url: str) -> None:
    store = RedisStore(redis_url)
    optin = OptInStore(store)
    await store.close()
    with pytest.raises(StoreError):
        await optin.has_confirmed("acme", "", ["bob@example.org"])
    with pytest.raises(StoreError):
        await optin.add(rec())


async def test_corrupt_record_is_a_store_error(optin: OptInStore, raw: Redis) -> None:
    await raw.hset(optin.list_key("acme", ""), "bob@example.org", "{not json")
    with pytest.raises(StoreError, match="corrupt"):
        await optin.has_confirmed("acme", "", ["bob@example.org"])
    with pytest.raises(StoreError, match="corrupt"):
        await optin.get("acme", "", "bob@example.org")


def test_bad_parameters(redis_url: str) -> None:
    store = RedisStore(redis_url)
    with pytest.raises(ValueError, match="retention"):
        OptInStore(store, retention=0)
    with pytest.raises(ValueError, match="batch"):
        OptInStore(store, batch=0)


async def test_import_rereads_a_record_changed_between_read_and_write(
    optin: OptInStore, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await optin.add(rec())
    key = optin.list_key("acme", "")
    original = optin._hmget
    reads = 0

    async def racing(operation: str, key_: str, fields: list[str]) -> list[bytes | None]:
        nonlocal reads
        values = await original(operation, key_, fields)
        reads += 1
        if reads == 1:  # an unsubscribe lands between the import's read and its write
            await raw.hset(key, "bob@example.org", rec(revoked_at=NOW).to_json())
        return values

    monkeypatch.setattr(optin, "_hmget", racing)
    report = await optin.import_records([rec(evidence="<v2@x>")], replace=True)
    assert reads == 2
    assert report.kept_revoked == 1
    assert await optin.get("acme", "", "bob@example.org") == rec(revoked_at=NOW)


async def test_revoke_rereads_a_record_changed_between_read_and_write(
    optin: OptInStore, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    await optin.add(rec())
    key = optin.list_key("acme", "")
    original = optin._hmget
    reads = 0

    async def racing(operation: str, key_: str, fields: list[str]) -> list[bytes | None]:
        nonlocal reads
        values = await original(operation, key_, fields)
        reads += 1
        if reads == 1:  # an import replaces the record between the revoke's read and write
            await raw.hset(key, "bob@example.org", rec(evidence="<v2@x>").to_json())
        return values

    monkeypatch.setattr(optin, "_hmget", racing)
    result = await optin.revoke("acme", "", "bob@example.org", NOW)
    assert reads == 2
    assert result.record == rec(evidence="<v2@x>", revoked_at=NOW)
    assert await optin.get("acme", "", "bob@example.org") == result.record
