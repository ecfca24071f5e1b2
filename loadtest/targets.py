"""The servers under test, run as subprocesses so their CPU and memory can be measured.

Responsible for: free loopback ports, the gate's TOML configuration, starting a target and
waiting for its ``220`` banner, stopping it (and only what it started), and reading
``/proc/PID/stat`` and ``/proc/PID/status`` for CPU time and peak RSS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# name -> (kind, mode)
TARGETS: dict[str, tuple[str, str]] = {
    "passthrough": ("passthrough", "reuse"),
    "passthrough-connect": ("passthrough", "connect"),
    "gate-off": ("gate", "off"),
    "gate-enforce": ("gate", "enforce"),
    "gate-monitor": ("gate", "monitor"),
    # loadtest.milter_target: a private Postfix relaying to the sink, alone, asking
    # ``mailguard milter``, or behind ``mailguard serve`` (policy on, or off for gate-off-postfix)
    "postfix": ("postfix", "plain"),
    "postfix-milter": ("postfix", "milter"),
    "postfix-milter-unix": ("postfix", "milter-unix"),
    "gate-postfix": ("postfix", "gate"),
    "gate-off-postfix": ("postfix", "gate-off"),
}
ALIASES = {"gate-on": "gate-enforce", "baseline": "passthrough"}
DEFAULT_TARGETS = ("passthrough", "gate-off", "gate-enforce")


class TargetStartError(Exception):
    """The target did not come up; the message carries its stderr tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- /proc


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of ``pid`` in clock ticks, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (via /proc/PID/task/*/children, else a /proc scan)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        kids = _direct_children(parent)
        found.extend(kids)
        todo.extend(kids)
    return found


def _direct_children(pid: int) -> list[int]:
    kids: list[int] = []
    tasks = Path(f"/proc/{pid}/task")
    try:
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):
                kids.extend(int(k) for k in (task / "children").read_text().split())
        return kids
    except OSError:
        pass
    for entry in Path("/proc").iterdir():  # fallback: kernels without .../children
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2 :].split()[1]) == pid:
            kids.append(int(entry.name))
    return kids


def vm_hwm_kb(pid: int) -> int | None:
    """Peak resident set size (VmHWM) in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def host_cpu() -> tuple[float, float]:
    """Machine-wide (busy, steal) CPU seconds since boot, all CPUs, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0.0, 0.0
    v = [int(x) for x in first[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


@dataclass(slots=True)
class CpuSnapshot:
    ticks: int | None
    children: dict[int, tuple[str, int]] = field(default_factory=dict)  # pid -> (comm, ticks)
    name: str = ""  # the process's comm


def cpu_snapshot(pid: int | None) -> CpuSnapshot:
    if pid is None:
        return CpuSnapshot(None)
    snap = CpuSnapshot(cpu_ticks(pid), name=comm(pid))
    for kid in children(pid):
        ticks = cpu_ticks(kid)
        if ticks is not None:
            snap.children[kid] = (comm(kid), ticks)
    return snap


def cpu_delta_ms(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float | None, dict[str, float]]:
    """The process's own CPU ms between two snapshots, and its children's, summed by name.

    Children with the process's own name are its forked workers (``[server] workers``): their
    CPU is the process's own.
    """
    own = None
    if before.ticks is not None and after.ticks is not None:
        own = (after.ticks - before.ticks) * 1000.0 / CLK_TCK
    kids: dict[str, float] = {}
    for pid, (name, ticks) in after.children.items():
        start = before.children.get(pid, (name, 0))[1]
        spent = (ticks - start) * 1000.0 / CLK_TCK
        if name == after.name and own is not None:
            own += spent
        else:
            kids[name] = kids.get(name, 0.0) + spent
    return own, kids


# --------------------------------------------------------------------------- targets


def gate_config(
    *,
    port: int,
    upstream: tuple[str, int],
    mode: str,
    workdir: Path,
    server_extra: dict[str, str] | None = None,
    store_url: str = "embedded",
    policy: dict[str, str] | None = None,
) -> str:
    """The gate's TOML configuration for one run (one customer ``load``, 127.0.0.0/8).

    ``store_url``: ``[store] url`` (a shared redis-server for several gates); ``policy``: the
    ``[policy]`` lines after ``mode`` (TOML values; default: thresholds raised so that the load,
    one campaign to a few recipients, is never refused while every rule runs).
    """
    q = json.dumps  # a JSON string is a valid TOML basic string for these values
    if policy is None:
        policy = {"bulk_recipients": "1000000", "mailbomb_messages": "1000000"}
    lines = [
        "[server]",
        f"listen = [{q(f'127.0.0.1:{port}')}]",
        f"hostname = {q('gate.loadtest.invalid')}",
        f"max_message_size = {q('60MB')}",
        f"state_dir = {q(str(workdir / 'state'))}",
    ]
    lines += [f"{key} = {value}" for key, value in (server_extra or {}).items()]
    lines += [
        "",
        "[upstream]",
        f"host = {q(upstream[0])}",
        f"port = {upstream[1]}",
        "",
        "[store]",
        f"url = {q(store_url)}",
        "",
        "[policy]",
        f"mode = {q(mode)}",
        *(f"{key} = {value}" for key, value in policy.items()),
        "",
        "[log]",
        f"decision_log = {q(str(workdir / 'decisions.log'))}",
        "",
        "[[customer]]",
        f"id = {q('load')}",
        f"networks = [{q('127.0.0.0/8')}]",
        f"domains = [{q('load.example')}]",
        "",
    ]
    return "\n".join(lines)


@dataclass
class TargetProcess:
    """One started target; ``start()`` returns once it sends a 220 banner."""

    name: str
    argv: list[str]
    host: str
    port: int
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    cpus: set[int] | None = None  # CPU affinity for it and its children

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def stderr_path(self) -> Path:
        return self.workdir / f"{self.name}.stderr"

    @property
    def stdout_path(self) -> Path:
        return self.workdir / f"{self.name}.stdout"

    def spawn(self) -> None:
        """Start the process (in its own process group, with ``cpus`` affinity if set)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO,
                env={**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,  # its own process group: we can clean up after it
            )
        if self.cpus:
            # Popen returns once exec succeeded: the interpreter has just started, one thread.
            # Threads and children it creates later inherit the affinity.
            os.sched_setaffinity(self.proc.pid, self.cpus)

    async def start(self, timeout: float) -> None:
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last = "no connection yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetStartError(
                    f"{self.name} exited with status {self.proc.returncode} before it was "
                    f"ready\n{self.stderr_tail()}"
                )
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(self.host, self.port), 2.0
                )
                try:
                    banner = await asyncio.wait_for(reader.readline(), 5.0)
                    if banner.startswith(b"220"):
                        writer.write(b"QUIT\r\n")
                        with contextlib.suppress(OSError, TimeoutError):
                            await asyncio.wait_for(reader.readline(), 2.0)
                        return
                    last = f"banner {banner[:80]!r}"
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
            except (OSError, TimeoutError) as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        await self.stop()
        raise TargetStartError(
            f"{self.name} not ready on {self.host}:{self.port} within {timeout:g}s "
            f"({last})\n{self.stderr_tail()}"
        )

    async def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, wait, then SIGKILL its process group (the one it was started in)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # Anything left in its group (an orphaned child): TERM, then KILL.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.5)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace")
        except OSError:
            return "(no stderr)"
        tail = text.splitlines()[-lines:]
        return "\n".join(f"    | {line}" for line in tail) if tail else "    | (stderr empty)"


def make_target(
    name: str,
    *,
    upstream: tuple[str, int],
    python: str,
    workdir: Path,
    gate_server_extra: dict[str, str] | None = None,
    gate_store_url: str = "embedded",
) -> TargetProcess:
    """A fresh (not yet started) target listening on a free loopback port (a gate's store:
    ``gate_store_url``)."""
    kind, mode = TARGETS[name]
    if kind == "postfix":
        from loadtest.milter_target import PostfixTarget  # it imports this module

        return PostfixTarget(name, mode=mode, upstream=upstream, python=python, workdir=workdir)
    port = free_port()
    listen = f"127.0.0.1:{port}"
    up = f"{upstream[0]}:{upstream[1]}"
    workdir.mkdir(parents=True, exist_ok=True)
    if kind == "passthrough":
        argv = [
            python,
            "-m",
            "loadtest.passthrough",
            "--listen",
            listen,
            "--upstream",
            up,
            "--upstream-mode",
            mode,
        ]
        return TargetProcess(name, argv, "127.0.0.1", port, workdir)
    config = workdir / "mailguard.toml"
    config.write_text(
        gate_config(
            port=port,
            upstream=upstream,
            mode=mode,
            workdir=workdir,
            server_extra=gate_server_extra,
            store_url=gate_store_url,
        )
    )
    (workdir / "state").mkdir(exist_ok=True)
    argv = [python, "-m", "mailguard", "serve", "--config", str(config)]
    env = {"MAILGUARD_STATE_DIR": str(workdir / "state")}
    return TargetProcess(name, argv, "127.0.0.1", port, workdir, env)


def resolve_targets(spec: str) -> list[str]:
    names = []
    for raw in spec.split(","):
        name = ALIASES.get(raw.strip(), raw.strip())
        if not name:
            continue
        if name not in TARGETS:
            known = ", ".join([*TARGETS, *ALIASES])
            raise ValueError(f"unknown target {raw!r} (known: {known})")
        names.append(name)
    return names
