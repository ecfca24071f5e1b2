"""``mailguard cluster``: files, a directory and an mbox, clustered as the gate does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.campaigns import ARTICLES, ISSUE, campaign_copy

ROOT = Path(__file__).resolve().parents[2]


def cluster(*args: str) -> list[tuple[str, str]]:
    res = subprocess.run(
        [sys.executable, "-m", "mailguard", "cluster", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return [tuple(line.split("\t")) for line in res.stdout.splitlines()]  # type: ignore[misc]


def test_files_directory_and_mbox(tmp_path: Path) -> None:
    d = tmp_path / "msgs"
    d.mkdir()
    (d / "b.eml").write_bytes(campaign_copy("x@example.org", 2))
    (d / "a.eml").write_bytes(campaign_copy("y@example.org", 1))
    (d / "c.eml").write_bytes(ISSUE.format(n=1, article=ARTICLES[0]).encode())
    other = tmp_path / "other.eml"
    other.write_bytes(ISSUE.format(n=2, article=ARTICLES[1]).encode())
    mbox = tmp_path / "box.mbox"
    mbox.write_bytes(
        b"From a@b Mon Jan  1 00:00:00 2026\n"
        + campaign_copy("z@example.org", 3).replace(b"\r\n", b"\n")
        + b"\nFrom a@b Mon Jan  1 00:00:01 2026\n"
        + ISSUE.format(n=2, article=ARTICLES[1]).encode().replace(b"\r\n", b"\n")
        + b"\n"
    )
    rows = cluster(str(d), str(other), str(mbox))
    names = [name for name, _ in rows]
    assert names == [
        str(d / "a.eml"),
        str(d / "b.eml"),
        str(d / "c.eml"),
        str(other),
        f"{mbox}:1",
        f"{mbox}:2",
    ]
    ids = [cid for _, cid in rows]
    assert ids[0] == ids[1] == ids[4]  # personalised copies, in any MIME shape or file
    assert ids[3] == ids[5]  # the same newsletter issue
    assert len({ids[0], ids[2], ids[3]}) == 3  # two issues of a newsletter are two campaigns


def test_missing_file(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "mailguard", "cluster", str(tmp_path / "nope.eml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert res.returncode == 2
    assert "no such file" in res.stderr and "Traceback" not in res.stderr
