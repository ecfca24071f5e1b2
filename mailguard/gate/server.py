"""``mailguard serve``: run the gate on uvloop until SIGTERM, reloading on SIGHUP.

Responsible for: the event loop (the only module importing uvloop), the listeners, the store's
lifetime, readiness notification (systemd ``Type=notify``), draining on SIGTERM (stop accepting,
close idle connections, let in-flight transactions finish up to ``drain_timeout``) and atomic
config reload on SIGHUP (an invalid new file is logged and the old config kept).  With
``[server] workers`` above 1 the main process is ``workers.Supervisor`` and each worker runs
``serve`` on the listeners and store it inherits, reporting to it instead of to systemd.
Must never: hold policy logic.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
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
from mailguard.gate.workers import Supervisor, WorkerLink, worker_count
from mailguard.logsetup import setup_logging
from mailguard.sdnotify import notify
from mailguard.store.base import Store, StoreError
from mailguard.store.factory import attach_store, open_store

log = logging.getLogger("mailguard.gate")


class Gate:
    """A running gate: listeners plus the shared runtime."""

    def __init__(self, config: Config, store: Store, decision_log: DecisionLog) -> None:
        self.runtime = GateRuntime(config, store, decision_log)
        self.servers: list[asyncio.base_events.Server] = []

    async def start(
        self, sockets: tuple[socket.socket, ...] | None = None
    ) -> list[tuple[str, int]]:
        """Open every listener, or serve on ``sockets`` already listening (a worker's);
        returns the bound (host, port) pairs (port 0 picks one)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        servers = (
            [
                await loop.create_server(lambda: GateSession(self.runtime), sock=sock)
                for sock in sockets
            ]
            if sockets is not None
            else [
                await loop.create_server(
                    lambda: GateSession(self.runtime), addr.host, addr.port, reuse_address=True
                )
                for addr in self.runtime.config.server.listen
            ]
        )
        for server in servers:
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


async def serve(path: Path, config: Config, link: WorkerLink | None = None) -> None:
    """Run until SIGTERM/SIGINT; as one worker of several with ``link``."""
    if link is None:
        store = await open_store(config.store, config.server.state_dir)
    else:
        store = attach_store(config.store, link.store_url)
    try:
        decision_log = DecisionLog(config.log.decision_log)
    except BaseException:
        await store.close()
        raise
    gate = Gate(config, store, decision_log)
    try:
        await gate.start(link.sockets if link is not None else None)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(gate, path, link))
        if link is None:
            notify("READY=1")
        else:
            link.report("ready")
        await stop.wait()
        if link is None:
            notify("STOPPING=1")
        log.info("draining (up to %ss)", gate.runtime.config.server.drain_timeout)
        await gate.drain(gate.runtime.config.server.drain_timeout)
    finally:
        await store.close()
        decision_log.close()
    log.info("stopped")


def _reload(gate: Gate, path: Path, link: WorkerLink | None) -> None:
    if link is not None:  # the main process speaks to systemd
        gate.reload(path)
        link.report("reloaded")
        return
    notify("RELOADING=1")
    gate.reload(path)
    notify("READY=1")


def run(path: Path) -> int:
    """Entry point of ``mailguard serve``; returns the process exit status."""
    config = startup_config(path)
    if config is None:
        return 2
    setup_logging(config.log.level)
    count = worker_count(config)
    if count > 1:
        return Supervisor(path, config, count, functools.partial(_run_gate, path)).run()
    return _run_gate(path, None, config)


def _run_gate(path: Path, link: WorkerLink | None, config: Config) -> int:
    """Run the gate (alone, or as worker ``link``) to its end; the exit status."""
    try:
        uvloop.run(serve(path, config, link))
    except (OSError, ssl.SSLError, StoreError) as exc:
        # Bind failures, unreadable certificates or decision log, a store that cannot start.
        print(f"mailguard: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
