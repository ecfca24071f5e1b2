"""Private Postfix instances on the sending side: the customer's MTA relaying through the gate,
and a Postfix whose smtpd consults ``mailguard milter``.

``private_postfix`` starts a ``loadtest.postfix.PrivatePostfix`` with main.cf settings applied
by ``postconf -e`` before it starts (and its own ``myhostname`` awaited in the banner).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loadtest.postfix import PrivatePostfix
from tests.gate.conftest import free_port
from tests.mta.conftest import require_postfix


@contextmanager
def private_postfix(root: Path, **settings: str) -> Iterator[PrivatePostfix]:
    """A started PrivatePostfix under ``root`` (skipped without root, as in conftest)."""
    require_postfix()
    instance = PrivatePostfix(root, free_port(), settings)
    instance.create()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()


# A customer's Postfix relaying everything through the gate (``relayhost`` added by the caller):
# it delivers at once and over one connection at a time (the gate sees the copies in queue
# order), bounces without retrying, and sinks the bounce notices to its own sender
# (acme.example) in the ``discard`` transport rather than relaying them through the gate too.
CUSTOMER_SETTINGS = {
    "myhostname": "customer.test",
    "mydomain": "customer.test",
    "myorigin": "customer.test",
    "defer_transports": "",
    "soft_bounce": "no",
    "queue_run_delay": "1s",
    "minimal_backoff_time": "1s",
    "maximal_backoff_time": "2s",
    "smtp_destination_concurrency_limit": "1",
    "notify_classes": "",
    "transport_maps": "inline:{acme.example=discard:}",
}
