"""``mailguard serve`` as a real process on its embedded store: relay, SIGHUP reload (valid and
invalid), SIGTERM drain with a transaction in flight; and ``mailguard check-config``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.gate.conftest import RecordingUpstream, free_port
from tests.gate.smtpraw import RawClient

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
hostname = "gate.test"
state_dir = "{state}"
drain_timeout = "5s"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
[log]
decision_log = "{log}"
[[customer]]
id = "acme"
networks = ["{network}"]
"""


@dataclass
class GateProcess:
    proc: asyncio.subprocess.Process
    port: int
    config_path: Path
    log_path: Path
    stderr_path: Path
    fmt: dict[str, object]
    template: str = CONFIG

    def write_config(self, **changes: object) -> None:
        self.config_path.write_text(self.template.format(**{**self.fmt, **changes}))

    def decisions(self) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        return [json.loads(x) for x in self.log_path.read_text().splitlines()]

    def stderr(self) -> str:
        return self.stderr_path.read_text()


async def wait_for_banner(port: int, proc: asyncio.subprocess.Process, path: Path) -> None:
    for _ in range(200):
        if proc.returncode is not None:
            raise AssertionError(f"gate exited {proc.returncode}: {path.read_text()}")
        try:
            async with RawClient("127.0.0.1", port) as c:
                if c.banner.startswith("220"):
                    return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError("gate did not start: " + path.read_text())


async def start_gate(
    config_path: Path, state_dir: Path, stderr_path: Path, port: int
) -> asyncio.subprocess.Process:
    """``mailguard serve`` as a subprocess, returned once it greets on ``port``."""
    with stderr_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailguard",
            "serve",
            "--config",
            str(config_path),
            stderr=err,
            stdout=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            env={**os.environ, "MAILGUARD_STATE_DIR": str(state_dir)},
        )
    await wait_for_banner(port, proc, stderr_path)
    return proc


async def launch_gate(
    tmp_path: Path, upstream: RecordingUpstream, template: str = CONFIG
) -> GateProcess:
    """``mailguard serve`` on ``template`` (formatted like ``CONFIG``), once it greets."""
    port = free_port()
    fmt: dict[str, object] = {
        "port": port,
        "state": tmp_path / "state",
        "upstream_port": upstream.port,
        "log": tmp_path / "decisions.jsonl",
        "network": "127.0.0.0/8",
    }
    config_path = tmp_path / "mailguard.toml"
    config_path.write_text(template.format(**fmt))
    stderr_path = tmp_path / "stderr.log"
    proc = await start_gate(config_path, tmp_path / "state", stderr_path, port)
    return GateProcess(
        proc, port, config_path, tmp_path / "decisions.jsonl", stderr_path, fmt, template
    )


async def stop_gate(gp: GateProcess) -> None:
    if gp.proc.returncode is None:
        gp.proc.terminate()
        await asyncio.wait_for(gp.proc.wait(), 20)


@pytest.fixture
async def gate_process(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[GateProcess]:
    gp = await launch_gate(tmp_path, upstream)
    yield gp
    await stop_gate(gp)


async def send_one(port: int, rcpt: str = "b@example.org") -> str:
    async with RawClient("127.0.0.1", port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<a@acme.example>")
        reply = await c.cmd(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            return reply
        return await c.data(b"Subject: x\r\n\r\nhello\r\n")


@pytest.mark.slow
async def test_serve_relays_and_reloads(gate_process: GateProcess, upstream: RecordingUpstream):
    gp = gate_process
    assert (await send_one(gp.port)).startswith("250")
    assert len(upstream.messages) == 1
    assert (gp.fmt["state"] / "redis" / "redis.sock").exists()  # type: ignore[operator]

    # An invalid new file is refused and the running config kept.
    gp.config_path.write_text(gp.config_path.read_text() + "\n[bogus]\n")
    gp.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert (await send_one(gp.port)).startswith("250")
    assert "reload refused" in gp.stderr()
    assert "bogus" in gp.stderr()

    # A valid one takes effect: 127.0.0.1 is no longer a customer network.
    gp.write_config(network="192.0.2.0/24")
    gp.proc.send_signal(signal.SIGHUP)
    await asyncio.sleep(0.5)
    assert (await send_one(gp.port)).startswith("554 5.7.1")
    assert len(upstream.messages) == 2


@pytest.mark.slow
async def test_sigterm_drains_in_flight_transaction(
    gate_process: GateProcess, upstream: RecordingUpstream
):
    gp = gate_process
    async with RawClient("127.0.0.1", gp.port) as busy, RawClient("127.0.0.1", gp.port) as idle:
        await idle.ehlo()
        await busy.ehlo()
        await busy.cmd("MAIL FROM:<a@acme.example>")
        await busy.cmd("RCPT TO:<b@example.org>")
        assert (await busy.cmd("DATA")).startswith("354")
        await busy.send(b"Subject: in flight\r\n\r\n")
        gp.proc.send_signal(signal.SIGTERM)
        # The idle connection is told to go away at once.
        assert (await idle.reply()).startswith("421 4.3.2")
        await asyncio.sleep(0.3)
        await busy.send(b"still sending\r\n.\r\n")
        assert (await busy.reply()).startswith("250")  # the transaction in flight completes
        assert (await busy.reply()).startswith("421 4.3.2")
    assert await asyncio.wait_for(gp.proc.wait(), 10) == 0, gp.stderr()
    assert len(upstream.messages) == 1
    assert b"still sending" in upstream.messages[0].data


def test_check_config_cli(tmp_path: Path) -> None:
    import subprocess

    ok = subprocess.run(
        [sys.executable, "-m", "mailguard", "check-config", str(ROOT / "config/mailguard.toml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text('[[customer]]\nid = "a"\nnetworks = ["10.0.0.300/24"]\n[server]\nport = 1\n')
    res = subprocess.run(
        [sys.executable, "-m", "mailguard", "check-config", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.returncode == 2
    assert (
        f'config error: {bad}: customer[0].networks[0]: "10.0.0.300/24" is not an IP network'
        in res.stderr
    )
    assert "server.port" in res.stderr
    assert "Traceback" not in res.stderr
