"""The customer's Postfix sending through mailguard, in both modes (issue 5, item 2).

The customer's Postfix relays everything (``relayhost``) to a door: either ``mailguard serve``
(whose upstream is a private Postfix that queues), or a private Postfix whose smtpd consults
``mailguard milter`` (``smtpd_milters``) and queues.  The same four scenarios run through both:
a clean message passes, the 21st recipient of a campaign is bounced, the 11th copy to one
recipient is bounced (and the sender's next message to it deferred at RCPT), and with Redis
stopped the message is deferred, then sent once Redis is back.  The assertions are on what the
customer's Postfix logged (sent / bounced / deferred, with the door's reply), on what reached
the queue behind the door, and on the door's decision log.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.campaigns import campaign_copy
from tests.conftest import RedisServer
from tests.gate.test_two_gates import send
from tests.milter.conftest import RunningMilter, milter, milter_process  # noqa: F401 (fixtures)
from tests.mta.conftest import PrivatePostfix
from tests.mta.senders import CUSTOMER_SETTINGS, private_postfix
from tests.mta.test_postfix_upstream import GateProcess, gate_to_postfix  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

BOB = "bob@example.org"
CLEAN = b"Subject: Minutes\r\nFrom: Ann <news@acme.example>\r\n\r\nThe minutes are attached.\r\n"
BULK_REFUSED = (
    "550 5.7.1 Refused: this message is one of 21 substantively similar messages to "
    "different recipients in 24h, and this server is not a designated list server "
    "(AUP: unsolicited bulk e-mail). See https://www.example.net/aup"
)
BOMB_REFUSED = (
    "550 5.7.1 Refused: this would be message 11 of substantively similar messages to "
    f"<{BOB}> in 24h; at most 10 are allowed (AUP: mail bombing). See https://www.example.net/aup"
)
HELD = (
    f"450 4.7.1 Deferred: mail from this sender to <{BOB}> is held for up to 10m after message "
    "11 of substantively similar messages to it in 24h was refused; at most 10 are allowed "
    "(AUP: mail bombing). See https://www.example.net/aup"
)
TEMPFAIL = "451 4.3.0 "

# One delivery attempt to the door, as the customer Postfix's smtp client logs it.
DELIVERY = re.compile(
    r"smtp\[\d+\]: (\w+): to=<([^>]+)>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:\d+, .*"
    r"status=(\w+) \((.*)\)$",
    re.MULTILINE,
)


@dataclass
class Delivery:
    queue_id: str
    rcpt: str
    status: str  # sent, bounced, deferred
    reply: str


@dataclass
class Door:
    """Where the customer's Postfix relays: the port, the queue behind it, the decision log."""

    name: str
    port: int
    queue: PrivatePostfix
    decisions: Callable[[], list[dict[str, Any]]]


@pytest.fixture(params=["gate", "milter"])
def door(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Door]:
    if request.param == "gate":
        gate: GateProcess = request.getfixturevalue("gate_to_postfix")
        upstream: PrivatePostfix = request.getfixturevalue("postfix_upstream")
        yield Door("gate", gate.port, upstream, gate.decisions)
        return
    running: RunningMilter = request.getfixturevalue("milter")
    port = running.spec.removeprefix("inet:").split("@")[0]
    with private_postfix(
        tmp_path / "milter-postfix",
        smtpd_milters=f"inet:127.0.0.1:{port}",
        milter_default_action="tempfail",
    ) as pf:
        yield Door("milter", pf.port, pf, running.decisions)


@pytest.fixture
def customer(tmp_path: Path, door: Door) -> Iterator[PrivatePostfix]:
    """The customer's Postfix, relaying everything to ``door``."""
    relayhost = f"[127.0.0.1]:{door.port}"
    with private_postfix(tmp_path / "customer", relayhost=relayhost, **CUSTOMER_SETTINGS) as pf:
        yield pf


def deliveries(postfix: PrivatePostfix, count: int, timeout: float = 20.0) -> list[Delivery]:
    """The first ``count`` delivery attempts to the door, in the order Postfix logged them."""
    deadline = time.monotonic() + timeout
    while len(found := DELIVERY.findall(postfix.maillog())) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(found)} of {count} deliveries:\n{postfix.maillog()}")
        time.sleep(0.1)
    return [Delivery(*f) for f in found]


def said(reply: str) -> str:
    """The door's reply as Postfix quotes it in a bounce or deferral."""
    return f"host 127.0.0.1[127.0.0.1] said: {reply}"


async def submit(customer: PrivatePostfix, rcpt: str, message: bytes) -> None:
    reply = await send(customer.port, rcpt, message)
    assert reply.startswith("250 2.0.0 Ok: queued as "), reply


async def test_clean_message_is_sent(customer: PrivatePostfix, door: Door) -> None:
    await submit(customer, BOB, CLEAN)
    [delivery] = deliveries(customer, 1)
    assert delivery.status == "sent" and delivery.reply.startswith("250 2.0.0 Ok"), delivery
    assert door.queue.wait_for_recipients(1) == [BOB]
    [decision] = door.decisions()
    assert (decision["decision"], decision["customer"], decision["rcpts"]) == (
        "accept",
        "acme",
        [{"rcpt": BOB, "reply": "250"}],
    )


async def test_21st_recipient_of_a_campaign_is_bounced(
    customer: PrivatePostfix, door: Door
) -> None:
    rcpts = [f"user{i}@example.org" for i in range(21)]
    for i, rcpt in enumerate(rcpts):
        await submit(customer, rcpt, campaign_copy(rcpt, i))
    found = deliveries(customer, 21)
    sent = [d for d in found if d.status == "sent"]
    bounced = [d for d in found if d.status == "bounced"]
    assert len(sent) == 20 and len(bounced) == 1, found
    assert bounced[0].reply == said(BULK_REFUSED) + " (in reply to end of DATA command)"
    assert door.queue.wait_for_recipients(20) == sorted(d.rcpt for d in sent)
    assert [d["decision"] for d in door.decisions()].count("reject") == 1
    # The bounce notice to the customer's own sender went to its local sink, not to the door.
    customer.wait_for_log(r"discard\[\d+\]: \w+: to=<news@acme\.example>")


async def test_11th_copy_to_one_recipient_is_bounced_and_the_12th_held_at_rcpt(
    customer: PrivatePostfix, door: Door
) -> None:
    for i in range(11):
        await submit(customer, BOB, campaign_copy(BOB, i))
    found = deliveries(customer, 11)
    assert [d.status for d in found] == ["sent"] * 10 + ["bounced"], found
    assert found[10].reply == said(BOMB_REFUSED) + " (in reply to end of DATA command)"
    assert door.queue.wait_for_recipients(10) == [BOB] * 10
    decision = door.decisions()[-1]
    assert (decision["rule"], decision["numbers"]["count"]) == ("mailbomb", 11), decision
    # The sender's next message to the same recipient is held at RCPT: deferred, not bounced.
    await submit(customer, BOB, campaign_copy(BOB, 11))
    held = deliveries(customer, 12)[11]
    assert held.status == "deferred", held
    assert held.reply == said(HELD) + " (in reply to RCPT TO command)", held
    assert door.decisions()[-1]["rule"] == "mailbomb_hold"


async def test_redis_stopped_defers_and_the_retry_is_sent(
    customer: PrivatePostfix, door: Door, redis_server: RedisServer
) -> None:
    redis_server.stop()
    try:
        await submit(customer, BOB, CLEAN)
        [delivery] = deliveries(customer, 1)
    finally:
        redis_server.start()
    assert delivery.status == "deferred", delivery
    assert delivery.reply.startswith(said(TEMPFAIL)), delivery
    # Postfix retries the same queue file and the door now accepts it.  The retry is asked for
    # (postqueue -f, as an admin would) rather than left to the backoff timer: once, in CI, a
    # deferral racing qmgr's queue scan ("skipped, still being delivered") was not retried in 20 s.
    customer.postfix("flush")
    retried = deliveries(customer, 2)[1]
    assert (retried.queue_id, retried.status) == (delivery.queue_id, "sent"), retried
    assert door.queue.wait_for_recipients(1) == [BOB]
    assert [d["decision"] for d in door.decisions()] == ["defer", "accept"]
    assert door.decisions()[0]["rule"] == "store_failure"
