"""``run``: load the config, open the store on the bridge loop, and serve libmilter until stopped.

Responsible for: process wiring (config errors as exit status 2, the store opened on the one
event loop that will use it, libmilter registered on the socket spec, everything closed on exit).
Signals: SIGTERM, SIGINT and SIGHUP stop it (libmilter's own rule: its signal thread takes all
three), SIGUSR1 reloads the config (customers, policy, templates) without dropping connections.
Readiness (systemd ``Type=notify``) is signalled once the listening socket is open.
Must never: import the gate or uvloop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import Milter  # type: ignore[import-untyped]
import milter  # type: ignore[import-not-found]

from mailguard.config.load import reload_config, startup_config
from mailguard.config.schema import Config
from mailguard.decisionlog import DecisionLog
from mailguard.logsetup import setup_logging
from mailguard.milter.loop import LoopThread
from mailguard.milter.runtime import MilterRuntime
from mailguard.milter.session import MailguardMilter
from mailguard.sdnotify import notify
from mailguard.store.base import StoreError
from mailguard.store.factory import open_store

log = logging.getLogger("mailguard.milter")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
RELOAD_SIGNAL = signal.SIGUSR1
NAME = "mailguard"  # the filter's name for libmilter (Sendmail's X line)


def _listen(socket_spec: str) -> bool:
    """Open libmilter's listening socket now, so readiness can be signalled truthfully: pymilter's
    ``runmilter`` opens it only inside the call that then blocks serving."""
    try:
        milter.setconn(socket_spec)
        milter.register(NAME)
        milter.opensocket(True)  # True: remove a stale unix socket file first
    except milter.error as exc:
        print(f"mailguard milter: cannot listen on {socket_spec}: {exc}", file=sys.stderr)
        return False
    return True


def run(
    config_path: str | Path, socket_spec: str | None = None, timeout: float | None = None
) -> int:
    """Serve until libmilter stops (SIGTERM/SIGINT); exit status 0, or 2 on a config error.
    ``socket_spec`` and ``timeout`` override ``[milter] listen`` and ``timeout``."""
    path = Path(config_path)
    config = startup_config(path)
    if config is None:
        return 2
    setup_logging(config.log.level)
    socket_spec = socket_spec or config.milter.listen
    timeout = timeout if timeout is not None else config.milter.timeout
    return _serve(config, path, socket_spec, timeout)


class _SignalWatch:
    """Stop and reload signals, acted on by one thread, whichever thread the kernel picks.

    libmilter takes SIGTERM/SIGINT/SIGHUP with sigwait() in a thread of its own and blocks them
    in the threads it starts, but threads that exist before it (the store's loop, a numeric
    library's workers) do not block them: a signal delivered there would take its default
    action and kill the process mid-transaction.  So every one of them gets a handler, which
    only writes the signal number to a pipe (``signal.set_wakeup_fd``); this thread reads it
    and stops libmilter (``smfi_stop``) or reloads the config.
    """

    def __init__(self, runtime: MilterRuntime, path: Path) -> None:
        self.runtime = runtime
        self.path = path
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._previous_fd = signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        self._previous = {
            signum: signal.signal(signum, _note) for signum in (*STOP_SIGNALS, RELOAD_SIGNAL)
        }
        threading.Thread(target=self._watch, name="signals", daemon=True).start()

    def _watch(self) -> None:
        while data := os.read(self._read, 64):
            for signum in data:
                if signum == RELOAD_SIGNAL:
                    try:
                        _reload(self.runtime, self.path)
                    except Exception:  # a bug: keep running, and keep taking signals
                        log.exception("reload failed, keeping the running config")
                elif signum in STOP_SIGNALS:
                    log.info("%s: stopping", signal.Signals(signum).name)
                    milter.stop()

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous_fd)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._write)  # the watcher reads end of file and ends


def _note(signum: int, frame: object) -> None:
    """The Python-level handler: nothing to do, the wakeup pipe carries the signal."""


def _reload(runtime: MilterRuntime, path: Path) -> None:
    """Switch to the config at ``path``; keep the running one when it is not valid."""
    notify("RELOADING=1")
    config = reload_config(path, log)
    if config is not None:
        old = runtime.config
        runtime.apply(config)
        if config.milter.listen != old.milter.listen or config.store != old.store:
            log.warning("reload: [milter] listen and [store] changes take effect on restart")
        log.info("configuration reloaded from %s", path)
    notify("READY=1")


def _serve(config: Config, path: Path, socket_spec: str, timeout: float) -> int:
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
        if not _listen(socket_spec):
            return 1
        log.info("mailguard milter listening on %s (policy timeout %ss)", socket_spec, timeout)
        watch = _SignalWatch(runtime, path)
        notify("READY=1")
        # libmilter's own socket timeout toward the MTA: generous, the MTA has its own.
        # runmilter registers again and finds the socket open (smfi_opensocket is a no-op then).
        try:
            Milter.runmilter(NAME, socket_spec, 240)
        finally:
            watch.close()
        notify("STOPPING=1")
    finally:
        try:
            bridge.call(store.close(), 10.0)
        except (StoreError, TimeoutError) as exc:
            log.warning("closing the store: %s", exc)
        bridge.stop()
        decision_log.close()
    log.info("stopped")
    return 0
