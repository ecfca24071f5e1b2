"""Fixtures for gate integration tests: a recording upstream MTA and a gate in the test's loop.

``upstream``: a real SMTP server (aiosmtpd, advertising PIPELINING) on a free loopback port that
records every message it accepts; recipients whose local part starts with ``refuse`` get a 550,
``tempfail`` a 450, and ``upstream.data_reply`` overrides the DATA reply.
``make_gate``: starts a gate (real listeners on 127.0.0.1, a RedisStore on the session's real
redis-server) from TOML text; the decision log goes to a file the test can read.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailguard.config.load import parse_config
from mailguard.decisionlog import DecisionLog
from mailguard.gate.server import Gate
from mailguard.store.redis_store import RedisStore

try:
    import tomllib
except ImportError:  # pragma: no cover
    import tomli as tomllib  # type: ignore[no-redef]


@dataclass
class Received:
    mail_from: str
    rcpts: list[str]
    data: bytes  # as delivered, dot-unstuffed


@dataclass
class RecordingUpstream:
    host: str = "127.0.0.1"
    port: int = 0
    messages: list[Received] = field(default_factory=list)
    data_reply: str | None = None
    mail_reply: str | None = None
    data_delay: float = 0.0  # seconds before answering end of data
    connections: int = 0
    server: asyncio.base_events.Server | None = None

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        local = address.split("@")[0]
        if local.startswith("die"):  # the upstream drops the connection
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.0 going away"
        if local.startswith("refuse"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if local.startswith("tempfail"):
            return f"450 4.2.0 <{address}>: Recipient address rejected: try later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.data_reply:
            return self.data_reply
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(
            Received(str(envelope.mail_from), list(envelope.rcpt_tos), envelope.original_content)
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.connections += 1
            return SMTP(
                self,
                hostname="upstream.test",
                enable_SMTPUTF8=True,
                data_size_limit=None,
                loop=loop,
            )

        self.server = await loop.create_server(factory, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    up = RecordingUpstream()
    await up.start()
    yield up
    await up.stop()


@dataclass
class RunningGate:
    gate: Gate
    host: str
    port: int
    log_path: Path

    def decisions(self) -> list[dict[str, Any]]:
        if not self.log_path.exists():
            return []
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


BASE_CONFIG = """
[server]
listen = ["127.0.0.1:{gate_port}"]
hostname = "gate.test"
state_dir = "{state_dir}"
[upstream]
host = "127.0.0.1"
port = {upstream_port}
[store]
url = "{redis_url}"
[log]
decision_log = "{log_path}"
[[customer]]
id = "acme"
networks = ["127.0.0.0/8"]
domains = ["acme.example"]
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


MakeGate = Callable[..., Awaitable[RunningGate]]


@pytest.fixture
async def make_gate(
    tmp_path: Path, redis_url: str, upstream: RecordingUpstream
) -> AsyncIterator[MakeGate]:
    started: list[tuple[Gate, RedisStore, DecisionLog]] = []

    async def make(toml: str | None = None, extra: str = "") -> RunningGate:
        text = (toml if toml is not None else BASE_CONFIG) + extra
        log_path = tmp_path / f"decisions-{len(started)}.jsonl"
        text = text.format(
            state_dir=tmp_path / "state",
            upstream_port=upstream.port,
            redis_url=redis_url,
            log_path=log_path,
            gate_port=free_port(),
        )
        config = parse_config(tomllib.loads(text), None)
        store = RedisStore(config.store.url, timeout=config.store.timeout)
        dlog = DecisionLog(config.log.decision_log)
        gate = Gate(config, store, dlog)
        started.append((gate, store, dlog))
        bound = await gate.start()
        host, port = bound[0]
        return RunningGate(gate, host, port, log_path)

    yield make
    for gate, store, dlog in started:
        await gate.drain(0.5)
        await store.close()
        dlog.close()


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Gate tests run on uvloop, as ``mailguard serve`` does."""
    import uvloop

    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate and key for gate.test, made with openssl."""
    import subprocess

    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gate.test",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def with_tls(config: str, certificate: tuple[Path, Path]) -> str:
    cert, key = certificate
    return config.replace(
        'hostname = "gate.test"',
        f'hostname = "gate.test"\ntls_certificate = "{cert}"\ntls_key = "{key}"',
    )
