"""Load targets with a private Postfix (``loadtest.postfix``) relaying to the sink.

- ``postfix``: Postfix alone, the ceiling of the MTA on this machine;
- ``postfix-milter``: Postfix's smtpd asking ``mailguard milter`` about every message;
- ``gate-postfix``: ``mailguard serve`` (policy on) in front of the same Postfix;
- ``gate-off-postfix``: the same with the policy off: with ``gate-postfix``, what the policy
  costs when the upstream is a real MTA that queues (issue 4's ratio, next to the one against
  the null sink).

``postfix-milter`` and ``gate-postfix`` are the two ways to deploy mailguard in front of one
MTA, so their throughputs compare like with like (issue 5: the milter should sustain at least
0.8x the gate).  All get the ``gate-enforce`` target's configuration (``gate-off-postfix``
with ``mode = "off"``): one customer for 127.0.0.0/8, thresholds raised so the one-campaign
load is never refused while every rule runs, the embedded Redis.

Postfix accepts into its queue and delivers to the sink afterwards (``queues``): the drivers
wait for the deliveries before they verify.  CPU figures: the milter's or the gate's process
(with its embedded redis-server as a child); for ``postfix``, the Postfix master's tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from pathlib import Path

from loadtest.postfix import PrivatePostfix
from loadtest.targets import TargetProcess, TargetStartError, free_port, gate_config

# Postfix as a relay for the load: delivers at once to the sink, as many in parallel as the
# load sends, tempfails when the milter does not answer, no limits for loopback clients.
LOAD_SETTINGS = {
    "myhostname": "postfix.loadtest.invalid",
    "defer_transports": "",
    "smtp_destination_concurrency_limit": "50",
    "default_process_limit": "200",
    "message_size_limit": "0",
    "milter_default_action": "tempfail",
    "smtpd_client_connection_count_limit": "0",
}
MODES = ("plain", "milter", "milter-unix", "gate", "gate-off")


class PostfixTarget(TargetProcess):
    """A private Postfix relaying to ``upstream``, alone, with the milter, or behind the gate."""

    queues = True  # accepted mail reaches the sink after Postfix delivers it

    def __init__(
        self,
        name: str,
        *,
        mode: str,
        upstream: tuple[str, int],
        python: str,
        workdir: Path,
        store_url: str = "embedded",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "state").mkdir(exist_ok=True)
        self.mode = mode
        settings = dict(LOAD_SETTINGS, relayhost=f"[{upstream[0]}]:{upstream[1]}")
        self.milter_port = free_port() if mode == "milter" else None
        self.postfix = PrivatePostfix(workdir / "postfix", free_port(), settings)
        self.milter_socket: Path | None = None
        milter_spec = ""
        if self.milter_port is not None:
            settings["smtpd_milters"] = f"inet:127.0.0.1:{self.milter_port}"
            milter_spec = f"inet:{self.milter_port}@127.0.0.1"
        elif mode == "milter-unix":
            # Postfix's daemons run in its queue directory: a relative path reaches the socket
            # where the private directories above it are closed to the postfix user.
            self.milter_socket = self.postfix.queue_dir / "mailguard-milter.sock"
            settings["smtpd_milters"] = "unix:mailguard-milter.sock"
            milter_spec = f"unix:{self.milter_socket}"
        config = workdir / "mailguard.toml"
        argv: list[str] = []
        port = self.postfix.port
        if mode in ("gate", "gate-off"):
            port = free_port()
            config.write_text(
                gate_config(
                    port=port,
                    upstream=("127.0.0.1", self.postfix.port),
                    mode="off" if mode == "gate-off" else "enforce",
                    workdir=workdir,
                    store_url=store_url,
                )
            )
            argv = [python, "-m", "mailguard", "serve", "--config", str(config)]
        elif milter_spec:
            milter = json.dumps(milter_spec)
            config.write_text(
                gate_config(
                    port=free_port(),  # unused: the milter speaks no SMTP
                    upstream=upstream,
                    mode="enforce",
                    workdir=workdir,
                    store_url=store_url,
                )
                + f"\n[milter]\nlisten = {milter}\n"
            )
            argv = [python, "-m", "mailguard", "milter", "--config", str(config)]
        env = {"MAILGUARD_STATE_DIR": str(workdir / "state")}
        super().__init__(name, argv, "127.0.0.1", port, workdir, env)

    @property
    def pid(self) -> int | None:
        if self.mode != "plain":
            return super().pid
        with contextlib.suppress(OSError, ValueError):
            master = self.postfix.queue_dir / "pid" / "master.pid"
            return int(master.read_text().strip())
        return None

    async def start(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            await asyncio.to_thread(self.postfix.create)
        except Exception as exc:
            raise TargetStartError(f"{self.name}: Postfix not created: {exc}") from exc
        if self.mode.startswith("milter"):
            await self._start_milter(deadline)  # before Postfix takes mail for it
        try:
            await asyncio.to_thread(self.postfix.start, max(deadline - time.monotonic(), 1.0))
        except Exception as exc:
            await self.stop()
            raise TargetStartError(f"{self.name}: Postfix did not start: {exc}") from exc
        if self.mode in ("gate", "gate-off"):
            await super().start(max(deadline - time.monotonic(), 1.0))  # waits for its 220

    async def _start_milter(self, deadline: float) -> None:
        """Start the milter and wait until its socket accepts connections (it has no banner)."""
        self.spawn()
        assert self.proc is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetStartError(
                    f"{self.name}: the milter exited with status {self.proc.returncode}\n"
                    f"{self.stderr_tail()}"
                )
            if self._milter_listens():
                if self.milter_socket is not None:
                    self.milter_socket.chmod(0o666)  # Postfix's smtpd runs as postfix
                return
            await asyncio.sleep(0.1)
        await self.stop()
        raise TargetStartError(f"{self.name}: the milter did not listen\n{self.stderr_tail()}")

    def _milter_listens(self) -> bool:
        if self.milter_socket is not None:
            family, address = socket.AF_UNIX, str(self.milter_socket)
            if not self.milter_socket.exists():
                return False
        else:
            family, address = socket.AF_INET, ("127.0.0.1", self.milter_port)  # type: ignore[assignment]
        with socket.socket(family) as sock:
            return sock.connect_ex(address) == 0

    async def stop(self, grace: float = 15.0) -> None:
        await super().stop(grace)
        await asyncio.to_thread(self.postfix.stop)

    def stderr_tail(self, lines: int = 30) -> str:
        log = self.postfix.maillog().splitlines()[-lines:]
        postfix = "\n".join(f"    | {line}" for line in log) or "    | (no mail log)"
        if self.mode == "plain":
            return postfix
        return super().stderr_tail(lines) + "\n    --- postfix ---\n" + postfix
