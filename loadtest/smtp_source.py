"""The second driver: Postfix's ``smtp-source`` against the same targets.

For each scenario (size x recipients) and target, a fresh target relays to the upstream (this
package's sink, or Postfix's ``smtp-sink`` with ``--upstream smtp-sink``) while
``smtp-source -s C -m N -l SIZE -r RCPTS -d`` sends; the wall time gives messages/s, /proc gives
the target's CPU and peak RSS.  ``smtp-source`` never pipelines and aborts on the first
unexpected reply, so its exit status tells whether every message was accepted; the upstream's
count must then equal N (and, with the Python sink, the recipient count N x RCPTS).

``smtp-source`` and ``smtp-sink`` come with Debian's ``postfix`` package; without them this
prints a SKIP line and exits 0.  See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.run import (
    RATIOS,
    RESULTS_DIR,
    fmt,
    int_list,
    parse_size,
    ratio,
    run_interruptibly,
    settle,
    size_label,
)
from loadtest.sink import Sink, install_uvloop, parse_hostport
from loadtest.targets import (
    DEFAULT_TARGETS,
    TargetProcess,
    TargetStartError,
    cpu_delta_ms,
    cpu_snapshot,
    free_port,
    make_target,
    resolve_targets,
    vm_hwm_kb,
)


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name) if p.exists()),
        None,
    )


@dataclass
class SourceResult:
    target: str
    size: int
    rcpts: int
    messages: int
    concurrency: int
    upstream: str
    wall: float = 0.0
    exit_status: int | None = None
    stderr_tail: str = ""
    received: int | None = None
    received_rcpts: int | None = None
    cpu_ms: float | None = None
    child_cpu_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_kb: int | None = None
    verdict: str = "n/a"
    problems: list[str] = field(default_factory=list)
    start_error: str | None = None

    @property
    def msgs_per_s(self) -> float | None:
        if self.exit_status != 0 or self.wall <= 0:
            return None
        return self.messages / self.wall

    @property
    def cpu_ms_per_msg(self) -> float | None:
        if self.cpu_ms is None or self.exit_status != 0:
            return None
        return self.cpu_ms / self.messages


class SmtpSinkProcess:
    """Postfix's smtp-sink as the upstream, counting messages (``-c``)."""

    def __init__(self, tool: str, workdir: Path) -> None:
        self.tool = tool
        self.port = free_port()
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.out = workdir / "smtp-sink.stdout"

    async def start(self) -> tuple[str, int]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        argv = [self.tool, "-c"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # smtp-sink refuses to run as root without it
        argv += [f"127.0.0.1:{self.port}", "1024"]
        with self.out.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return "127.0.0.1", self.port
            await asyncio.sleep(0.05)
        raise RuntimeError(f"smtp-sink did not listen: {self.out.read_text(errors='replace')}")

    async def stop(self) -> int | None:
        """Stop it; returns the message count from its last ``mesg=N`` counter."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 5)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        counts = re.findall(rb"mesg=(\d+)", self.out.read_bytes())
        return int(counts[-1]) if counts else 0


async def run_source(
    args: argparse.Namespace, host: str, port: int, size: int, rcpts: int
) -> tuple[int | None, float, str]:
    argv = [
        args.smtp_source,
        "-s",
        str(args.concurrency),
        "-m",
        str(args.messages),
        "-l",
        str(size),
        "-r",
        str(rcpts),
        "-f",
        "sender@load.example",
        "-t",
        "rcpt@dest.example",
        "-M",
        "client.load.example",
    ]
    if not args.reconnect:
        argv.append("-d")
    argv.append(f"{host}:{port}")
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), args.scenario_timeout)
    except TimeoutError:
        proc.kill()
        out, err = await proc.communicate()
        return None, time.perf_counter() - t0, "timed out\n" + err.decode(errors="replace")
    except BaseException:  # interrupted: do not leave it running
        if proc.returncode is None:
            proc.kill()
        raise
    wall = time.perf_counter() - t0
    text = (out + err).decode(errors="replace").strip().splitlines()
    return proc.returncode, wall, "\n".join(text[-5:])


async def one(
    args: argparse.Namespace,
    name: str,
    size: int,
    rcpts: int,
    workdir: Path,
    sink: Sink | None,
) -> SourceResult:
    result = SourceResult(name, size, rcpts, args.messages, args.concurrency, args.upstream)
    print(f"-- {name}: {size_label(size)} x {rcpts} rcpt ({args.upstream}) ...", flush=True)
    smtp_sink: SmtpSinkProcess | None = None
    target: TargetProcess | None = None
    queued = False
    try:
        if sink is not None:
            sink.reset()
            assert sink.server is not None
            up = sink.server.sockets[0].getsockname()[:2]
            upstream = (str(up[0]), int(up[1]))
        else:
            smtp_sink = SmtpSinkProcess(args.smtp_sink, workdir)
            upstream = await smtp_sink.start()
        if args.target is not None:
            host, port = args.target
            pid = args.target_pid
        else:
            target = make_target(
                name,
                upstream=upstream,
                python=args.python,
                workdir=workdir,
                gate_server_extra=args.gate_server_extra,
            )
            try:
                await target.start(args.start_timeout)
            except TargetStartError as exc:
                print(f"   {name} failed to start:\n{exc}", flush=True)
                result.start_error = str(exc)
                return result
            host, port, pid = target.host, target.port, target.pid
            queued = getattr(target, "queues", False)
        before = cpu_snapshot(pid)
        status, wall, tail = await run_source(args, host, port, size, rcpts)
        after = cpu_snapshot(pid)
        result.exit_status, result.wall, result.stderr_tail = status, wall, tail
        result.cpu_ms, result.child_cpu_ms = cpu_delta_ms(before, after)
        if pid is not None:
            result.peak_rss_kb = vm_hwm_kb(pid)
        if sink is not None and queued:  # Postfix delivers what it accepted after the run
            await settle(sink, limit=args.scenario_timeout, expected=args.messages)
    finally:
        if target is not None:
            await target.stop()
        if smtp_sink is not None:
            result.received = await smtp_sink.stop()
    if sink is not None:
        await asyncio.sleep(0.2)
        result.received = sink.stats.messages
        result.received_rcpts = sink.stats.recipients
    if args.verify:
        judge(result)
    return result


def judge(r: SourceResult) -> None:
    n = r.messages
    if r.received is not None and r.received > n:
        r.problems.append(f"upstream received {r.received} messages for {n} sent")
    if r.exit_status == 0:
        if r.received is not None and r.received != n:
            r.problems.append(f"smtp-source sent {n} messages, upstream received {r.received}")
        if r.received_rcpts is not None and r.received_rcpts != n * r.rcpts:
            r.problems.append(
                f"upstream received {r.received_rcpts} recipients, expected {n * r.rcpts}"
            )
    if r.problems:
        r.verdict = "**FAIL**"
    elif r.exit_status != 0:
        r.verdict = f"ERR (smtp-source exit {r.exit_status})"
    else:
        r.verdict = "OK"


def table(results: list[SourceResult]) -> str:
    head = [
        "target",
        "msg/s",
        "wall s",
        "CPU ms/msg",
        "child CPU ms/msg",
        "peak RSS MB",
        "received",
        "verify",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if r.start_error is not None:
            rows.append("| " + " | ".join([r.target, "not started"] + [""] * 6) + " |")
            continue
        kids = ", ".join(f"{k} {v / r.messages:.3f}" for k, v in r.child_cpu_ms.items())
        rss = r.peak_rss_kb / 1024 if r.peak_rss_kb is not None else None
        rows.append(
            "| "
            + " | ".join(
                [
                    r.target,
                    fmt(r.msgs_per_s, 0),
                    fmt(r.wall, 2),
                    fmt(r.cpu_ms_per_msg, 3),
                    kids or "n/a",
                    fmt(rss, 1),
                    "n/a" if r.received is None else str(r.received),
                    r.verdict,
                ]
            )
            + " |"
        )
    return "\n".join(rows)


def report(results: list[SourceResult], args: argparse.Namespace) -> str:
    out: list[str] = []
    groups: dict[tuple[int, int], list[SourceResult]] = {}
    for r in results:
        groups.setdefault((r.size, r.rcpts), []).append(r)
    for (size, rcpts), rows in groups.items():
        out.append(
            f"\n### smtp-source: {size_label(size)} payload, {rcpts} recipient"
            f"{'s' if rcpts > 1 else ''} — {args.messages} messages, {args.concurrency} "
            f"sessions, upstream {args.upstream}\n"
        )
        out.append(table(rows))
        by = {r.target: r for r in rows if r.start_error is None}
        notes: list[str] = []
        for num, den in RATIOS:
            if num in by and den in by:
                a, b = by[num], by[den]
                notes.append(
                    f"- {num} / {den}: msg/s {ratio(a.msgs_per_s, b.msgs_per_s)}, "
                    f"CPU ms/msg {ratio(a.cpu_ms_per_msg, b.cpu_ms_per_msg)}"
                )
        for r in rows:
            if r.start_error is not None:
                notes.append(f"- {r.target}: could not start:\n{r.start_error}")
                continue
            if r.exit_status != 0 and r.stderr_tail:
                tail = r.stderr_tail.replace("\n", " / ")
                notes.append(f"- {r.target}: smtp-source said: {tail}")
            notes.extend(f"- {r.target}: FAIL {p}" for p in r.problems)
        if notes:
            out.append("")
            out.extend(notes)
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.smtp_source", description=__doc__)
    p.add_argument("--messages", type=int, help="messages per scenario (default 2000)")
    p.add_argument("--concurrency", type=int, default=50, help="smtp-source sessions (-s)")
    p.add_argument("--sizes", default="2k,50k", help="payload sizes (-l), e.g. 2k,50k")
    p.add_argument("--rcpts", default="1,10", help="recipients per message (-r), e.g. 1,10")
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    p.add_argument("--target", type=parse_hostport, help="an already-running SMTP server")
    p.add_argument("--target-pid", type=int, help="PID of --target, for CPU/RSS figures")
    p.add_argument("--quick", action="store_true", help="300 messages per scenario")
    p.add_argument(
        "--upstream",
        choices=("python", "smtp-sink"),
        default="python",
        help="the targets' upstream: this package's sink, or Postfix's smtp-sink",
    )
    p.add_argument("--reconnect", action="store_true", help="one connection per message (no -d)")
    p.add_argument("--sink", type=parse_hostport, default=("127.0.0.1", 0), help="sink address")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--scenario-timeout", type=float, default=180.0)
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--python", default=sys.executable)
    p.add_argument("--gate-server-option", action="append", default=[], metavar="KEY=TOML")
    p.add_argument("--json", type=Path)
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 300 if args.quick else 2000
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.rcpt_list = int_list(args.rcpts)
    try:
        args.target_names = resolve_targets(args.targets)
    except ValueError as exc:
        p.error(str(exc))
    args.gate_server_extra = dict(
        (k.strip(), v.strip()) for k, _, v in (o.partition("=") for o in args.gate_server_option)
    )
    return args


async def amain(args: argparse.Namespace) -> int:
    sink: Sink | None = None
    if args.upstream == "python":
        sink = Sink()
        sink_addr = await sink.start(*args.sink)
        print(f"sink on {sink_addr[0]}:{sink_addr[1]}", flush=True)
    workroot = Path(tempfile.mkdtemp(prefix="mailguard-smtp-source-"))
    results: list[SourceResult] = []
    dead: set[str] = set()
    names = [f"{args.target[0]}:{args.target[1]}"] if args.target else args.target_names
    try:
        for size in args.size_list:
            for rcpts in args.rcpt_list:
                for name in names:
                    if name in dead:
                        r = SourceResult(
                            name, size, rcpts, args.messages, args.concurrency, args.upstream
                        )
                        r.start_error = "not started (see the first scenario)"
                        results.append(r)
                        continue
                    workdir = workroot / f"{name.replace(':', '_')}-{size}-{rcpts}"
                    r = await one(args, name, size, rcpts, workdir, sink)
                    results.append(r)
                    if r.start_error is not None:
                        dead.add(name)
    finally:
        if sink is not None:
            await sink.close()
        if not args.keep_workdir:
            shutil.rmtree(workroot, ignore_errors=True)
    print(report(results, args))
    path = args.json or RESULTS_DIR / f"smtp-source-{time.strftime('%Y%m%d%H%M%S')}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [
            {**asdict(r), "msgs_per_s": r.msgs_per_s, "cpu_ms_per_msg": r.cpu_ms_per_msg}
            for r in results
        ]
        path.write_text(json.dumps({"argv": sys.argv[1:], "results": rows}, indent=2))
        print(f"results written to {path}")
    print()
    if any(r.problems for r in results):
        print("VERIFY FAIL")
        return 1
    if dead or any(r.exit_status != 0 for r in results if r.start_error is None):
        print("some targets could not be started or smtp-source failed")
        return 2
    print("verify OK (upstream count = messages sent)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.smtp_source = find_tool("smtp-source")
    args.smtp_sink = find_tool("smtp-sink")
    if args.smtp_source is None:
        print(
            "SKIP: Postfix's smtp-source is not installed "
            "(apt-get install postfix; it lands in /usr/sbin)"
        )
        return 0
    if args.upstream == "smtp-sink" and args.smtp_sink is None:
        print("SKIP: Postfix's smtp-sink is not installed (apt-get install postfix)")
        return 0
    install_uvloop()
    return run_interruptibly(amain(args))


if __name__ == "__main__":
    sys.exit(main())
