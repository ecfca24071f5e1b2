"""A private Postfix instance from Debian's package, for the real-MTA tests and load runs.

By default it is an upstream that is nobody's but its caller's: its configuration, queue and
log live under ``tmp_path``, its smtpd listens on one free port of 127.0.0.1 only, and it never
delivers anything: every destination is relayed to a ``relayhost`` that is not contacted because
``defer_transports = smtp``, so each accepted message stays in the queue, where ``queued()``
(``postqueue -j``) and ``postcat`` read it.  The system's own instance (/etc/postfix,
/var/spool/postfix) is neither read for settings nor written.

Starting a Postfix master needs root (it binds as root, then runs its daemons as ``postfix``).
``settings`` turn it into another role (a customer's MTA with a ``relayhost``, a Postfix with
``smtpd_milters``, one that delivers to a load-test sink).

Layout: ``conf/`` (main.cf, master.cf), ``queue/`` (queue_directory, root-owned like Postfix
wants it), ``queue/data`` (data_directory, given relative to the queue directory because the
daemons run as ``postfix`` and cannot cross 0700 temporary directories (pytest's) by absolute
path, while they do start from the queue directory), ``maillog`` (postlogd).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTQUEUE = "/usr/sbin/postqueue"
POSTCAT = "/usr/sbin/postcat"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = data
mail_owner = postfix
setgid_group = postdrop
myhostname = upstream.test
mydomain = upstream.test
myorigin = upstream.test
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:9
defer_transports = smtp
smtputf8_enable = yes
maillog_file = {maillog}
maillog_file_prefixes = {root}
"""

# Every service unchrooted: nothing to copy into the queue directory.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60    1 pickup
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
verify    unix  - - n -     1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -     - proxymap
smtp      unix  - - n -     - smtp
relay     unix  - - n -     - smtp
showq     unix  n - n -     - showq
error     unix  - - n -     - error
retry     unix  - - n -     - error
discard   unix  - - n -     - discard
anvil     unix  - - n -     1 anvil
scache    unix  - - n -     1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def banner(port: int) -> bytes:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
            return sock.recv(512)
    except OSError:
        return b""


class PostfixError(RuntimeError):
    """A Postfix command failed, or Postfix did not do what was awaited in time."""


@dataclass
class PrivatePostfix:
    """One private Postfix instance (see the module docstring); ``settings`` are main.cf
    parameters applied with ``postconf -e`` over the defaults above."""

    root: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def hostname(self) -> str:
        return self.settings.get("myhostname", "upstream.test")

    @property
    def config_dir(self) -> Path:
        return self.root / "conf"

    @property
    def queue_dir(self) -> Path:
        return self.root / "queue"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    def maillog(self) -> str:
        return self.maillog_path.read_text() if self.maillog_path.exists() else ""

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
        )
        if check and result.returncode != 0:
            raise PostfixError(
                f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}"
                f"\n--- maillog ---\n{self.maillog()}"
            )
        return result

    def postfix(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run(POSTFIX, "-c", str(self.config_dir), command, check=check)

    def create(self) -> None:
        self.config_dir.mkdir(parents=True)
        self.queue_dir.mkdir(mode=0o755)
        data = self.queue_dir / "data"
        data.mkdir(mode=0o700)
        shutil.chown(data, user="postfix")
        fmt = {"queue": self.queue_dir, "maillog": self.maillog_path, "root": self.root}
        (self.config_dir / "main.cf").write_text(MAIN_CF.format(**fmt))
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        if self.settings:
            pairs = [f"{key}={value}" for key, value in self.settings.items()]
            self._run(POSTCONF, "-c", str(self.config_dir), "-e", *pairs)
        self.postfix("check")  # also creates the queue's subdirectories with their owners

    def start(self, timeout: float = 10.0) -> None:
        self.postfix("start")
        deadline = time.monotonic() + timeout
        while not banner(self.port).startswith(f"220 {self.hostname}".encode()):
            if time.monotonic() > deadline:
                raise PostfixError(f"postfix smtpd did not answer:\n{self.maillog()}")
            time.sleep(0.02)

    def running(self) -> bool:
        return self.postfix("status", check=False).returncode == 0

    def stop(self, timeout: float = 10.0) -> None:
        """``postfix stop``; ``postfix abort`` if the master is still there after timeout."""
        if not self.running():
            return
        self.postfix("stop", check=False)
        deadline = time.monotonic() + timeout
        while self.running():
            if time.monotonic() > deadline:
                self.postfix("abort", check=False)
                break
            time.sleep(0.05)

    def queued(self) -> list[dict[str, object]]:
        """Every message in the queue (any of incoming, active, deferred, hold), as postqueue -j."""
        out = self._run(POSTQUEUE, "-c", str(self.config_dir), "-j").stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def recipients(self) -> list[str]:
        return sorted(
            str(r["address"])
            for message in self.queued()
            for r in message["recipients"]  # type: ignore[attr-defined]
        )

    def wait_for_recipients(self, count: int, timeout: float = 10.0) -> list[str]:
        """The queued recipients once there are ``count`` of them (or fail after timeout)."""
        deadline = time.monotonic() + timeout
        while len(rcpts := self.recipients()) < count:
            if time.monotonic() > deadline:
                raise PostfixError(f"{len(rcpts)} of {count} recipients queued:\n{self.maillog()}")
            time.sleep(0.05)
        return rcpts

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first match of ``pattern`` in the mail log, once Postfix has logged it."""
        deadline = time.monotonic() + timeout
        while (found := re.search(pattern, self.maillog())) is None:
            if time.monotonic() > deadline:
                raise PostfixError(f"no {pattern!r} in the mail log:\n{self.maillog()}")
            time.sleep(0.05)
        return found

    def message(self, queue_id: str) -> str:
        """Headers and body of one queued message (postcat)."""
        return self._run(POSTCAT, "-c", str(self.config_dir), "-bh", "-q", queue_id).stdout
