"""``[server] workers = 2``: ``mailguard serve`` as a real main process with two forked
workers on its embedded store: both serve, the bulk threshold holds exactly across them, the
decision log's lines stay whole, a killed worker is replaced, SIGHUP reaches every worker,
SIGTERM drains them and stops the embedded redis-server; a decision log that cannot be opened
stops the gate with one clear message."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.gate.conftest import RecordingUpstream, free_port
from tests.gate.smtpraw import RawClient
from tests.gate.test_server import CONFIG, GateProcess, launch_gate, send_one, stop_gate

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

WORKERS = CONFIG.replace('drain_timeout = "5s"', 'drain_timeout = "5s"\nworkers = 2')


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def workers_of(pid: int) -> list[int]:
    return [c for c in children(pid) if "redis-server" not in command_of(c)]


async def wait_for(predicate, what: str, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
async def gate2(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[GateProcess]:
    gp = await launch_gate(tmp_path, upstream, WORKERS)
    await wait_for(lambda: "2 workers ready" in gp.stderr(), "the workers' readiness")
    yield gp
    await stop_gate(gp)


async def campaign_message(port: int, n: int) -> str:
    async with RawClient("127.0.0.1", port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<news@acme.example>")
        reply = await c.cmd(f"RCPT TO:<reader{n}@example.org>")
        if not reply.startswith("250"):
            return reply
        body = (
            "Subject: Our autumn offers\r\n\r\n"
            "Dear reader, our autumn collection has arrived in every shop.\r\n"
            "Come and see the new coats, boots and scarves before they are gone.\r\n"
            "We look forward to seeing you soon in one of our stores.\r\n"
        )
        return await c.data(body.encode())


async def test_two_workers_share_listeners_and_counts(
    gate2: GateProcess, upstream: RecordingUpstream
) -> None:
    pid = gate2.proc.pid
    first = workers_of(pid)
    assert len(first) == 2, gate2.stderr()
    # 30 copies of one campaign from 30 concurrent connections: exactly 20 pass (the default
    # bulk_recipients), whichever worker took each connection.
    replies = await asyncio.gather(*(campaign_message(gate2.port, n) for n in range(30)))
    accepted = [r for r in replies if r.startswith("250")]
    refused = [r for r in replies if r.startswith("550 5.7.1")]
    assert (len(accepted), len(refused)) == (20, 10), replies
    assert len(upstream.messages) == 20
    lines = gate2.log_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line whole
    assert sorted(r["decision"] for r in records) == ["accept"] * 20 + ["reject"] * 10
    assert len({r["tx"] for r in records}) == 30
    assert len({r["campaign"] for r in records}) == 1

    # A worker killed outright is replaced; the gate answers meanwhile.
    os.kill(first[0], signal.SIGKILL)
    assert (await send_one(gate2.port)).startswith("250")
    await wait_for(
        lambda: len(workers_of(pid)) == 2 and first[0] not in workers_of(pid), "a new worker"
    )
    assert "exited with status -9; restarting it" in gate2.stderr()


async def test_sighup_reaches_every_worker_and_sigterm_stops_everything(
    gate2: GateProcess, upstream: RecordingUpstream
) -> None:
    pid = gate2.proc.pid
    redis = [c for c in children(pid) if "redis-server" in command_of(c)]
    assert len(redis) == 1
    gate2.write_config(network="192.0.2.0/24")  # 127.0.0.1 is no longer a customer
    gate2.proc.send_signal(signal.SIGHUP)
    await wait_for(
        lambda: gate2.stderr().count("configuration reloaded") == 2, "both workers' reloads"
    )
    for _ in range(6):  # whichever worker answers, it runs the new config
        assert (await send_one(gate2.port)).startswith("554 5.7.1")
    workers = workers_of(pid)
    gate2.proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(gate2.proc.wait(), 20) == 0, gate2.stderr()
    for child in [*workers, *redis]:
        assert (
            not Path(f"/proc/{child}").exists()
            or "zombie" in Path(f"/proc/{child}/status").read_text()
        )
    with pytest.raises(OSError):
        async with RawClient("127.0.0.1", gate2.port):
            pass


def test_what_would_stop_every_worker_stops_the_gate_once(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "mailguard.toml"
    config.write_text(
        WORKERS.format(
            port=port,
            state=tmp_path / "state",
            upstream_port=free_port(),
            log=tmp_path / "missing-dir" / "decisions.jsonl",  # cannot be opened
            network="127.0.0.0/8",
        )
    )
    res = subprocess.run(
        [sys.executable, "-m", "mailguard", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "MAILGUARD_STATE_DIR": str(tmp_path / "state")},
    )
    assert res.returncode == 1, res.stderr
    # Said once, by the main process, before any worker or the embedded redis-server starts.
    assert res.stderr.count("mailguard: cannot start:") == 1, res.stderr
    assert "missing-dir" in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "state" / "redis").exists()


async def test_the_main_process_starts_a_dead_redis_server_again(gate2: GateProcess) -> None:
    pid = gate2.proc.pid
    [redis] = [c for c in children(pid) if "redis-server" in command_of(c)]
    os.kill(redis, signal.SIGKILL)
    replies = []
    for _ in range(100):
        replies.append(await send_one(gate2.port))
        if replies[-1].startswith("250") and len(replies) > 1:
            break
        await asyncio.sleep(0.1)
    # Meanwhile refused with the store-failure reply, never accepted unchecked; then served.
    assert replies[-1].startswith("250"), replies
    assert all(r.startswith(("250", "451 4.3.0")) for r in replies), replies
    assert any(r.startswith("451 4.3.0") for r in replies), replies
    assert [c for c in children(pid) if "redis-server" in command_of(c)] != [redis]
    assert "embedded redis-server killed by signal 9; starting it again" in gate2.stderr()


async def test_sighup_while_workers_start_is_taken_once_they_are_ready(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    config = tmp_path / "mailguard.toml"
    config.write_text(
        WORKERS.format(
            port=free_port(),
            state=tmp_path / "state",
            upstream_port=upstream.port,
            log=tmp_path / "decisions.jsonl",
            network="127.0.0.0/8",
        )
    )
    stderr = tmp_path / "stderr.log"
    env = {**os.environ, "MAILGUARD_STATE_DIR": str(tmp_path / "state")}
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "mailguard", "serve", "--config", str(config)),
            stderr=err,
            cwd=ROOT,
            env=env,
        )
    try:
        await wait_for(lambda: "listening on" in stderr.read_text(), "the main process")
        proc.send_signal(signal.SIGHUP)  # the workers are being forked or starting
        await wait_for(lambda: "2 workers ready" in stderr.read_text(), "the workers")
        # Every worker took the reload, now or once ready; none died of the signal.
        await wait_for(
            lambda: stderr.read_text().count("configuration reloaded") >= 2, "the reloads"
        )
        assert "exited with status" not in stderr.read_text()
        assert len(workers_of(proc.pid)) == 2
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 20) == 0, stderr.read_text()


def test_a_reload_keeps_listeners_store_and_state_dir_for_workers_started_later(
    tmp_path: Path,
) -> None:
    """A worker restarted after a reload must count in the same store as the others."""
    from mailguard.config.load import load_config
    from mailguard.gate.workers import Supervisor

    path = tmp_path / "mailguard.toml"
    fmt = {
        "port": 10025,
        "state": tmp_path / "state",
        "upstream_port": 2525,
        "log": tmp_path / "d.jsonl",
        "network": "127.0.0.0/8",
    }
    path.write_text(WORKERS.format(**fmt) + '[store]\nurl = "redis://127.0.0.1:6390/0"\n')
    started = load_config(path)
    supervisor = Supervisor(path, started, 2, lambda link, config: 0)
    changed = {**fmt, "port": 10026, "state": tmp_path / "other", "network": "10.0.0.0/8"}
    path.write_text(WORKERS.format(**changed) + '[store]\nurl = "redis://127.0.0.1:6391/0"\n')
    supervisor._reload()
    config = supervisor.config
    assert config.store == started.store
    assert config.server.listen == started.server.listen
    assert config.server.state_dir == started.server.state_dir
    assert [str(n) for n in config.customers[0].networks] == ["10.0.0.0/8"]  # the rest is new
