"""Fixtures for milter tests: ``python -m mailguard.milter`` as a real process on a loopback port,
driven by OpenDKIM's ``miltertest`` (Lua scripts) with the store on the session's redis-server.

``milter``: the running milter (its socket spec, this test's decision-log lines), one process per
module (libmilter takes seconds to shut down) with Redis flushed for each test; ``miltertest``:
runs a Lua script and returns what it echoed (fails the test if the script raised an error).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.conftest import RedisServer

CONFIG = """
[server]
hostname = "milter.test"
state_dir = "{state_dir}"
[store]
url = "{redis_url}"
timeout = "1s"
[log]
decision_log = "{log_path}"
[[customer]]
id = "acme"
networks = ["127.0.0.0/8"]
domains = ["acme.example"]
[[customer]]
id = "beta"
networks = ["198.51.100.0/24"]
[[customer.user]]
name = "beta-relay"
password_hash = "{hash}"
"""
HASH = PasswordHasher(time_cost=1, memory_cost=8192).hash("unused: the MTA authenticates")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningMilter:
    spec: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    since: int = 0  # decision-log lines written before the current test

    def _all(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(x) for x in self.log_path.read_text().splitlines() if x.strip()]

    def decisions(self) -> list[dict[str, Any]]:
        """The decision-log lines of the current test."""
        return self._all()[self.since :]

    def wait_for_decisions(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The current test's lines once there are ``count``: an abandoned transaction is
        logged from libmilter's abort/close callback, which may run after miltertest exits."""
        deadline = time.monotonic() + timeout
        while len(found := self.decisions()) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} decision lines: {found}")
            time.sleep(0.02)
        return found


def milter_config(tmp_path: Path, redis_url: str) -> tuple[Path, Path]:
    """A milter config under ``tmp_path``: (its path, its decision log's path)."""
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    log_path = tmp_path / "decisions.log"
    config = tmp_path / "mailguard.toml"
    config.write_text(
        CONFIG.format(state_dir=state, redis_url=redis_url, log_path=log_path, hash=HASH),
        encoding="utf-8",
    )
    return config, log_path


@pytest.fixture(scope="module")
def milter_process(
    tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer
) -> Iterator[RunningMilter]:
    tmp_path = tmp_path_factory.mktemp("milter")
    port = free_port()
    config, log_path = milter_config(tmp_path, redis_server.url)
    spec = f"inet:{port}@127.0.0.1"
    with (tmp_path / "milter.out").open("wb") as out_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailguard.milter", "--config", str(config), "--socket", spec,
             "--timeout", "5"],
            stdin=subprocess.DEVNULL,
            stdout=out_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            pytest.fail((tmp_path / "milter.out").read_text(), pytrace=False)
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("milter did not start listening", pytrace=False)
        time.sleep(0.05)
    try:
        yield RunningMilter(spec, log_path, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out = (tmp_path / "milter.out").read_text(errors="replace")
        assert "Traceback" not in out, out


@pytest.fixture
def milter(milter_process: RunningMilter, redis_url: str) -> RunningMilter:
    """The module's milter, with the store flushed and the decision log read from here on."""
    milter_process.since = len(milter_process._all())
    return milter_process


RunLua = Callable[[str], list[str]]


@pytest.fixture
def miltertest(tmp_path: Path) -> RunLua:
    binary = shutil.which("miltertest")
    if binary is None:
        pytest.fail("miltertest not found: apt-get install miltertest", pytrace=False)

    def run(script: str) -> list[str]:
        path = tmp_path / f"script{time.monotonic_ns()}.lua"
        path.write_text(script, encoding="utf-8")
        done = subprocess.run(
            [binary, "-s", str(path)],
            capture_output=True,
            timeout=60,
            env={**os.environ, "MILTERTEST_RETRY_SPEED_FACTOR": "1"},
        )
        out = done.stdout.decode("utf-8", "replace")
        assert done.returncode == 0, out + done.stderr.decode("utf-8", "replace")
        return [line for line in out.splitlines() if line.startswith("R ")]

    return run
