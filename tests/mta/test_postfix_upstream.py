"""``mailguard serve`` in front of a real Postfix (Debian's package, a private instance): what
the gate accepts is queued by Postfix, what it refuses never reaches Postfix."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.campaigns import campaign_copy
from tests.gate.conftest import free_port
from tests.gate.test_server import start_gate
from tests.gate.test_two_gates import CONFIG, send
from tests.mta.conftest import PrivatePostfix


@dataclass
class GateProcess:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path
    stderr_path: Path

    def decisions(self) -> list[dict[str, object]]:
        if not self.log_path.exists():
            return []
        return [json.loads(x) for x in self.log_path.read_text().splitlines()]


@pytest.fixture
async def gate_to_postfix(
    tmp_path: Path, redis_url: str, postfix_upstream: PrivatePostfix
) -> AsyncIterator[GateProcess]:
    """``mailguard serve`` as a process, relaying to the private Postfix, counting in Redis."""
    port = free_port()
    log_path = tmp_path / "decisions.jsonl"
    config_path = tmp_path / "mailguard.toml"
    config_path.write_text(
        CONFIG.format(
            n="",
            port=port,
            state=tmp_path / "state",
            upstream_port=postfix_upstream.port,
            redis_url=redis_url,
            log=log_path,
        )
    )
    stderr_path = tmp_path / "gate-stderr.log"
    proc = await start_gate(config_path, tmp_path / "state", stderr_path, port)
    try:
        yield GateProcess(proc, port, log_path, stderr_path)
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 15)


@pytest.mark.slow
async def test_accepted_mail_is_queued_by_postfix_and_refused_mail_never_reaches_it(
    gate_to_postfix: GateProcess, postfix_upstream: PrivatePostfix
) -> None:
    gate, postfix = gate_to_postfix, postfix_upstream
    rcpts = [f"user{i}@example.org" for i in range(21)]
    replies = [await send(gate.port, rcpt, campaign_copy(rcpt, i)) for i, rcpt in enumerate(rcpts)]
    assert all(r.startswith("250") for r in replies[:20]), replies[:20]
    assert replies[20].startswith("550 5.7.1 Refused: this message is one of 21 "), replies[20]

    # The 20 accepted copies are in Postfix's queue, each once, deferred (never delivered).
    assert postfix.wait_for_recipients(20) == sorted(rcpts[:20])
    queued = postfix.queued()
    assert len(queued) == 20
    assert {m["sender"] for m in queued} == {"news@acme.example"}
    # What Postfix holds is what the gate passed on: its trace header, then the client's text.
    first = next(m for m in queued if m["recipients"][0]["address"] == rcpts[0])  # type: ignore[index]
    text = postfix.message(str(first["queue_id"]))
    assert "by gate.test (mailguard)" in text
    assert "for <user0@example.org>" in text
    assert "Subject: Spring offers for you, Alice" in text

    # The refused 21st copy never reached Postfix as a message.  Its envelope did: the gate
    # relays MAIL and RCPT as they come, so Postfix assigned a queue id at RCPT, but the gate
    # refused at end of data without sending DATA, so no cleanup (no queue file) followed.
    await asyncio.sleep(0.3)  # anything late would show up by now
    assert "user20@example.org" not in postfix.recipients()
    log = postfix.maillog()
    assert "user20@example.org" not in log
    opened = set(re.findall(r"smtpd\[\d+\]: (\w+): client=", log))
    stored = set(re.findall(r"cleanup\[\d+\]: (\w+): message-id=", log))
    assert stored == {str(m["queue_id"]) for m in queued}
    assert len(opened - stored) == 1, log  # the 21st transaction, aborted before DATA
    decisions = gate.decisions()
    assert [d["decision"] for d in decisions][-1] == "reject"
    assert decisions[-1]["rule"] == "unsolicited_bulk"
