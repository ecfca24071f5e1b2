"""Shared fixtures: a real redis-server for store contract tests and anything that needs a store.

``redis_server`` (session): one redis-server on a unix socket in a temporary directory, no
persistence, no TCP.  Its ``.url`` is a ``unix://`` URL; ``stop()`` / ``start()`` simulate an
outage (the restart listens on the same socket, empty), ``pause()`` / ``resume()`` freeze it
(SIGSTOP / SIGCONT) so calls hang until the client's timeout.
``redis_url`` (function): the server running and flushed, as a URL.

The binary is ``redis-server`` on PATH, or ``$MAILGUARD_REDIS_SERVER``.  Missing is a failure,
not a skip: CI must install it (``apt-get install redis-server``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from mailguard.store.redis_store import RedisStore

# No per-example deadline: timing is measured in loadtest/, never asserted in tests, and a
# loaded 2-core CI machine makes store-backed examples slow now and then.
settings.register_profile("mailguard", deadline=None)
settings.load_profile("mailguard")

REDIS_SERVER_ENV = "MAILGUARD_REDIS_SERVER"


def redis_server_binary() -> str:
    """The redis-server to test with, or fail the test with what to install."""
    name = os.environ.get(REDIS_SERVER_ENV, "redis-server")
    binary = shutil.which(name)
    if binary is None:
        pytest.fail(
            f"{name} not found: the store tests need a real Redis; install it"
            f" (apt-get install redis-server) or set ${REDIS_SERVER_ENV}",
            pytrace=False,
        )
    return binary


def _command(path: str, command: bytes = b"PING") -> bytes | None:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            sock.connect(path)
            sock.sendall(command + b"\r\n")
            return sock.recv(256)
    except OSError:
        return None


class RedisServer:
    """A throw-away redis-server on a unix socket (see the module docstring)."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.socket_path = directory / "redis.sock"
        self.log_path = directory / "redis.log"
        self.url = f"unix://{self.socket_path}"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) the server on the same socket and wait until it answers PING."""
        if self.running:
            return
        args = [
            self.binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", str(self.log_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not (_command(str(self.socket_path)) or b"").startswith(b"+PONG"):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start; see {self.log_path}", pytrace=False)
            time.sleep(0.005)

    def stop(self) -> None:
        """Stop the server (SIGTERM, SIGKILL after 5 s); calls then fail to connect."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # in case it is paused
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def pause(self) -> None:
        """Freeze the server: connections are accepted but nothing is answered."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self._proc is not None
        self._proc.send_signal(signal.SIGCONT)

    def flush(self) -> None:
        """Empty every database (and unfreeze / restart the server if a test left it so)."""
        if self._proc is not None:
            self.resume()
        self.start()
        reply = _command(str(self.socket_path), b"FLUSHALL")
        assert reply == b"+OK\r\n", reply


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server on a unix socket for the whole session."""
    server = RedisServer(redis_server_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The URL of the session's redis-server, running and empty."""
    redis_server.flush()
    return redis_server.url


# -- Redis Cluster ---------------------------------------------------------------------------


def free_cluster_port() -> int:
    """A TCP port that is free, and whose cluster bus port (+10000) is free too."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + 10000 > 65535:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    """A ``RedisStore`` on the session's redis-server (flushed for this test by ``redis_url``)."""
    opened = RedisStore(redis_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture(scope="session")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real 3-node Redis Cluster on loopback (slots split in three), as a ``?cluster=1`` URL.

    Fails (does not skip) when redis-server lacks cluster support, like the other fixtures.
    """
    import redis

    binary = redis_server_binary()
    ports = [free_cluster_port() for _ in range(3)]
    procs = []
    clients: list[redis.Redis] = []
    try:
        for port in ports:
            directory = tmp_path_factory.mktemp(f"cluster-{port}")
            procs.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        str(directory / "nodes.conf"),
                        "--dir",
                        str(directory),
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--logfile",
                        str(directory / "redis.log"),
                    ],
                    stdin=subprocess.DEVNULL,
                )
            )
        deadline = time.monotonic() + 20
        for port in ports:
            client = redis.Redis(port=port, socket_timeout=1)
            clients.append(client)
            while True:
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    assert time.monotonic() < deadline, f"cluster node {port} did not start"
                    time.sleep(0.01)
        bounds = [(0, 5460), (5461, 10922), (10923, 16383)]
        for client, (low, high) in zip(clients, bounds, strict=True):
            client.cluster("ADDSLOTSRANGE", str(low), str(high))
        for port in ports[1:]:
            clients[0].cluster("MEET", "127.0.0.1", str(port))
        for client in clients:
            while client.cluster("info")["cluster_state"] != "ok":
                assert time.monotonic() < deadline, "cluster did not become ok"
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{ports[0]}?cluster=1"
    finally:
        for client in clients:
            client.close()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
