"""``run``: load the config, open the store on the bridge loop, and serve libmilter until stopped.

Responsible for: process wiring (config errors as exit status 2, the store opened on the one
event loop that will use it, libmilter registered on the socket spec, everything closed on exit).
libmilter handles SIGTERM/SIGINT/SIGHUP itself and returns from ``runmilter``.
Must never: import the gate or uvloop.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import Milter  # type: ignore[import-untyped]

from mailguard.config.load import ConfigError, load_config
from mailguard.decisionlog import DecisionLog
from mailguard.logsetup import setup_logging
from mailguard.milter.loop import LoopThread
from mailguard.milter.runtime import MilterRuntime
from mailguard.milter.session import MailguardMilter
from mailguard.store.base import StoreError
from mailguard.store.factory import open_store

log = logging.getLogger("mailguard.milter")


def run(
    config_path: str | Path, socket_spec: str | None = None, timeout: float | None = None
) -> int:
    """Serve until libmilter stops (SIGTERM/SIGINT); exit status 0, or 2 on a config error.
    ``socket_spec`` and ``timeout`` override ``[milter] listen`` and ``timeout``."""
    path = Path(config_path)
    try:
        config = load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    setup_logging(config.log.level)
    socket_spec = socket_spec or config.milter.listen
    timeout = timeout if timeout is not None else config.milter.timeout
    bridge = LoopThread()
    try:
        store = bridge.call(open_store(config.store, config.server.state_dir), 60.0)
    except (StoreError, ValueError) as exc:
        print(f"mailguard milter: cannot open the store: {exc}", file=sys.stderr)
        bridge.stop()
        return 1
    decision_log = DecisionLog(config.log.decision_log)
    runtime = MilterRuntime(config, store, decision_log, bridge, timeout)
    try:
        Milter.factory = lambda: MailguardMilter(runtime)
        Milter.set_flags(Milter.ADDHDRS)
        log.info("mailguard milter listening on %s (policy timeout %ss)", socket_spec, timeout)
        # libmilter's own socket timeout toward the MTA: generous, the MTA has its own.
        Milter.runmilter("mailguard", socket_spec, 240)
    finally:
        try:
            bridge.call(store.close(), 10.0)
        except (StoreError, TimeoutError) as exc:
            log.warning("closing the store: %s", exc)
        bridge.stop()
        decision_log.close()
    log.info("stopped")
    return 0
