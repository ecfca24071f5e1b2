"""Instructions per message of each target: the steady figure on a machine whose speed drifts.

``python -m loadtest.instructions`` runs ``loadtest.run`` twice per scenario and target, with a
short and a long run (200 and 1,200 measured messages by default), and the target's Python under
``valgrind --tool=callgrind`` (``loadtest.run --python WRAPPER``).  The difference of the two
runs' instruction counts divided by the difference of their message counts is what one more
message costs the target process: start-up, imports and warm-up cancel out, and unlike wall
clock or CPU time it does not move with the hypervisor.  Only the target's own process is
counted (not the embedded redis-server, not the kernel).  Prints a Markdown table with each
target's ratio to ``gate-off``; exits 2 if valgrind is missing or a run fails.

Needs valgrind (``apt-get install valgrind``); a run under callgrind is ~50x slower, so a
scenario's two runs take about a minute.  Scenarios run ``--jobs`` at a time (the counts do not
depend on the machine's load).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from loadtest.targets import REPO

_COLLECTED = re.compile(rb"Collected : (\d+)")


@dataclass(frozen=True)
class Job:
    target: str
    size: str
    rcpts: int


def wrapper(directory: Path, valgrind: str, python: str) -> Path:
    """A script that runs ``python`` under callgrind, its report appended to ``vg.log``."""
    script = directory / "python-under-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f'exec "{valgrind}" --tool=callgrind --callgrind-out-file="{directory}/out.%p" '
        f'--dump-instr=no "{python}" "$@" 2>>"{directory}/vg.log"\n'
    )
    script.chmod(0o755)
    return script


async def count(job: Job, messages: int, args: argparse.Namespace, valgrind: str) -> int:
    """The instructions of the target process over a run of ``messages`` (the largest count in
    the valgrind log: with several Python processes, the target's own is the busiest)."""
    with tempfile.TemporaryDirectory(prefix="mailguard-instr-") as name:
        directory = Path(name)
        script = wrapper(directory, valgrind, args.python)
        argv = [
            args.python, "-m", "loadtest.run", "--repeat", "1", "--messages", str(messages),
            "--warmup", str(args.warmup), "--targets", job.target, "--sizes", job.size,
            "--rcpts", str(job.rcpts), "--python", str(script), "--start-timeout", "120",
            "--io-timeout", "120", "--scenario-timeout", "1800",
            "--json", str(directory / "run.json"),
        ]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await proc.communicate()
        log = directory / "vg.log"
        counts = [int(m) for m in _COLLECTED.findall(log.read_bytes())] if log.exists() else []
        if proc.returncode != 0 or not counts:
            tail = output.decode(errors="replace").strip().splitlines()[-5:]
            raise RuntimeError(
                f"{job.target} {job.size} x {job.rcpts}, {messages} messages: loadtest.run "
                f"exited {proc.returncode}" + "".join(f"\n  {line}" for line in tail)
            )
        return max(counts)


async def per_message(job: Job, args: argparse.Namespace, valgrind: str) -> float:
    short = await count(job, args.short, args, valgrind)
    long = await count(job, args.long, args, valgrind)
    return (long - short) / (args.long - args.short)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.instructions", description=__doc__)
    p.add_argument("--targets", default="gate-off,gate-enforce")
    p.add_argument("--sizes", default="2k,50k")
    p.add_argument("--rcpts", default="1,10")
    p.add_argument("--short", type=int, default=200, help="messages of the short run")
    p.add_argument("--long", type=int, default=1200, help="messages of the long run")
    p.add_argument("--warmup", type=int, default=50, help="unmeasured messages of each run")
    p.add_argument("--jobs", type=int, default=2, help="scenarios measured at a time")
    p.add_argument("--python", default=sys.executable, help="the targets' interpreter")
    args = p.parse_args(argv)
    if not 0 < args.short < args.long:
        p.error("need 0 < --short < --long")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


async def amain(args: argparse.Namespace, valgrind: str) -> int:
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    jobs = [
        Job(target, size.strip(), int(rcpts))
        for size in args.sizes.split(",")
        for rcpts in args.rcpts.split(",")
        for target in targets
    ]
    limit = asyncio.Semaphore(args.jobs)

    async def measured(job: Job) -> float:
        async with limit:
            return await per_message(job, args, valgrind)

    try:
        figures = dict(zip(jobs, await asyncio.gather(*map(measured, jobs)), strict=True))
    except RuntimeError as exc:
        print(f"loadtest.instructions: {exc}", file=sys.stderr)
        return 2
    print("| message | target | instructions / message | / gate-off |")
    print("|---|---|---:|---:|")
    for job, value in figures.items():
        base = figures.get(Job("gate-off", job.size, job.rcpts))
        ratio = f"{value / base:.2f}x" if base else ""
        print(f"| {job.size} x {job.rcpts} | {job.target} | {value / 1e6:.3f} M | {ratio} |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print(
            "loadtest.instructions: valgrind not found (apt-get install valgrind)",
            file=sys.stderr,
        )
        return 2
    if not os.access(args.python, os.X_OK):
        print(f"loadtest.instructions: {args.python} is not executable", file=sys.stderr)
        return 2
    return asyncio.run(amain(args, valgrind))


if __name__ == "__main__":
    sys.exit(main())
