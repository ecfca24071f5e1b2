"""``mailguard serve``: run the gate on uvloop until SIGTERM, reloading on SIGHUP.

Responsible for: the event loop (the only module importing uvloop), the listeners, the store's
lifetime, readiness notification (systemd ``Type=notify``), draining on SIGTERM (stop accepting,
close idle connections, let in-flight transactions finish up to ``drain_timeout``) and atomic
config reload on SIGHUP (an invalid new file is logged and the old config kept).
Must never: hold policy logic.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
import time
from pathlib import Path

import uvloop

from mailguard.config.load import reload_config, startup_config
from mailguard.config.schema import Config
from mailguard.decisionlog import DecisionLog
from mailguard.gate.runtime import GateRuntime
from mailguard.gate.session import GateSession
from mailguard.logsetup import setup_logging
from mailguard.sdnotify import notify
from mailguard.store.base import Store, StoreError
from mailguard.store.factory import open_store

log = logging.getLogger("mailguard.gate")


class Gate:
    """A running gate: listeners plus the shared runtime."""

    def __init__(self, config: Config, store: Store, decision_log: DecisionLog) -> None:
        self.runtime = GateRuntime(config, store, decision_log)
        self.servers: list[asyncio.base_events.Server] = []

    async def start(self) -> list[tuple[str, int]]:
        """Open every listener; returns the bound (host, port) pairs (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for addr in self.runtime.config.server.listen:
            server = await loop.create_server(
                lambda: GateSession(self.runtime), addr.host, addr.port, reuse_address=True
            )
            self.servers.append(server)
            for sock in server.sockets:
                name = sock.getsockname()
                bound.append((str(name[0]), int(name[1])))
        log.info("listening on %s", ", ".join(f"{h}:{p}" for h, p in bound))
        return bound

    async def drain(self, deadline: float) -> None:
        """Stop accepting; close idle sessions now, busy ones when done or at ``deadline``."""
        runtime = self.runtime
        runtime.draining = True
        for server in self.servers:
            server.close()
        end = time.monotonic() + deadline
        while True:
            for session in list(runtime.sessions):
                session.closing = True
                if session.idle:
                    session.hang_up("421 4.3.2 Service shutting down, please try again later")
            if not runtime.sessions or time.monotonic() >= end:
                break
            await asyncio.sleep(0.05)
        for session in list(runtime.sessions):
            log.warning("drain deadline: closing %s mid-transaction", session.client_ip)
            session.hang_up("421 4.3.2 Service shutting down, please try again later")
        await asyncio.sleep(0)
        await runtime.pool.close()

    def reload(self, path: Path) -> bool:
        """Load ``path`` and switch to it; on any error keep the running config."""
        config = reload_config(path, log)
        if config is None:
            return False
        old = self.runtime.config
        try:
            self.runtime.apply(config)
        except (OSError, ssl.SSLError) as exc:
            log.error("reload refused, keeping the running config: TLS certificate: %s", exc)
            return False
        if config.server.listen != old.server.listen or config.store != old.store:
            log.warning("reload: [server] listen and [store] changes take effect on restart")
        log.info("configuration reloaded from %s", path)
        return True


async def serve(path: Path, config: Config) -> None:
    """Run until SIGTERM/SIGINT."""
    state_dir = config.server.state_dir
    store = await open_store(config.store, state_dir)
    decision_log = DecisionLog(config.log.decision_log)
    gate = Gate(config, store, decision_log)
    try:
        await gate.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(gate, path))
        notify("READY=1")
        await stop.wait()
        notify("STOPPING=1")
        log.info("draining (up to %ss)", gate.runtime.config.server.drain_timeout)
        await gate.drain(gate.runtime.config.server.drain_timeout)
    finally:
        await store.close()
        decision_log.close()
    log.info("stopped")


def _reload(gate: Gate, path: Path) -> None:
    notify("RELOADING=1")
    gate.reload(path)
    notify("READY=1")


def run(path: Path) -> int:
    """Entry point of ``mailguard serve``; returns the process exit status."""
    config = startup_config(path)
    if config is None:
        return 2
    setup_logging(config.log.level)
    try:
        uvloop.run(serve(path, config))
    except (OSError, ssl.SSLError, StoreError) as exc:
        # Bind failures, unreadable certificates or decision log, a store that cannot start.
        print(f"mailguard: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
