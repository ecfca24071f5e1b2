"""The systemd units: `systemd-analyze verify` accepts them and the hardening is in place."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNITS = sorted((ROOT / "systemd").glob("*.service"))

REQUIRED = [
    "NoNewPrivileges=yes",
    "ProtectSystem=strict",
    "ProtectHome=yes",
    "PrivateTmp=yes",
    "CapabilityBoundingSet=",
    "StateDirectory=mailguard",
]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_hardening(unit: Path) -> None:
    lines = {line.strip() for line in unit.read_text().splitlines()}
    required = list(REQUIRED)
    required += ["Type=notify", "NotifyAccess=main"]  # both signal readiness
    if unit.name == "mailguard.service":  # the gate reloads on SIGHUP
        required += ["ExecReload=/bin/kill -HUP $MAINPID"]
    else:  # libmilter stops on SIGHUP: the milter reloads on SIGUSR1
        required += ["ExecReload=/bin/kill -USR1 $MAINPID"]
    missing = [want for want in required if want not in lines]
    assert not missing, missing
    assert any(line.startswith("User=") for line in lines)


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    program = Path(sys.executable).with_name("mailguard")
    assert program.exists(), program
    copy = tmp_path / unit.name
    copy.write_text(unit.read_text().replace("/usr/local/bin/mailguard", str(program)))
    res = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True)
    problems = [line for line in (res.stdout + res.stderr).splitlines() if unit.name in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr
