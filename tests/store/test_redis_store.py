"""Contract tests for ``RedisStore`` against a real redis-server (shared and embedded).

Time is injected: no test sleeps to move a window.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from mailguard.config.schema import StoreConfig
from mailguard.store import redis_store
from mailguard.store.base import Store, StoreError
from mailguard.store.factory import open_store
from mailguard.store.keys import Keys
from mailguard.store.redis_store import (
    RedisStore,
    StoreURL,
    float_arg,
    lua_script,
    redact_url,
)
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
    with pytest.raises(StoreError, match="ping: the store is closed"):
        await store.command("ping", "PING")
    with pytest.raises(StoreError, match="note_auth_failure: the store is closed"):
        await store.note_auth_failure(CLIENT, NOW, WINDOW)


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
    """On the store's own connection (``command``, scripts), over a unix socket: a restart
    the event loop has not noticed yet makes the write fail (EPIPE), so the command was not
    sent and is retried on a new connection.  (Over TCP the write to the closed connection
    succeeds and the call fails with 'may have run'; see the module docstring.)"""
    store = RedisStore(redis_url, timeout=1.0)
    try:
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1
        redis_server.stop()
        with pytest.raises(StoreError, match="failed"):
            await store.command("ping", "PING")
        redis_server.start()
        assert await store.command("ping", "PING") == b"PONG"
        # A restart between two calls: the connection is stale and the script cache empty;
        # the first call still succeeds (reconnect and reload, no error surfaces).
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


async def test_a_dead_connection_is_dropped_and_the_next_call_gets_a_new_one(
    redis_server: RedisServer, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls time out one by one while the server is frozen; once nothing at all was received
    for ``dead`` (max(3 x timeout, _DEAD_MIN); the minimum lowered here) the connection is
    dropped: after the server resumes, calls go over a new connection (another client id),
    and the old one is gone from the server."""
    monkeypatch.setattr(redis_store, "_DEAD_MIN", 0.0)
    store = RedisStore(redis_url, timeout=0.3)  # dead after 0.9 s
    raw = Redis.from_url(redis_url)
    try:
        old_id = await store.command("id", "CLIENT", "ID")
        redis_server.pause()
        for value in ("one", "two"):
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"echo timed out after 0\.3s"):
                await store.command("echo", "ECHO", value)
            assert 0.25 < time.monotonic() - started < 0.5  # its own timeout, no drop yet
        await asyncio.sleep(0.6)  # nothing received for 0.9 s since "one" was written
        redis_server.resume()
        assert await store.command("echo", "ECHO", "three") == b"three"
        new_id = await store.command("id", "CLIENT", "ID")
        assert new_id != old_id
        ids = [int(c["id"]) for c in await raw.client_list() if c.get("name") == "mailguard"]
        assert ids == [new_id]
    finally:
        redis_server.resume()
        await raw.aclose()
        await store.close()


async def test_a_server_pause_fails_only_the_calls_that_waited_the_timeout(
    redis_url: str,
) -> None:
    """Another client's script keeps the server busy 1 s; store timeout 0.6 s; a call every
    25 ms.  A call fails ("timed out") only when ITS command waited 0.6 s: the calls issued
    in the last 0.45 s of the pause get their own replies when it ends, on the same
    connection (the timed-out commands' late replies are read and dropped)."""
    busy = (
        "local s = redis.call('TIME') local t0 = s[1] * 1e6 + s[2] while true do"
        " local n = redis.call('TIME') if n[1] * 1e6 + n[2] - t0 > 1e6 then break end end"
        " return 1"
    )
    store = RedisStore(redis_url, timeout=0.6)
    raw = Redis.from_url(redis_url)
    try:
        link_id = await store.command("id", "CLIENT", "ID")
        running = asyncio.create_task(raw.eval(busy, 0))
        await asyncio.sleep(0.02)  # the script runs from before t0 to before t0 + 1 s
        t0 = time.monotonic()

        async def call(i: int) -> tuple[float, object]:
            await asyncio.sleep(i * 0.025)
            issued = time.monotonic() - t0
            try:
                return issued, await store.command("echo", "ECHO", str(i))
            except StoreError as exc:
                return issued, exc

        results = await asyncio.gather(*(call(i) for i in range(40)))
        assert await running == 1
        first = results[0][1]
        assert isinstance(first, StoreError) and "timed out after 0.6s" in str(first)
        late = [(i, got) for i, (issued, got) in enumerate(results) if issued >= 0.55]
        assert len(late) >= 10
        for i, got in late:
            assert got == str(i).encode()
        assert await store.command("id", "CLIENT", "ID") == link_id
        # The late replies were accounted for: a command in the next pause times out again.
        running = asyncio.create_task(raw.eval(busy, 0))
        await asyncio.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"timed out after 0\.6s"):
            await store.command("echo", "ECHO", "again")
        assert time.monotonic() - started < 0.9
        assert await running == 1
        assert await store.command("id", "CLIENT", "ID") == link_id
    finally:
        await raw.aclose()
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
    connection's watch fails each, as a timeout, once it waited the store timeout."""
    store = RedisStore(redis_url, timeout=0.3)
    try:
        assert await store.note_auth_failure(CLIENT, NOW, WINDOW) == 1  # connected
        link_id = await store.command("id", "CLIENT", "ID")
        redis_server.pause()
        started = time.monotonic()
        calls = [store.note_auth_failure(CLIENT, NOW + i, WINDOW) for i in range(20)]
        calls += [store.command("echo", "ECHO", str(i)) for i in range(20)]
        gathered = asyncio.gather(*calls, return_exceptions=True)
        results = await asyncio.wait_for(gathered, 3.0)
        elapsed = time.monotonic() - started
        for result in results:
            assert isinstance(result, StoreError) and "timed out after 0.3s" in str(result)
        assert 0.25 < elapsed < 1.0
        redis_server.resume()
        # The same connection (not dead: the server answers again); the timed-out calls had
        # been written, so they ran when it resumed, and their replies went to nobody.
        assert await store.note_auth_failure(CLIENT, NOW + 100, WINDOW) == 22
        assert await store.command("id", "CLIENT", "ID") == link_id
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


# -- the connection's life: connecting, closing, RESP3 -------------------------------------


class _Proxy:
    """A TCP proxy to the test redis-server's unix socket; connections numbered in
    ``black_holes`` are accepted and read but never answered (a handshake that hangs)."""

    def __init__(self, socket_path: str, black_holes: frozenset[int]) -> None:
        self.socket_path = socket_path
        self.black_holes = black_holes
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.accepted in self.black_holes:
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_unix_connection(self.socket_path)

            async def pump(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
                try:
                    while data := await a.read(65536):
                        b.write(data)
                        await b.drain()
                finally:
                    b.close()

            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


async def test_a_hung_handshake_does_not_hold_up_later_calls(redis_server: RedisServer) -> None:
    """The first connection's handshake is never answered: the calls waiting on it time out,
    and a later call makes a new connection (connecting is bounded by the timeout)."""
    proxy = _Proxy(str(redis_server.socket_path), frozenset({1}))
    async with proxy as url:
        store = RedisStore(url, timeout=0.3)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match=r"ping timed out after 0\.3s"):
                await store.command("ping", "PING")
            replies = []
            while time.monotonic() - started < 2.0 and not replies:
                with contextlib.suppress(StoreError):
                    replies.append(await store.command("ping", "PING"))
            assert replies == [b"PONG"]
            assert proxy.accepted == 2
        finally:
            await asyncio.wait_for(store.close(), 2.0)


async def test_close_while_connecting_gives_the_caller_a_store_error(
    redis_server: RedisServer,
) -> None:
    """``close`` cancels the shared connect; a caller waiting on it was not cancelled itself,
    so it gets ``StoreError``, not ``CancelledError``."""
    proxy = _Proxy(str(redis_server.socket_path), frozenset({1}))
    async with proxy as url:
        store = RedisStore(url, timeout=5.0)
        call = asyncio.create_task(store.command("ping", "PING"))
        await asyncio.sleep(0.1)  # connecting, the handshake unanswered
        await store.close()
        with pytest.raises(StoreError, match="closed"):
            await call
        assert not call.cancelled()


async def test_a_connect_finishing_as_the_store_closes_is_not_kept(redis_url: str) -> None:
    """The connect task has finished but its result is not taken yet when ``close`` runs:
    the new connection is closed, not kept as the store's link."""
    store = RedisStore(redis_url)
    raw = Redis.from_url(redis_url)
    try:
        call = asyncio.create_task(store.command("ping", "PING"))
        await asyncio.sleep(0)
        direct = store._direct
        assert direct is not None and direct._connecting is not None
        connecting = direct._connecting
        while not connecting.done():
            await asyncio.sleep(0)  # runs before the done callbacks of the connect
        await store.close()
        await asyncio.gather(call, return_exceptions=True)
        assert direct._link is None
        for _ in range(100):
            if await _clients_named_mailguard(raw) == 0:
                break
            await asyncio.sleep(0.01)
        assert await _clients_named_mailguard(raw) == 0
    finally:
        await raw.aclose()
        await store.close()


async def test_resp3_url_a_push_never_takes_a_callers_reply(redis_url: str) -> None:
    """``?protocol=3``: the store's connection speaks RESP2 all the same (no push comes
    unasked), and if it is switched to RESP3 anyway, server pushes (here client-side caching
    invalidations redirected to it) are skipped: every caller gets its own reply."""
    store = RedisStore(redis_url + "?protocol=3")
    raw = Redis.from_url(redis_url + "?protocol=3")
    try:
        await raw.set("campaign:A", "decision-for-A")
        await raw.set("campaign:B", "decision-for-B")
        link_id = await store.command("id", "CLIENT", "ID")
        info = await store.command("info", "CLIENT", "INFO")
        assert b"resp=2" in info.split()
        for round_ in range(2):
            if round_ == 1:  # RESP3 on the link itself: pushes do reach it now
                await store.command("hello", "HELLO", "3")
            tracker = Redis.from_url(redis_url + "?protocol=3")
            try:
                await tracker.execute_command("CLIENT", "TRACKING", "ON", "REDIRECT", link_id)
                await tracker.get("k")  # k tracked: writing it pushes "invalidate" to the link
                replies = await asyncio.gather(
                    store.command("write", "SET", "k", str(round_)),
                    store.command("read A", "GET", "campaign:A"),
                    store.command("read B", "GET", "campaign:B"),
                )
            finally:
                await tracker.aclose()
            assert replies == [b"OK", b"decision-for-A", b"decision-for-B"]
        assert await store.command("echo", "ECHO", "after") == b"after"
    finally:
        await raw.aclose()
        await store.close()


def test_float_arg_round_trips_every_value_and_names_the_bad_one() -> None:
    """The last value's text is reused only for an equal value; each text reads back exactly."""
    values = [1763900000.123456, 1763900000.123456, 0.1 + 0.2, 86400.0, 1e-7, 1763900000.1234567]
    for value in values:
        text = float_arg("now", value)
        assert float(text) == value and text == repr(value)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="bulk_window must be finite"):
            float_arg("bulk_window", bad)
    assert float_arg("now", 5) == "5.0"
