"""A private redis-server child for ``[store] url = "embedded"``.

Responsible for: running one redis-server per state directory, reachable only through a unix
socket inside it (``{state_dir}/redis/redis.sock``, mode 0700, no TCP port), persisting with an
append-only file in that directory, waiting until it answers, and stopping it.
Must never: share a state directory between two mailguard processes, leave the child running when
mailguard dies, or let two redis-servers write the same append-only file.

Exclusivity: ``start`` takes an ``flock`` on ``{state_dir}/redis/lock`` (recording mailguard's
pid) and hands the locked descriptor to the child too, so the lock is held for as long as either
mailguard or its redis-server lives; a second mailguard on the same state directory fails with
"state directory ... is in use by pid N".  Different state directories never share anything.

Lifetime: on Linux the child gets ``PR_SET_PDEATHSIG`` (SIGTERM), so it dies with the thread that
started it: call ``start``/``start_sync`` from a thread that lives as long as the process (the
main thread, or the event loop's thread).  The child runs in its own session, so a terminal's
Ctrl-C reaches mailguard (which drains, then stops the child) and not the child directly.

A child that dies (killed, out of memory) is started again by ``keep_running`` (a task of the
owning process's event loop) or ``restart_if_dead_sync`` (the multi-process gate's main
process), which log why and the log tail; meanwhile every store call fails (``4xx`` to
clients), and afterwards the append-only file gives back what was written up to about one
second before the crash (``appendfsync everysec``).  A process forked from the owner (a gate
worker) calls ``detach`` first: it must not keep the lock's descriptor, or the owner could
never take the lock again to restart the child.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from mailguard.store.base import StoreError

_PR_SET_PDEATHSIG = 1
_MAX_UNIX_SOCKET_PATH = 103  # sun_path is 108 bytes on Linux, 104 on the BSDs, NUL included
_POLL_INTERVAL = 0.01
_LOG_TAIL_LINES = 20


_RESTART_BACKOFF = (1.0, 30.0)  # first and longest wait between restarts of a dying child

log = logging.getLogger("mailguard.store")


class EmbeddedRedisError(StoreError):
    """The embedded redis-server could not be started (the text says why and what to do)."""


def _conf_quote(value: str) -> str:
    """Quote a value for redis.conf (double quotes, backslash escapes)."""
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child die with its parent (Linux), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sig = int(signal.SIGTERM)

    def setup() -> None:  # runs in the child between fork and exec
        # A blocked signal mask survives exec (the milter blocks SIGTERM for libmilter's sake).
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0 and os.getppid() != parent:
            os._exit(1)  # the parent died before the signal was armed

    return setup


def _ping_sync(path: str, timeout: float) -> bool:
    """True if a redis-server answers PING on the unix socket ``path``."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


async def _ping_async(path: str, timeout: float) -> bool:
    """``_ping_sync`` for the event loop."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(path)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                return (await reader.readline()).startswith(b"+PONG")
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError):
        return False


class EmbeddedRedis:
    """A redis-server child owning ``{state_dir}/redis``; see the module docstring."""

    def __init__(
        self,
        state_dir: Path,
        redis_server: str = "redis-server",
        *,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.redis_server = redis_server
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.dir = self.state_dir / "redis"
        self.socket_path = self.dir / "redis.sock"
        self.conf_path = self.dir / "redis.conf"
        self.pid_path = self.dir / "redis.pid"
        self.log_path = self.dir / "redis.log"
        self.lock_path = self.dir / "lock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        # Restarts of a child that died (keep_running, restart_if_dead_sync).
        self._start_failed = False
        self._retry_at = 0.0
        self._backoff = _RESTART_BACKOFF[0]

    def __repr__(self) -> str:
        return f"EmbeddedRedis({str(self.state_dir)!r}, pid={self.pid})"

    @property
    def url(self) -> str:
        """The redis-py URL of the unix socket."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The child's pid while it is running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- start ---------------------------------------------------------------------------------

    def start_sync(self) -> None:
        """Start the child and wait (blocking) until it answers PING."""
        if self.running:
            return
        self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while True:
            failure = self._check_started(deadline)
            if failure is None and _ping_sync(str(self.socket_path), 1.0):
                return
            if failure is not None:
                self._abort(failure)
            time.sleep(_POLL_INTERVAL)

    async def start(self) -> None:
        """Start the child and wait until it answers PING, without blocking the event loop."""
        if self.running:
            return
        self._spawn()
        deadline = time.monotonic() + self.start_timeout
        while True:
            failure = self._check_started(deadline)
            if failure is None and await _ping_async(str(self.socket_path), 1.0):
                return
            if failure is not None:
                self._abort(failure)
            await asyncio.sleep(_POLL_INTERVAL)

    def _check_started(self, deadline: float) -> str | None:
        assert self._proc is not None
        status = self._proc.poll()
        if status is not None:
            return f"exited with status {status} while starting"
        if time.monotonic() > deadline:
            return f"did not answer PING within {self.start_timeout:g}s"
        return None

    def _spawn(self) -> None:
        if self._proc is not None:  # a previous child died: reap it, keeping the lock (so no
            self._terminate_sync(grace=0.0, keep_lock=True)  # other process takes it meanwhile)
        binary = shutil.which(self.redis_server)
        if binary is None:
            raise EmbeddedRedisError(
                f"{self.redis_server} not found: install it (apt-get install redis-server)"
                " or set [store] redis_server"
            )
        try:
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot create {self.dir}: {exc.strerror}") from exc
        if len(os.fsencode(self.socket_path)) > _MAX_UNIX_SOCKET_PATH:
            raise EmbeddedRedisError(
                f"unix socket path {self.socket_path} is too long"
                f" (more than {_MAX_UNIX_SOCKET_PATH} bytes): use a shorter state directory"
            )
        if self._lock_fd is None:
            self._lock()
        try:
            self._clear_stale_files()
            self._write_conf()
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [binary, str(self.conf_path)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    cwd=self.dir,
                    pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
                    start_new_session=True,
                    preexec_fn=_pdeathsig_preexec(),
                )
        except EmbeddedRedisError:
            self._unlock()
            raise
        except OSError as exc:
            self._unlock()
            raise EmbeddedRedisError(f"cannot start {binary}: {exc}") from exc

    def _lock(self) -> None:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot open {self.lock_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_pid(self.lock_path)
            os.close(fd)
            if owner is None or not _pid_alive(owner):
                owner = _read_pid(self.pid_path)  # an orphaned redis-server still holds it
            raise EmbeddedRedisError(
                f"state directory {self.state_dir} is in use by pid {owner or 'unknown'}:"
                " another mailguard process (or its redis-server) is running with it"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise EmbeddedRedisError(f"cannot lock {self.lock_path}: {exc.strerror}") from exc
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # e.g. a full disk
            os.close(fd)
            raise EmbeddedRedisError(f"cannot write {self.lock_path}: {exc.strerror}") from exc
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the last descriptor releases the flock
            self._lock_fd = None

    def _clear_stale_files(self) -> None:
        """Under the lock: refuse a foreign live server on our socket, remove stale files."""
        if _ping_sync(str(self.socket_path), 1.0):
            raise EmbeddedRedisError(
                f"state directory {self.state_dir} is in use by pid"
                f" {_read_pid(self.pid_path) or 'unknown'}: a redis-server not started by"
                f" mailguard answers on {self.socket_path}; stop it first"
            )
        for stale in (self.socket_path, self.pid_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _write_conf(self) -> None:
        lines = [
            "# Generated by mailguard for its embedded store; rewritten on every start.",
            "port 0",
            f"unixsocket {_conf_quote(str(self.socket_path))}",
            "unixsocketperm 700",
            f"dir {_conf_quote(str(self.dir))}",
            "appendonly yes",
            "appendfsync everysec",
            'save ""',
            "daemonize no",
            f"pidfile {_conf_quote(str(self.pid_path))}",
            f"logfile {_conf_quote(str(self.log_path))}",
            "loglevel notice",
            "always-show-logo no",
        ]
        self.conf_path.write_text("\n".join(lines) + "\n")
        self.conf_path.chmod(0o600)

    def _abort(self, reason: str) -> None:
        """Kill a child that failed to start and raise with the tail of its log."""
        self._terminate_sync(grace=0.0)
        raise EmbeddedRedisError(
            f"embedded redis-server for {self.state_dir} {reason};"
            f" last lines of {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the redis log (or a note that there is none)."""
        try:
            text = self.log_path.read_bytes()[-16384:].decode("utf-8", "replace")
        except OSError as exc:
            return f"(no log: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"

    # -- keeping it running ----------------------------------------------------------------------

    def detach(self) -> None:
        """In a process forked from the owner: let go of the inherited lock descriptor and the
        child (this process never stops, restarts or waits for it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._proc = None

    def _restart_reason(self) -> str | None:
        """Why the child must be started again now (None: it runs, was never started, or the
        wait after a failed start is not over)."""
        if time.monotonic() < self._retry_at:
            return None
        if self._start_failed:
            return "did not start last time"
        if self._proc is None:
            return None
        status = self._proc.poll()
        if status is None:
            return None
        return f"exited with status {status}" if status >= 0 else f"killed by signal {-status}"

    def _restarting(self, reason: str) -> None:
        log.error(
            "embedded redis-server %s; starting it again. Last lines of %s:\n%s",
            reason,
            self.log_path,
            self.log_tail(),
        )

    def _restarted(self, failure: Exception | None) -> bool:
        """Note how a restart went (waiting 1 s, doubling to 30 s, between failed ones)."""
        if failure is None:
            log.info("embedded redis-server running again (pid %s)", self.pid)
            self._start_failed, self._backoff = False, _RESTART_BACKOFF[0]
            return True
        log.error(
            "embedded redis-server did not start (next try in %gs): %s", self._backoff, failure
        )
        self._start_failed = True
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _RESTART_BACKOFF[1])
        return False

    def restart_if_dead_sync(self) -> bool:
        """Start the child again if it died (or a restart failed and its wait is over); True
        if it is running again.  A failure is logged and tried again later."""
        reason = self._restart_reason()
        if reason is None:
            return False
        self._restarting(reason)
        try:
            self.start_sync()
        except (EmbeddedRedisError, OSError) as exc:
            return self._restarted(exc)
        return self._restarted(None)

    async def keep_running(self, interval: float = 1.0) -> None:
        """Until cancelled: every ``interval`` seconds, ``restart_if_dead_sync`` without
        blocking the event loop."""
        while True:
            await asyncio.sleep(interval)
            reason = self._restart_reason()
            if reason is None:
                continue
            self._restarting(reason)
            try:
                await self.start()
            except (EmbeddedRedisError, OSError) as exc:
                self._restarted(exc)
            else:
                self._restarted(None)

    # -- stop ----------------------------------------------------------------------------------

    def stop_sync(self) -> None:
        """SIGTERM the child (it flushes the append-only file), SIGKILL it after the deadline."""
        self._terminate_sync(grace=self.stop_timeout)

    async def stop(self) -> None:
        """``stop_sync`` without blocking the event loop."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                deadline = time.monotonic() + self.stop_timeout
                while proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(_POLL_INTERVAL)
                if proc.poll() is None:
                    proc.kill()
                    while proc.poll() is None:
                        await asyncio.sleep(_POLL_INTERVAL)
            self._proc = None
        self._unlock()

    def _terminate_sync(self, grace: float, *, keep_lock: bool = False) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                if grace > 0:
                    proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=grace)
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            self._proc = None
        if not keep_lock:
            self._unlock()

    # -- context managers ----------------------------------------------------------------------

    def __enter__(self) -> EmbeddedRedis:
        self.start_sync()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_sync()

    async def __aenter__(self) -> EmbeddedRedis:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
