"""Postfix on the sending side of mailguard (issue 5, item 2): the customer's Postfix relaying
through ``mailguard serve`` (``relayhost``), and a Postfix whose smtpd consults
``mailguard milter`` (``smtpd_milters``).  The assertions are on what the sending Postfix logged
or answered."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.campaigns import campaign_copy
from tests.conftest import RedisServer
from tests.gate.test_two_gates import send
from tests.milter.conftest import RunningMilter, milter, milter_process  # noqa: F401 (fixtures)
from tests.mta.conftest import PrivatePostfix
from tests.mta.senders import CUSTOMER_SETTINGS, ConfiguredPostfix, private_postfix
from tests.mta.test_postfix_upstream import GateProcess, gate_to_postfix  # noqa: F401 (fixture)

RCPTS = [f"user{i}@example.org" for i in range(21)]
REFUSED = "550 5.7.1 Refused: this message is one of 21 "

# One delivery attempt through the gate, as the sending Postfix's smtp client logs it.
DELIVERY = re.compile(
    r"smtp\[\d+\]: \w+: to=<([^>]+)>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
    r"status=(\w+) \((.*)\)$",
    re.MULTILINE,
)


@pytest.fixture
def customer_postfix(
    tmp_path: Path,
    gate_to_postfix: GateProcess,  # noqa: F811
) -> Iterator[ConfiguredPostfix]:
    """The customer's Postfix, relaying through the gate (whose upstream is postfix_upstream)."""
    relayhost = f"[127.0.0.1]:{gate_to_postfix.port}"
    with private_postfix(tmp_path / "customer", relayhost=relayhost, **CUSTOMER_SETTINGS) as pf:
        yield pf


@pytest.fixture
def postfix_milter(
    tmp_path: Path,
    milter: RunningMilter,  # noqa: F811
) -> Iterator[ConfiguredPostfix]:
    """A Postfix whose smtpd asks the milter; it queues what it accepts and delivers nothing."""
    port = milter.spec.removeprefix("inet:").split("@")[0]
    with private_postfix(
        tmp_path / "milter-postfix",
        smtpd_milters=f"inet:127.0.0.1:{port}",
        milter_default_action="tempfail",
    ) as pf:
        yield pf


def wait_for_deliveries(postfix: PrivatePostfix, count: int, timeout: float = 20.0):
    """(recipient, status, reply) of the first ``count`` final delivery attempts to the gate."""
    deadline = time.monotonic() + timeout
    while len(found := DELIVERY.findall(postfix.maillog())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} deliveries:\n{postfix.maillog()}")
        time.sleep(0.1)
    return found


@pytest.mark.slow
async def test_customer_postfix_relays_twenty_copies_and_bounces_the_21st(
    customer_postfix: ConfiguredPostfix,
    postfix_upstream: PrivatePostfix,
    gate_to_postfix: GateProcess,  # noqa: F811
) -> None:
    for i, rcpt in enumerate(RCPTS):
        reply = await send(customer_postfix.port, rcpt, campaign_copy(rcpt, i))
        assert reply.startswith("250 2.0.0 Ok: queued as "), reply

    deliveries = wait_for_deliveries(customer_postfix, 21)
    assert len(deliveries) == 21, deliveries
    sent = [d for d in deliveries if d[1] == "sent"]
    bounced = [d for d in deliveries if d[1] == "bounced"]
    assert len(sent) == 20, deliveries
    assert all(reply.startswith("250 ") for _, _, reply in sent), sent
    assert len(bounced) == 1, deliveries
    rcpt, _, reply = bounced[0]
    assert reply.startswith(f"host 127.0.0.1[127.0.0.1] said: {REFUSED}"), reply
    assert reply.endswith("(in reply to end of DATA command)"), reply
    assert sorted(r for r, _, _ in sent) == sorted(set(RCPTS) - {rcpt})

    # The 20 relayed copies reached the gate's upstream; the bounced one did not.
    assert postfix_upstream.wait_for_recipients(20) == sorted(r for r, _, _ in sent)
    decisions = [d["decision"] for d in gate_to_postfix.decisions()]
    assert decisions.count("reject") == 1, decisions
    # The bounce notice to the customer's own sender went to the local sink, not to the gate.
    customer_postfix.wait_for_log(r"discard\[\d+\]: \w+: to=<news@acme\.example>")


@pytest.mark.slow
async def test_postfix_with_the_milter_refuses_the_21st_copy_and_tempfails_without_redis(
    postfix_milter: ConfiguredPostfix,
    milter: RunningMilter,  # noqa: F811
    redis_server: RedisServer,
) -> None:
    replies = [
        await send(postfix_milter.port, rcpt, campaign_copy(rcpt, i))
        for i, rcpt in enumerate(RCPTS)
    ]
    assert all(r.startswith("250 2.0.0 Ok: queued as ") for r in replies[:20]), replies[:20]
    assert replies[20].startswith(REFUSED), replies[20]
    assert postfix_milter.wait_for_recipients(20) == sorted(RCPTS[:20])
    assert [d["decision"] for d in milter.decisions()][-1] == "reject"

    redis_server.stop()
    try:
        reply = await send(postfix_milter.port, "late@example.org", b"Subject: hi\r\n\r\nhi\r\n")
    finally:
        redis_server.start()
    assert reply.startswith("451 4.3.0"), reply
    assert "late@example.org" not in postfix_milter.recipients()
