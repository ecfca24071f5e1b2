"""``[server] workers = N``: N gate processes sharing the listeners and the store.

Responsible for: the main process of a multi-process gate.  It opens the listening sockets and
the embedded store's redis-server (when ``[store] url = "embedded"``), then forks the workers;
each worker runs the ordinary gate (``server.serve``) on the inherited sockets with its own
event loop, upstream pool and store connections, so one campaign's thresholds hold exactly
across workers as they do across gates sharing one Redis.  The kernel hands each connection to
whichever worker accepts it first, so an idle worker takes the next one.

The main process does no SMTP.  It reports readiness to systemd once every worker is ready
(each writes a line on a pipe), passes SIGHUP on (each worker reloads the file itself; the
main process sends ``READY=1`` again when all have reported, or after ``_RELOAD_WAIT``
seconds), and on SIGTERM/SIGINT closes its copies of the listeners, passes SIGTERM on, waits
for the workers to drain, then stops the embedded redis-server.  A worker that dies is
restarted (after 1 s, doubling up to ``_MAX_BACKOFF`` while it keeps dying within
``_STABLE`` seconds), and so is the embedded redis-server; a worker that dies before the first
readiness means the gate cannot start: the others are stopped and the main process exits 1.
Must never: hold policy, speak SMTP, reap a process it did not fork (the embedded
redis-server is its ``subprocess`` child), or leave a worker behind when it exits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import socket
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mailguard.config.load import reload_config
from mailguard.config.schema import Config, ListenAddress
from mailguard.decisionlog import DecisionLog
from mailguard.gate.runtime import tls_context_of
from mailguard.sdnotify import notify
from mailguard.store.base import StoreError
from mailguard.store.embedded import EmbeddedRedis

log = logging.getLogger("mailguard.gate")

_BACKLOG = 100  # asyncio's default, as the single-process gate's listeners have
_RELOAD_WAIT = 10.0
_STABLE = 30.0
_MAX_BACKOFF = 30.0
_KILL_GRACE = 10.0  # beyond drain_timeout, before a worker that does not stop is killed
_FORWARDED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def worker_count(config: Config) -> int:
    """The number of gate processes ``config`` asks for (``workers = "auto"``: one per CPU)."""
    wanted = config.server.workers
    if wanted > 0:
        return wanted
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker gets from the main process: the listeners, where the store is, the pipe."""

    slot: int
    sockets: tuple[socket.socket, ...]
    store_url: str | None  # the embedded redis-server's URL; None: the configured URL
    report_fd: int

    def report(self, event: str) -> None:
        """Tell the main process ``event`` (``ready`` / ``reloaded``); never raises."""
        with contextlib.suppress(OSError):
            os.write(self.report_fd, f"{self.slot} {event}\n".encode())


def open_listeners(addresses: tuple[ListenAddress, ...]) -> list[socket.socket]:
    """Bound, listening, non-blocking sockets for every address (as ``loop.create_server``
    makes them: every address a host name resolves to; port 0 picks one port for all).
    Raises OSError naming the address that cannot be bound."""
    sockets: list[socket.socket] = []
    try:
        for addr in addresses:
            port = addr.port
            infos = socket.getaddrinfo(
                addr.host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            for family, kind, proto, _name, sockaddr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(sockets) > 1:
                    sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
                try:
                    sock.bind(sockaddr)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from exc
                port = sock.getsockname()[1] if port == 0 else port
                sock.listen(_BACKLOG)
                sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass
class _Worker:
    slot: int
    pid: int = 0
    started: float = 0.0
    ready: bool = False
    backoff: float = 1.0
    restart_at: float | None = None


@dataclass
class Supervisor:
    """The main process of a multi-process gate (module docstring)."""

    path: Path
    config: Config
    count: int
    # Runs one worker to its end with the config the main process holds; its exit status.
    run_worker: Callable[[WorkerLink, Config], int]
    sockets: list[socket.socket] = field(default_factory=list)
    embedded: EmbeddedRedis | None = None
    workers: dict[int, _Worker] = field(default_factory=dict)
    _reload_pending: set[int] = field(default_factory=set)
    _reload_deadline: float = 0.0
    _reloaded_at: float = -1.0
    _everyone_ready: bool = False

    def run(self) -> int:
        """Start everything, supervise until SIGTERM/SIGINT, stop; the exit status."""
        try:
            _preflight(self.config)
            self.sockets = open_listeners(self.config.server.listen)
            if self.config.store.url == "embedded":
                self.embedded = EmbeddedRedis(
                    self.config.server.state_dir, self.config.store.redis_server
                )
                self.embedded.start_sync()
        except (OSError, ssl.SSLError, StoreError) as exc:
            self._close_listeners()
            print(f"mailguard: cannot start: {exc}", file=sys.stderr)
            return 1
        report_r, self._report_w = os.pipe()
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(report_r, False)
        self._signals: list[int] = []
        old_wakeup = signal.set_wakeup_fd(wake_w)
        handlers = {sig: signal.signal(sig, self._on_signal) for sig in _FORWARDED}
        self._fds = (report_r, self._report_w, wake_r, wake_w)
        status = 0
        try:
            names = ", ".join(_name(s) for s in self.sockets)
            log.info("listening on %s with %d worker processes", names, self.count)
            for slot in range(self.count):
                self.workers[slot] = _Worker(slot)
                self._spawn(self.workers[slot])
            status = self._loop(report_r, wake_r)
        finally:
            self._stop_all()
            for sig, old in handlers.items():
                signal.signal(sig, old)
            signal.set_wakeup_fd(old_wakeup)
            for fd in self._fds:
                os.close(fd)
            if self.embedded is not None:
                self.embedded.stop_sync()
        log.info("stopped")
        return status

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._signals.append(signum)

    # -- the loop ------------------------------------------------------------------------------

    def _loop(self, report_r: int, wake_r: int) -> int:
        pending = b""
        while True:
            for signum in self._take_signals():
                if signum == signal.SIGHUP:
                    self._reload()
                else:
                    return 0
            status = self._reap()
            if status is not None:
                return status
            self._restart_due()
            self._watch_store()
            if self._reload_pending and time.monotonic() > self._reload_deadline:
                log.warning("reload: no report from workers %s", sorted(self._reload_pending))
                self._reload_pending.clear()
                notify("READY=1")
            with contextlib.suppress(InterruptedError):
                readable, _, _ = select.select([report_r, wake_r], [], [], 0.5)
                if wake_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                if report_r in readable:
                    with contextlib.suppress(BlockingIOError):
                        pending += os.read(report_r, 4096)
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self._on_report(line.decode("ascii", "replace"))

    def _take_signals(self) -> list[int]:
        taken = []
        while self._signals:  # one at a time: a handler may append meanwhile
            taken.append(self._signals.pop(0))
        return taken

    def _on_report(self, line: str) -> None:
        slot_text, _, event = line.partition(" ")
        worker = self.workers.get(int(slot_text)) if slot_text.isdigit() else None
        if worker is None:
            return
        if event == "ready":
            worker.ready = True
            if worker.started < self._reloaded_at and worker.pid:
                # Forked before a reload it could not take yet (SIGHUP was ignored until its
                # handler was in place): the file may have changed since its config was read.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.pid, signal.SIGHUP)
            if not self._everyone_ready and all(w.ready for w in self.workers.values()):
                self._everyone_ready = True
                log.info("%d workers ready", self.count)
                notify("READY=1")
        elif event == "reloaded":
            self._reload_reported(worker.slot)

    def _reload_reported(self, slot: int) -> None:
        """Worker ``slot`` has reloaded, or will not report (it died): READY=1 after the last."""
        if slot in self._reload_pending:
            self._reload_pending.discard(slot)
            if not self._reload_pending:
                notify("READY=1")

    def _reap(self) -> int | None:
        """Notice workers that exited; the main process's exit status if it must give up."""
        for worker in self.workers.values():
            if not worker.pid:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            worker.pid = 0
            code = os.waitstatus_to_exitcode(status)
            if not self._everyone_ready:
                log.error("worker %d exited with status %d while starting", worker.slot, code)
                return 1
            uptime = time.monotonic() - worker.started
            if uptime > _STABLE:
                worker.backoff = 1.0
            worker.restart_at = time.monotonic() + worker.backoff
            worker.backoff = min(worker.backoff * 2, _MAX_BACKOFF)  # if it dies again soon
            self._reload_reported(worker.slot)
            log.error(
                "worker %d (pid %d) exited with status %d; restarting it in %.0fs",
                worker.slot,
                pid,
                code,
                worker.restart_at - time.monotonic(),
            )
        return None

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in self.workers.values():
            if worker.restart_at is not None and now >= worker.restart_at:
                worker.restart_at = None
                self._spawn(worker)

    def _watch_store(self) -> None:
        """Start the embedded redis-server again if it died."""
        if self.embedded is None:
            return
        try:
            self.embedded.restart_if_dead_sync()
        except Exception:  # the store's trouble must not stop the gate
            log.exception("embedded redis-server watch")

    def _reload(self) -> None:
        config = reload_config(self.path, log)
        if config is None:
            return  # each worker would refuse it the same way: keep them as they are
        # For workers started from now on; the listeners, the store and the state directory
        # stay those of the start, as in every running worker (changes need a restart).
        self.config = dataclasses.replace(
            config,
            store=self.config.store,
            server=dataclasses.replace(
                config.server,
                listen=self.config.server.listen,
                state_dir=self.config.server.state_dir,
                workers=self.config.server.workers,
            ),
        )
        self._reloaded_at = time.monotonic()
        notify("RELOADING=1")
        ready = [w for w in self.workers.values() if w.pid and w.ready]
        self._reload_pending = {w.slot for w in ready}
        self._reload_deadline = time.monotonic() + _RELOAD_WAIT
        if not self._reload_pending:
            notify("READY=1")
        for worker in ready:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGHUP)

    # -- workers -------------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        store_url = self.embedded.url if self.embedded is not None else None
        link = WorkerLink(worker.slot, tuple(self.sockets), store_url, self._report_w)
        worker.ready, worker.started = False, time.monotonic()
        # Signals stay blocked across the fork until the new worker has its own handling, so
        # none reaches the main process's handler in the worker's copy (and is lost there).
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        pid = os.fork()
        if pid == 0:  # the worker
            status = 70
            try:
                self._become_worker()
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                status = self.run_worker(link, self.config)
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("worker %d failed", worker.slot)
            finally:
                with contextlib.suppress(Exception):
                    logging.shutdown()
                os._exit(status)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        worker.pid = pid

    def _become_worker(self) -> None:
        """In a new worker: default signal handling (SIGHUP ignored until ``serve`` handles it:
        a reload it misses is sent again when it reports ready), nothing of the main process."""
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        report_r, _report_w, wake_r, wake_w = self._fds
        for fd in (report_r, wake_r, wake_w):
            os.close(fd)
        os.environ.pop("NOTIFY_SOCKET", None)  # only the main process talks to systemd
        if self.embedded is not None:  # the main process's child, which it restarts if needed
            self.embedded.detach()

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait for them to drain (SIGKILL after the grace), reap them."""
        notify("STOPPING=1")
        self._close_listeners()
        alive = {w.pid for w in self.workers.values() if w.pid}
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        drain = self.config.server.drain_timeout
        if alive:
            log.info("draining %d workers (up to %ss)", len(alive), drain)
        deadline = time.monotonic() + drain + _KILL_GRACE
        while alive and time.monotonic() < deadline:
            alive = {pid for pid in alive if not _reaped(pid)}
            if alive:
                self._watch_store()  # transactions still draining need it
                time.sleep(0.05)
        for pid in alive:
            log.error("worker pid %d did not stop: killing it", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for worker in self.workers.values():
            worker.pid = 0

    def _close_listeners(self) -> None:
        for sock in self.sockets:
            sock.close()


def _preflight(config: Config) -> None:
    """Fail once, in the main process, on what would stop every worker from starting: an
    unreadable TLS certificate or key (OSError / ssl.SSLError), a decision log that cannot be
    opened (OSError)."""
    tls_context_of(config)
    DecisionLog(config.log.decision_log).close()


def _reaped(pid: int) -> bool:
    try:
        done, _status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done != 0


def _name(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
