"""Contract tests for ``RedisStore`` against a real redis-server (shared and embedded).

Time is injected: no test sleeps to move a window.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mailguard.config.schema import StoreConfig
from mailguard.store.base import Store, StoreError
from mailguard.store.factory import open_store
from mailguard.store.keys import Keys
from mailguard.store.redis_store import RedisStore, StoreURL, lua_script, redact_url
from tests.conftest import RedisServer, free_cluster_port, redis_server_binary

NOW = 1_700_000_000.0
WINDOW = 900.0
CLIENT = "192.0.2.1"


@pytest.fixture(params=["server", "embedded"])
async def store(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: Path
) -> AsyncIterator[RedisStore]:
    """The same scenarios on a RedisStore over a URL and over the embedded child."""
    if request.param == "server":
        config = StoreConfig(url=redis_url)
    else:
        config = StoreConfig(url="embedded", redis_server=redis_server_binary())
    opened = await open_store(config, tmp_path)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def raw(store: RedisStore) -> AsyncIterator[Redis]:
    """A plain client on the same server as ``store``, for looking behind the interface."""
    client = Redis.from_url(store.url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_redis_store_is_a_store(redis_url: str) -> None:
    store: Store = RedisStore(redis_url)  # mypy checks the protocol here
    await store.close()


async def test_ping(store: RedisStore) -> None:
    await store.ping()


async def test_sliding_window_counts(store: RedisStore) -> None:
    assert await store.auth_failures(CLIENT, NOW, 10) == 0
    assert await store.note_auth_failure(CLIENT, NOW, 10) == 1
    assert await store.note_auth_failure(CLIENT, NOW + 1, 10) == 2
    assert await store.note_auth_failure(CLIENT, NOW + 2, 10) == 3
    assert await store.auth_failures(CLIENT, NOW + 9.5, 10) == 3
    # The window is (now - window, now]: a failure exactly ``window`` ago has left it.
    assert await store.auth_failures(CLIENT, NOW + 10, 10) == 2
    assert await store.auth_failures(CLIENT, NOW + 11.5, 10) == 1
    assert await store.auth_failures(CLIENT, NOW + 12, 10) == 0
    # Old entries are trimmed on write and do not count again.
    assert await store.note_auth_failure(CLIENT, NOW + 11, 10) == 2
    assert await store.note_auth_failure(CLIENT, NOW + 100, 10) == 1


async def test_count_is_limited_to_now(store: RedisStore) -> None:
    """Entries later than ``now`` (another process's clock ahead) are not in the window."""
    await store.note_auth_failure(CLIENT, NOW + 5, WINDOW)
    assert await store.auth_failures(CLIENT, NOW, WINDOW) == 0
    assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
    assert await store.auth_failures(CLIENT, NOW + 5, WINDOW) == 2


async def test_equal_timestamps_are_distinct_failures(store: RedisStore) -> None:
    counts = [await store.note_auth_failure(CLIENT, NOW, WINDOW) for _ in range(5)]
    assert counts == [1, 2, 3, 4, 5]


async def test_full_precision_of_epoch_timestamps(store: RedisStore) -> None:
    """Sub-millisecond times near today's epoch survive (Lua's tostring would keep 14 digits)."""
    await store.note_auth_failure(CLIENT, NOW + 0.00001, 10)
    assert await store.auth_failures(CLIENT, NOW + 10.000005, 10) == 1
    assert await store.auth_failures(CLIENT, NOW + 10.00002, 10) == 0


async def test_clients_are_counted_separately(store: RedisStore) -> None:
    await store.note_auth_failure("192.0.2.1", NOW, WINDOW)
    await store.note_auth_failure("2001:db8::1", NOW, WINDOW)
    assert await store.note_auth_failure("2001:DB8:0::1", NOW, WINDOW) == 2
    assert await store.auth_failures("192.0.2.1", NOW, WINDOW) == 1
    assert await store.auth_failures("192.0.2.2", NOW, WINDOW) == 0


async def test_every_key_written_expires(store: RedisStore, raw: Redis) -> None:
    await store.note_auth_failure("192.0.2.1", NOW, WINDOW)
    await store.note_auth_failure("192.0.2.2", NOW, 30.0001)
    await store.note_auth_failure("2001:db8::1", NOW, 86400 * 7)
    keys = [key async for key in raw.scan_iter()]
    assert len(keys) == 3
    for key in keys:
        assert await raw.pttl(key) > 0, key
    assert 0 < await raw.pttl(store.keys.auth_failures("192.0.2.1")) <= WINDOW * 1000


async def test_reads_write_nothing(store: RedisStore, raw: Redis) -> None:
    assert await store.auth_failures(CLIENT, NOW, WINDOW) == 0
    assert await raw.dbsize() == 0


async def test_keys_use_the_configured_layout(store: RedisStore, raw: Redis) -> None:
    await store.note_auth_failure(CLIENT, NOW, WINDOW)
    assert [key async for key in raw.scan_iter()] == [Keys("mg").auth_failures(CLIENT).encode()]


async def test_concurrent_failures_each_see_a_distinct_count(store: RedisStore) -> None:
    counts = await asyncio.gather(
        *(store.note_auth_failure(CLIENT, NOW, WINDOW) for _ in range(200))
    )
    assert sorted(counts) == list(range(1, 201))
    assert await store.auth_failures(CLIENT, NOW, WINDOW) == 200


async def test_a_retried_script_call_counts_once(store: RedisStore, raw: Redis) -> None:
    """The unique member makes a client-side retry of the same call idempotent."""
    script = raw.register_script(lua_script("auth_failure"))
    key = store.keys.auth_failures(CLIENT)
    args = [repr(NOW), repr(WINDOW), "same-id"]
    assert await script(keys=[key], args=args) == 1
    assert await script(keys=[key], args=args) == 1


async def test_scripts_are_reloaded_after_script_flush(store: RedisStore, raw: Redis) -> None:
    assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
    await raw.script_flush()
    assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 2
    assert await store.auth_failures(CLIENT, NOW, WINDOW) == 2


async def test_redis_errors_become_store_errors(store: RedisStore, raw: Redis) -> None:
    await raw.set(store.keys.auth_failures(CLIENT), "not a sorted set")
    with pytest.raises(StoreError, match=r"note_auth_failure failed: .*WRONGTYPE"):
        await store.note_auth_failure(CLIENT, NOW, WINDOW)


@pytest.mark.parametrize("window", [0.0, -1.0, float("nan"), float("inf")])
async def test_bad_window_is_a_programming_error(store: RedisStore, window: float) -> None:
    with pytest.raises(ValueError, match="window"):
        await store.note_auth_failure(CLIENT, NOW, window)
    with pytest.raises(ValueError, match="window"):
        await store.auth_failures(CLIENT, NOW, window)


async def test_closed_store_raises_store_error(redis_url: str) -> None:
    store = RedisStore(redis_url)
    await store.close()
    await store.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        await store.ping()


# -- outages ---------------------------------------------------------------------------------


async def test_stopped_server_fails_fast(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=1.0)
    try:
        redis_server.stop()
        calls: list[Callable[[], Awaitable[object]]] = [
            store.ping,
            lambda: store.note_auth_failure(CLIENT, NOW, WINDOW),
            lambda: store.auth_failures(CLIENT, NOW, WINDOW),
        ]
        for call in calls:
            started = time.monotonic()
            with pytest.raises(StoreError, match=f"store {redis_url}: .* failed"):
                await call()
            assert time.monotonic() - started < 0.5
    finally:
        await store.close()
        redis_server.start()


async def test_hung_server_times_out(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=0.3)
    try:
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"note_auth_failure timed out after 0\.3s"):
            await store.note_auth_failure(CLIENT, NOW, WINDOW)
        assert 0.25 < time.monotonic() - started < 1.0
    finally:
        redis_server.resume()
        await store.close()


async def test_recovers_after_restart(redis_server: RedisServer, redis_url: str) -> None:
    store = RedisStore(redis_url, timeout=1.0)
    try:
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
        redis_server.stop()
        with pytest.raises(StoreError):
            await store.ping()
        redis_server.start()
        await store.ping()
        # A restart between two calls: the pooled connection is stale and the script cache
        # empty; the first call still succeeds (reconnect and reload, no error surfaces).
        redis_server.stop()
        redis_server.start()
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
    finally:
        await store.close()


async def test_error_text_hides_the_password() -> None:
    store = RedisStore("redis://user:s3cret@127.0.0.1:1/0", timeout=0.5)
    try:
        with pytest.raises(StoreError) as caught:
            await store.ping()
    finally:
        await store.close()
    assert "s3cret" not in str(caught.value)
    assert "store redis://user:***@127.0.0.1:1/0: ping failed" in str(caught.value)


# -- URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/0"),
        ("redis://:pw@host:1/2", "redis://:***@host:1/2"),
        ("rediss://u:p:w@host:1", "rediss://u:***@host:1"),
        ("unix:///run/r.sock?db=1&password=pw", "unix:///run/r.sock?db=1&password=***"),
        ("redis://u@host", "redis://u@host"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_store_url_cluster_parameter() -> None:
    parsed = StoreURL.parse("redis://:pw@host:7000?cluster=1&socket_keepalive=yes")
    assert parsed.cluster
    assert parsed.url == "redis://:pw@host:7000?socket_keepalive=yes"
    assert parsed.display == "redis://:***@host:7000?cluster=1&socket_keepalive=yes"
    assert not StoreURL.parse("redis://host?cluster=0").cluster
    assert StoreURL.parse("unix:///x.sock").url == "unix:///x.sock"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://host", "must be redis://, rediss://, unix://"),
        ("localhost:6379", "must be redis://, rediss://, unix://"),
        ("redis://host?cluster=maybe", "cluster='maybe' must be 1 or 0"),
        ("unix:///x.sock?cluster=1", "cluster=1 needs redis://"),
        ("redis://host?db=x", "Invalid value for 'db'"),
        ("unix:///x.sock?foo=1", "unexpected keyword argument 'foo'"),
        ("redis://host?foo=1&cluster=1", "unexpected keyword argument 'foo'"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RedisStore(url)


# -- the factory -----------------------------------------------------------------------------


async def test_open_store_on_a_url(redis_url: str, tmp_path: Path) -> None:
    store = await open_store(StoreConfig(url=redis_url, timeout=0.7, key_prefix="t"), tmp_path)
    try:
        assert store.timeout == 0.7
        assert store.keys.prefix == "t"
        assert not (tmp_path / "redis").exists()
        await store.ping()
    finally:
        await store.close()


async def test_open_store_embedded_owns_the_child(tmp_path: Path) -> None:
    config = StoreConfig(url="embedded", redis_server=redis_server_binary())
    store = await open_store(config, tmp_path)
    try:
        assert store.url == f"unix://{tmp_path}/redis/redis.sock"
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
    finally:
        await store.close()
    assert not (tmp_path / "redis" / "redis.sock").exists()  # the child is gone
    # The state directory is free again, and the data persisted.
    store = await open_store(config, tmp_path)
    try:
        assert await store.auth_failures(CLIENT, NOW, WINDOW) == 1
    finally:
        await store.close()


# -- Redis Cluster ---------------------------------------------------------------------------


async def test_cluster(cluster_url: str) -> None:
    store = RedisStore(cluster_url, timeout=1.0)
    try:
        assert store.cluster
        await store.ping()
        counts = await asyncio.gather(
            *(store.note_auth_failure("198.51.100.7", NOW, WINDOW) for _ in range(50))
        )
        assert sorted(counts) == list(range(1, 51))
        assert await store.auth_failures("198.51.100.7", NOW + WINDOW - 1, WINDOW) == 50
        assert await store.auth_failures("198.51.100.7", NOW + WINDOW, WINDOW) == 0
    finally:
        await store.close()


async def test_cluster_unreachable_is_a_store_error() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_cluster_port()}?cluster=1", timeout=0.5)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"store redis://127\.0\.0\.1:\d+\?cluster=1: ping"):
            await store.ping()
        assert time.monotonic() - started < 1.5
    finally:
        await store.close()


def test_fast_packing_packs_what_redis_py_packs() -> None:
    from redis.asyncio.connection import Connection
    from redis.exceptions import DataError

    from mailguard.store.redis_store import fast_packing

    fast, plain = fast_packing(Connection)(), Connection()
    assert fast_packing(Connection) is type(fast)  # one class per base class
    for args in [
        ("EVALSHA", "a" * 40, 2, "mg:{acme}:cust:x", "k2", b"\x00\xff" * 130, "1.5", "é"),
        ("CLIENT SETINFO", "LIB-VER", "8.1.0"),  # a two-word name: redis-py splits it
        ("SET", "k", 1.1),  # floats: redis-py's repr()
        ("SET", "k", memoryview(b"v")),
    ]:
        assert b"".join(fast.pack_command(*args)) == b"".join(plain.pack_command(*args))
    with pytest.raises(DataError):
        fast.pack_command("SET", "k", True)


# -- pipelining (one connection, replies in order) --------------------------------------------


async def _clients_named_mailguard(raw: Redis) -> int:
    listing = await raw.execute_command("CLIENT", "LIST")
    text = listing.decode() if isinstance(listing, bytes) else str(listing)
    return sum(1 for line in text.splitlines() if " name=mailguard " in f" {line} ")


async def test_concurrent_commands_share_one_connection_each_gets_its_reply(
    redis_url: str,
) -> None:
    store = RedisStore(redis_url)
    raw = Redis.from_url(redis_url)
    try:
        values = [f"v{i}" for i in range(300)]
        replies = await asyncio.gather(*(store.command("echo", "ECHO", v) for v in values))
        assert replies == [v.encode() for v in values]
        assert await _clients_named_mailguard(raw) == 1
        # Error replies go to their own caller, in the middle of a batch.
        await raw.set("k:str", "x")
        calls = [
            store.command("incr", "INCR", "k:str" if i % 3 == 1 else f"k:{i}") for i in range(9)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        for i, result in enumerate(results):
            if i % 3 == 1:
                assert isinstance(result, StoreError) and "not an integer" in str(result)
            else:
                assert result == 1
    finally:
        await raw.aclose()
        await store.close()


async def test_a_cancelled_callers_reply_is_dropped_not_given_to_the_next(
    redis_server: RedisServer, redis_url: str
) -> None:
    store = RedisStore(redis_url, timeout=5.0)
    try:
        assert await store.command("echo", "ECHO", "warm") == b"warm"
        redis_server.pause()
        first = asyncio.create_task(store.command("echo", "ECHO", "first"))
        await asyncio.sleep(0.05)  # written, not answered
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        redis_server.resume()
        assert await store.command("echo", "ECHO", "second") == b"second"
        assert await store.command("echo", "ECHO", "third") == b"third"
    finally:
        redis_server.resume()
        await store.close()


async def test_a_stalled_connection_is_dropped_and_the_next_call_gets_its_own_reply(
    redis_server: RedisServer, redis_url: str
) -> None:
    """A caller that gives up while the oldest command has waited the whole timeout drops the
    connection (e.g. a half-open TCP connection); late replies on it reach nobody."""
    store = RedisStore(redis_url, timeout=0.3)
    try:
        assert await store.command("echo", "ECHO", "warm") == b"warm"
        redis_server.pause()
        for value in ("one", "two"):
            with pytest.raises(StoreError, match="timed out"):
                await store.command("echo", "ECHO", value)
        redis_server.resume()
        assert await store.command("echo", "ECHO", "three") == b"three"
    finally:
        redis_server.resume()
        await store.close()


async def test_a_command_that_may_have_run_is_not_retried(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Written, then the connection is lost: the caller gets StoreError; the command is not
    sent again on a new connection (here: the restarted, empty server never sees it)."""
    store = RedisStore(redis_url, timeout=5.0)
    try:
        assert await store.command("echo", "ECHO", "warm") == b"warm"
        redis_server.pause()
        call = asyncio.create_task(store.command("incr", "INCR", "counted"))
        await asyncio.sleep(0.05)  # written, not read by the server
        # Killed while frozen (SIGKILL: stop() would let it run the command first), restarted;
        # all blocking, so the event loop sees the lost connection only afterwards.
        proc = redis_server._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        redis_server._proc = None
        redis_server.start()
        with pytest.raises(StoreError, match="may have run"):
            await call
        assert await store.command("get", "GET", "counted") is None
        assert await store.command("incr", "INCR", "counted") == 1
    finally:
        await store.close()


async def test_a_hung_server_times_out_every_pipelined_call_within_the_timeout(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Script calls and commands on a live connection have no timer of their own: the
    connection's watch fails them all, as timeouts, once the oldest waited the store timeout."""
    store = RedisStore(redis_url, timeout=0.3)
    try:
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1  # connected
        redis_server.pause()
        started = time.monotonic()
        calls = [store.note_auth_failure(CLIENT, NOW + i, WINDOW) for i in range(20)]
        calls += [store.command("echo", "ECHO", str(i)) for i in range(20)]
        results = await asyncio.gather(*calls, return_exceptions=True)
        elapsed = time.monotonic() - started
        for result in results:
            assert isinstance(result, StoreError) and "timed out after 0.3s" in str(result)
        assert 0.25 < elapsed < 1.0
        redis_server.resume()
        # A new connection (the timed-out calls had been written: they may have run, 20 here).
        assert await store.note_auth_failure(CLIENT, NOW + 100, WINDOW) in (2, 22)
    finally:
        redis_server.resume()
        await store.close()


async def test_each_call_gets_the_whole_timeout_on_a_busy_connection(
    redis_server: RedisServer, redis_url: str
) -> None:
    """The watch follows the oldest unanswered command: a command written after older ones
    were answered times out ``timeout`` after its own write, not after theirs."""
    store = RedisStore(redis_url, timeout=0.6)
    try:
        assert await store.command("echo", "ECHO", "first") == b"first"  # arms the watch
        await asyncio.sleep(0.4)
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"echo timed out after 0\.6s"):
            await store.command("echo", "ECHO", "second")
        assert 0.55 < time.monotonic() - started < 1.2
    finally:
        redis_server.resume()
        await store.close()


async def test_a_call_while_connecting_to_a_hung_server_times_out(
    redis_server: RedisServer, redis_url: str
) -> None:
    """No connection yet: connecting (redis-py's handshake) is bounded by the timeout too."""
    store = RedisStore(redis_url, timeout=0.3)
    try:
        redis_server.pause()
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"timed out after 0\.3s"):
            await store.command("echo", "ECHO", "x")
        with pytest.raises(StoreError, match=r"timed out after 0\.3s"):
            await store.note_auth_failure(CLIENT, NOW, WINDOW)
        assert 0.5 < time.monotonic() - started < 1.5
    finally:
        redis_server.resume()
        await store.close()
