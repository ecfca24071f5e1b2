"""Private Postfix instances on the sending side: the customer's MTA relaying through the gate,
and a Postfix whose smtpd consults ``mailguard milter``.

``ConfiguredPostfix`` is conftest's ``PrivatePostfix`` with main.cf settings applied by
``postconf -e`` before it starts (and its own ``myhostname`` awaited in the banner).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.gate.conftest import free_port
from tests.mta.conftest import POSTCONF, PrivatePostfix, _banner, require_postfix


@dataclass
class ConfiguredPostfix(PrivatePostfix):
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.settings.get("myhostname", "upstream.test")

    def create(self) -> None:
        super().create()
        if self.settings:
            pairs = [f"{key}={value}" for key, value in self.settings.items()]
            self._run(POSTCONF, "-c", str(self.config_dir), "-e", *pairs)
            self.postfix("check")

    def start(self, timeout: float = 10.0) -> None:
        self.postfix("start")
        deadline = time.monotonic() + timeout
        while not _banner(self.port).startswith(f"220 {self.hostname}".encode()):
            if time.monotonic() > deadline:
                raise AssertionError(f"postfix smtpd did not answer:\n{self.maillog()}")
            time.sleep(0.02)


@contextmanager
def private_postfix(root: Path, **settings: str) -> Iterator[ConfiguredPostfix]:
    """A started ConfiguredPostfix under ``root`` (skipped without root, as in conftest)."""
    require_postfix()
    instance = ConfiguredPostfix(root, free_port(), settings)
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
