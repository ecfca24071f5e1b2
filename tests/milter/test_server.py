"""``mailguard milter`` as a systemd ``Type=notify`` service: it signals READY=1 only once its
socket accepts connections, STOPPING=1 on SIGTERM, reloads its config on SIGUSR1 (keeping the
running one when the file is broken), and a socket it cannot open is a clear error (exit 1)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

from tests.conftest import RedisServer
from tests.milter.conftest import RunLua, free_port, milter_config
from tests.milter.test_miltertest import Tx, session


def start(config: Path, spec: str, notify: Path | None) -> subprocess.Popen[bytes]:
    env = {"PATH": "/usr/bin:/bin", **({"NOTIFY_SOCKET": str(notify)} if notify else {})}
    return subprocess.Popen(
        [sys.executable, "-m", "mailguard.milter", "--config", str(config), "--socket", spec],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )


def test_ready_once_listening_and_stopping_on_sigterm(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config, _ = milter_config(tmp_path, redis_server.url)
    notify_path = tmp_path / "notify.sock"
    port = free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        proc = start(config, f"inet:{port}@127.0.0.1", notify_path)
        try:
            assert notify.recv(100) == b"READY=1"
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                pass  # listening at the moment it said so
            proc.send_signal(signal.SIGTERM)
            try:
                assert notify.recv(100) == b"STOPPING=1"
            except TimeoutError:
                raise AssertionError(f"no STOPPING=1; exit status {proc.poll()}") from None
            out, _ = proc.communicate(timeout=20)
            assert proc.returncode == 0, out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert b"Traceback" not in out, out


def test_socket_in_use_is_a_clear_error(tmp_path: Path, redis_server: RedisServer) -> None:
    config, _ = milter_config(tmp_path, redis_server.url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start(config, f"inet:{port}@127.0.0.1", None)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out
    assert f"mailguard milter: cannot listen on inet:{port}@127.0.0.1" in out.decode(), out
    assert b"Traceback" not in out


def test_sigusr1_reloads_the_config_and_a_broken_file_keeps_the_running_one(
    tmp_path: Path, redis_server: RedisServer, miltertest: RunLua
) -> None:
    config, log_path = milter_config(tmp_path, redis_server.url)
    notify_path = tmp_path / "notify.sock"
    port = free_port()
    spec = f"inet:{port}@127.0.0.1"
    message = b"Subject: hi\r\n\r\nhello\r\n"

    def rcpt_reply() -> str:
        tx = Tx("ann@acme.example", ["bob@example.org"], message)
        lines = miltertest(session(spec, "127.0.0.1", [tx]))
        return next(x.split(" ", 2)[2] for x in lines if x.startswith("R rcpt0 "))

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(20)
        proc = start(config, spec, notify_path)
        try:
            assert notify.recv(100) == b"READY=1"
            assert rcpt_reply() == "continue"  # 127.0.0.1 is customer acme
            good = config.read_text()
            config.write_text(good.replace('"127.0.0.0/8"', '"203.0.113.0/24"'))
            proc.send_signal(signal.SIGUSR1)
            assert (notify.recv(100), notify.recv(100)) == (b"RELOADING=1", b"READY=1")
            assert rcpt_reply() == "replycode"  # no longer a customer: 554 5.7.1
            config.write_text(good + "\n[policy]\nbulk_recipients = -1\n")
            proc.send_signal(signal.SIGUSR1)
            assert (notify.recv(100), notify.recv(100)) == (b"RELOADING=1", b"READY=1")
            assert rcpt_reply() == "replycode"  # still the last good config
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    text = out.decode()
    assert "reload refused, keeping the running config" in text and "bulk_recipients" in text
    assert text.count("configuration reloaded from") == 1, text
    assert "Traceback" not in text, text
    relayed = [json.loads(x) for x in log_path.read_text().splitlines()]
    assert [d["customer"] for d in relayed] == ["acme", None, None]
