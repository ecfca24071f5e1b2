"""The embedded redis-server child: start, stop, persistence, exclusivity, failure texts."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis

from mailguard.store.base import StoreError
from mailguard.store.embedded import EmbeddedRedis, EmbeddedRedisError
from tests.conftest import redis_server_binary


@pytest.fixture
def binary() -> str:
    return redis_server_binary()


@pytest.fixture
async def embedded(tmp_path: Path, binary: str) -> AsyncIterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path, binary)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def cleanup() -> Iterator[list[EmbeddedRedis]]:
    """Servers a test starts by hand, stopped at the end whatever happens."""
    servers: list[EmbeddedRedis] = []
    yield servers
    for server in servers:
        server.stop_sync()


def _fake_binary(tmp_path: Path, script: str) -> str:
    path = tmp_path / "fake-redis-server"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return str(path)


def _gone(pid: int) -> bool:
    """True if ``pid`` has exited (a zombie nobody reaped counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


async def _get(url: str, key: str) -> object:
    client = Redis.from_url(url)
    try:
        return await client.get(key)
    finally:
        await client.aclose()


async def _set(url: str, key: str, value: str) -> None:
    client = Redis.from_url(url)
    try:
        await client.set(key, value)
    finally:
        await client.aclose()


async def test_start_and_stop(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    await embedded.start()
    assert embedded.running
    pid = embedded.pid
    assert pid is not None
    directory = tmp_path / "redis"
    assert embedded.url == f"unix://{directory}/redis.sock"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "redis.sock").stat().st_mode) == 0o700
    conf = (directory / "redis.conf").read_text()
    for line in ("port 0", "unixsocketperm 700", "appendonly yes", 'save ""', "daemonize no"):
        assert f"\n{line}\n" in conf
    assert (directory / "redis.pid").read_text().strip() == str(pid)
    assert (directory / "redis.log").stat().st_size > 0
    assert await _get(embedded.url, "nothing") is None

    await embedded.start()  # already running: nothing happens
    assert embedded.pid == pid

    await embedded.stop()
    assert not embedded.running
    assert embedded.pid is None
    assert _gone(pid)
    assert not (directory / "redis.sock").exists()
    await embedded.stop()  # idempotent


async def test_data_persists_across_restart(embedded: EmbeddedRedis) -> None:
    await embedded.start()
    await _set(embedded.url, "k", "v")
    await embedded.stop()
    await embedded.start()
    assert await _get(embedded.url, "k") == b"v"


def test_sync_variants_and_context_manager(tmp_path: Path, binary: str) -> None:
    with EmbeddedRedis(tmp_path, binary) as server:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            client.set("k", "v")
        finally:
            client.close()
        pid = server.pid
        assert pid is not None
    assert _gone(pid)
    server.start_sync()
    try:
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        try:
            assert client.get("k") == b"v"
        finally:
            client.close()
    finally:
        server.stop_sync()


async def test_two_state_dirs_are_isolated(tmp_path: Path, binary: str) -> None:
    async with (
        EmbeddedRedis(tmp_path / "a", binary) as a,
        EmbeddedRedis(tmp_path / "b", binary) as b,
    ):
        assert a.socket_path != b.socket_path
        await _set(a.url, "k", "a")
        assert await _get(b.url, "k") is None
        await _set(b.url, "k", "b")
        assert await _get(a.url, "k") == b"a"


async def test_same_state_dir_is_refused(embedded: EmbeddedRedis, tmp_path: Path) -> None:
    await embedded.start()
    second = EmbeddedRedis(tmp_path, embedded.redis_server)
    with pytest.raises(EmbeddedRedisError) as caught:
        await second.start()
    assert str(caught.value).startswith(
        f"state directory {tmp_path} is in use by pid {os.getpid()}:"
    )
    assert not second.running
    # The first one is untouched, and a third may start once it is stopped.
    await _set(embedded.url, "still", "here")
    await embedded.stop()
    async with EmbeddedRedis(tmp_path, embedded.redis_server) as third:
        assert await _get(third.url, "still") == b"here"


def test_the_child_holds_the_lock_too(
    tmp_path: Path, binary: str, cleanup: list[EmbeddedRedis]
) -> None:
    """Even if mailguard's own descriptor is gone, a live child keeps the directory locked."""
    first = EmbeddedRedis(tmp_path, binary)
    cleanup.append(first)
    first.start_sync()
    first._unlock()  # as if the parent had lost its descriptor: only the child holds the lock
    with pytest.raises(EmbeddedRedisError, match="is in use by pid"):
        EmbeddedRedis(tmp_path, binary).start_sync()


def test_the_child_dies_with_its_parent(tmp_path: Path, binary: str) -> None:
    code = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from mailguard.store.embedded import EmbeddedRedis
        server = EmbeddedRedis(Path({str(tmp_path)!r}), {binary!r})
        server.start_sync()
        print(server.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
    deadline = time.monotonic() + 5
    while not _gone(child):
        assert time.monotonic() < deadline, "redis-server outlived its parent"
        time.sleep(0.01)
    # The lock died with both: the directory can be used again, and the data is intact.  A
    # forked child of redis-server (an AOF rewrite) inherits the lock and may outlive it by a
    # moment, so the directory is only required to be free again within the deadline.
    while True:
        try:
            with EmbeddedRedis(tmp_path, binary) as server:
                assert server.running
            break
        except EmbeddedRedisError as exc:
            assert "is in use" in str(exc)
            assert time.monotonic() < deadline + 5, str(exc)
            time.sleep(0.05)


async def test_foreign_server_on_the_socket_is_refused(tmp_path: Path, binary: str) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    foreign = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(directory / "redis.sock"), "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 5
        while not (directory / "redis.sock").exists():
            assert time.monotonic() < deadline
            time.sleep(0.005)
        with pytest.raises(EmbeddedRedisError, match="a redis-server not started by mailguard"):
            await EmbeddedRedis(tmp_path, binary).start()
    finally:
        foreign.terminate()
        foreign.wait()
    async with EmbeddedRedis(tmp_path, binary) as server:  # and the lock was released
        assert server.running


async def test_stale_socket_and_pidfile_are_replaced(tmp_path: Path, binary: str) -> None:
    directory = tmp_path / "redis"
    directory.mkdir()
    (directory / "redis.sock").write_text("stale")
    (directory / "redis.pid").write_text("999999999\n")
    async with EmbeddedRedis(tmp_path, binary) as server:
        assert await _get(server.url, "k") is None


async def test_missing_binary(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, "no-such-redis-server")
    with pytest.raises(EmbeddedRedisError) as caught:
        await server.start()
    assert str(caught.value) == (
        "no-such-redis-server not found: install it (apt-get install redis-server)"
        " or set [store] redis_server"
    )
    assert isinstance(caught.value, StoreError)


async def test_missing_binary_default_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmbeddedRedisError, match=r"^redis-server not found: install it"):
        await EmbeddedRedis(tmp_path).start()


async def test_failed_start_shows_the_log_tail(tmp_path: Path) -> None:
    fake = _fake_binary(tmp_path, 'echo "FATAL CONFIG FILE ERROR: bad things" >&2\nexit 1\n')
    server = EmbeddedRedis(tmp_path / "state", fake)
    with pytest.raises(EmbeddedRedisError) as caught:
        await server.start()
    text = str(caught.value)
    assert "exited with status 1 while starting" in text
    assert "FATAL CONFIG FILE ERROR: bad things" in text
    assert str(tmp_path / "state" / "redis" / "redis.log") in text
    assert not server.running
    with pytest.raises(EmbeddedRedisError, match="exited with status 1"):
        server.start_sync()  # the lock was released: the same failure, not "in use"


async def test_start_deadline(tmp_path: Path) -> None:
    fake = _fake_binary(tmp_path, "echo starting\nexec sleep 30\n")
    server = EmbeddedRedis(tmp_path / "state", fake, start_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(EmbeddedRedisError, match=r"did not answer PING within 0\.3s") as caught:
        await server.start()
    assert time.monotonic() - started < 2
    assert "starting" in str(caught.value)
    assert not server.running


async def test_stop_kills_after_the_deadline(embedded: EmbeddedRedis) -> None:
    embedded.stop_timeout = 0.2
    await embedded.start()
    pid = embedded.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # SIGTERM stays pending: only SIGKILL ends it
    started = time.monotonic()
    await embedded.stop()
    assert 0.15 < time.monotonic() - started < 2
    assert _gone(pid)


async def test_socket_path_too_long(tmp_path: Path, binary: str) -> None:
    server = EmbeddedRedis(tmp_path / ("x" * 120), binary)
    with pytest.raises(EmbeddedRedisError, match="is too long"):
        await server.start()


async def test_paths_with_spaces_and_quotes(tmp_path: Path, binary: str) -> None:
    async with EmbeddedRedis(tmp_path / 'a "b" \\c', binary) as server:
        await _set(server.url, "k", "v")
        assert await _get(server.url, "k") == b"v"


async def test_open_store_starts_a_dead_child_again(
    tmp_path: Path, binary: str, caplog: pytest.LogCaptureFixture
) -> None:
    from mailguard.config.schema import StoreConfig
    from mailguard.store.factory import open_store

    store = await open_store(StoreConfig(url="embedded", redis_server=binary), tmp_path)
    try:
        pid_file = tmp_path / "redis" / "redis.pid"
        first = int(pid_file.read_text())
        await store.client.set("kept", "yes")
        time.sleep(1.2)  # appendfsync everysec: on disk before the crash
        os.kill(first, signal.SIGKILL)
        for _ in range(100):  # the watchdog looks once a second
            try:
                if await store.client.get("kept") == b"yes":
                    break
            except Exception:  # down until it is started again
                pass
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the embedded redis-server was not started again")
        assert int(pid_file.read_text()) != first
        assert "embedded redis-server killed by signal 9; starting it again" in caplog.text
    finally:
        await store.close()
    assert not (tmp_path / "redis" / "redis.sock").exists()


def test_restart_if_dead_sync(tmp_path: Path, binary: str, cleanup: list[EmbeddedRedis]) -> None:
    server = EmbeddedRedis(tmp_path, binary)
    cleanup.append(server)
    assert not server.restart_if_dead_sync()  # never started: nothing to do
    server.start_sync()
    assert not server.restart_if_dead_sync()  # running
    first = server.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    for _ in range(100):
        if not server.running:
            break
        time.sleep(0.02)
    # Until it is started again the state directory stays the owner's: no other process
    # (an admin command, say) can start its own server there meanwhile.
    with pytest.raises(EmbeddedRedisError, match="is in use by pid"):
        EmbeddedRedis(tmp_path, binary).start_sync()
    assert server.restart_if_dead_sync()
    assert server.running and server.pid != first
    assert _gone(first)


def test_a_detached_fork_does_not_keep_the_lock(
    tmp_path: Path, binary: str, cleanup: list[EmbeddedRedis]
) -> None:
    """A gate worker forked from the owner drops the lock's descriptor, so the owner can take
    the lock again to restart a child that died."""
    server = EmbeddedRedis(tmp_path, binary)
    cleanup.append(server)
    server.start_sync()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the "worker": detach, then live on until told
        server.detach()
        os.close(write)
        os.read(read, 1)
        os._exit(0)
    os.close(read)
    try:
        time.sleep(0.2)
        first = server.pid
        assert first is not None
        os.kill(first, signal.SIGKILL)
        while server.running:
            time.sleep(0.02)
        assert server.restart_if_dead_sync()  # the lock was free to take again
    finally:
        os.close(write)
        os.waitpid(pid, 0)
