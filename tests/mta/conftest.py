"""Real MTAs for the gate: a private Postfix instance from Debian's package
(``loadtest.postfix.PrivatePostfix``, shared with the load runs).

``postfix_upstream``: a Postfix that is nobody's but this test's: its configuration, queue and
log live under ``tmp_path``, its smtpd listens on one free port of 127.0.0.1 only, and it never
delivers anything: every destination is relayed to a ``relayhost`` that is not contacted because
``defer_transports = smtp``, so each accepted message stays in the queue, where ``queued()``
(``postqueue -j``) and ``postcat`` read it.  The system's own instance (/etc/postfix,
/var/spool/postfix) is neither read for settings nor written.

Starting a Postfix master needs root (it binds as root, then runs its daemons as ``postfix``);
without root the tests are skipped.  A missing Postfix is a failure: CI must install it
(``apt-get install postfix``).

Layout: ``conf/`` (main.cf, master.cf), ``queue/`` (queue_directory, root-owned like Postfix
wants it), ``queue/data`` (data_directory, given relative to the queue directory because the
daemons run as ``postfix`` and cannot cross pytest's 0700 temporary directories by absolute
path, while they do start from the queue directory), ``maillog`` (postlogd).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.postfix import POSTCAT, POSTCONF, POSTFIX, POSTQUEUE, PrivatePostfix
from tests.gate.conftest import free_port


def require_postfix() -> None:
    """Fail without Postfix's programs (CI must install them); skip when not root."""
    for binary in (POSTFIX, POSTCONF, POSTQUEUE, POSTCAT):
        if not os.access(binary, os.X_OK):
            pytest.fail(
                f"{binary} not found: the real-MTA tests need Postfix (apt-get install postfix)",
                pytrace=False,
            )
    if os.geteuid() != 0:
        pytest.skip("a private Postfix master must be started as root")


@pytest.fixture
def postfix_upstream(tmp_path: Path) -> Iterator[PrivatePostfix]:
    """A private Postfix on 127.0.0.1 that keeps everything it accepts in its queue."""
    require_postfix()
    instance = PrivatePostfix(tmp_path / "postfix", free_port())
    instance.create()
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
