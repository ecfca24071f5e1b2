"""Two ``mailguard serve`` processes sharing one Redis: the bulk threshold holds exactly under
50 concurrent connections spread over both (issue 4's concurrency case)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.campaigns import campaign_copy
from tests.gate.conftest import RecordingUpstream, free_port
from tests.gate.smtpraw import RawClient
from tests.gate.test_server import start_gate

CONFIG = """
[server]
listen = ["127.0.0.1:{port}"]
hostname = "gate{n}.test"
state_dir = "{state}"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
[store]
url = "{redis_url}"
[log]
decision_log = "{log}"
[[customer]]
id = "acme"
networks = ["127.0.0.0/8"]
"""


async def send(port: int, rcpt: str, body: bytes) -> str:
    """One transaction to a gate on ``port``: the DATA reply (or the recipient's refusal)."""
    async with RawClient("127.0.0.1", port) as c:
        await c.ehlo()
        await c.cmd("MAIL FROM:<news@acme.example>")
        reply = await c.cmd(f"RCPT TO:<{rcpt}>")
        if not reply.startswith("250"):
            return reply
        return await c.data(body.replace(b"\r\n.", b"\r\n.."))


@pytest.mark.slow
async def test_two_gate_processes_share_the_threshold(
    tmp_path: Path, upstream: RecordingUpstream, redis_url: str
):
    procs = []
    ports = []
    try:
        for n in (1, 2):
            port = free_port()
            config = tmp_path / f"gate{n}.toml"
            config.write_text(
                CONFIG.format(
                    port=port,
                    n=n,
                    state=tmp_path / f"state{n}",
                    upstream_port=upstream.port,
                    redis_url=redis_url,
                    log=tmp_path / f"decisions{n}.jsonl",
                )
            )
            err = tmp_path / f"stderr{n}.log"
            procs.append(await start_gate(config, tmp_path / f"state{n}", err, port))
            ports.append(port)
        replies = await asyncio.gather(
            *(
                send(ports[i % 2], f"c{i}@example.org", campaign_copy(f"c{i}@example.org", i))
                for i in range(50)
            )
        )
        assert sum(r.startswith("250") for r in replies) == 20, replies
        assert sum(r.startswith("550 5.7.1 Refused") for r in replies) == 30
        assert len(upstream.messages) == 20
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
        for proc in procs:
            await asyncio.wait_for(proc.wait(), 15)
