"""The load driver: throughput, latency, CPU and memory of each target, and delivery checks.

``python -m loadtest.run`` starts the sink (in this process) and, for every scenario (message
size x recipient count) and every target, a fresh target subprocess relaying to the sink; it
sends the messages over persistent connections, measures, and verifies that the sink received
every accepted message exactly once (unaltered, to the accepted recipient count) and nothing
else.  Prints a Markdown table per scenario and the gate's ratios; exits 1 if any
verification failed, 2 if a target could not be started.  See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loadtest.client import MessageFactory, SMTPClient, SMTPClientError, TxResult
from loadtest.sink import Sink, install_uvloop, parse_hostport
from loadtest.targets import (
    DEFAULT_TARGETS,
    REPO,
    TargetProcess,
    TargetStartError,
    children,
    comm,
    cpu_delta_ms,
    cpu_snapshot,
    host_cpu,
    make_target,
    resolve_targets,
    vm_hwm_kb,
)

RESULTS_DIR = REPO / "loadtest" / "results"


def parse_size(value: str) -> int:
    v = value.strip().lower().removesuffix("b")
    mult = 1
    if v.endswith("k"):
        v, mult = v[:-1], 1024
    elif v.endswith("m"):
        v, mult = v[:-1], 1024 * 1024
    return int(float(v) * mult)


def size_label(size: int) -> str:
    if size % (1024 * 1024) == 0:
        return f"{size // (1024 * 1024)} MB"
    if size % 1024 == 0:
        return f"{size // 1024} KB"
    return f"{size} B"


def int_list(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Record:
    """What the client knows about one message."""

    outcome: str  # accepted | refused | error | unsent
    rcpts_accepted: int = 0
    body_sent: bool = False
    digest: str = ""
    rcpts: int = 0
    reply: str = ""


@dataclass
class ScenarioResult:
    target: str
    size: int
    rcpts: int
    messages: int  # measured (after warm-up)
    concurrency: int
    pipelining: bool | None = None
    elapsed: float = 0.0
    accepted: int = 0
    refused: int = 0
    errors: int = 0
    unsent: int = 0
    timed_out: bool = False
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms: float | None = None
    child_cpu_ms: dict[str, float] = field(default_factory=dict)
    peak_rss_kb: int | None = None
    child_peak_rss_kb: dict[str, int] = field(default_factory=dict)
    driver_cpu_pct: float | None = None
    other_cpu_pct: float | None = None  # busy CPU of everything else on the machine
    steal_pct: float | None = None
    verify_ok: bool | None = None
    verify_problems: list[str] = field(default_factory=list)
    unknown_outcome: int = 0
    replies: dict[str, int] = field(default_factory=dict)  # refusal/error samples
    start_error: str | None = None

    @property
    def answered(self) -> int:
        return self.accepted + self.refused

    @property
    def msgs_per_s(self) -> float | None:
        return self.accepted / self.elapsed if self.elapsed > 0 else None

    @property
    def cpu_ms_per_msg(self) -> float | None:
        if self.cpu_ms is None or not self.answered:
            return None
        return self.cpu_ms / self.answered

    def child_cpu_per_msg(self) -> float | None:
        if not self.child_cpu_ms or not self.answered:
            return None
        return sum(self.child_cpu_ms.values()) / self.answered


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, min(len(sorted_values), round(pct / 100.0 * len(sorted_values) + 0.4999)))
    return sorted_values[rank - 1]


class Driver:
    """Sends one scenario's messages to one listening target over persistent connections."""

    def __init__(self, args: argparse.Namespace, factory: MessageFactory, host: str, port: int):
        self.args = args
        self.factory = factory
        self.host = host
        self.port = port
        self.records: dict[str, Record] = {}
        self.latencies: list[float] = []
        self.replies: Counter[str] = Counter()
        self.clients: list[SMTPClient | None] = []
        self.pipelining: bool | None = None
        self._next = 0
        self._end = 0

    async def open(self) -> None:
        results = await asyncio.gather(
            *(self._connect() for _ in range(self.args.concurrency)), return_exceptions=True
        )
        self.clients = [r if isinstance(r, SMTPClient) else None for r in results]
        failures = [r for r in results if not isinstance(r, SMTPClient)]
        if failures:
            self.replies[f"connect: {failures[0]}"] += len(failures)
        opened = [c for c in self.clients if c is not None]
        if opened:
            self.pipelining = self._use_pipelining(opened[0])

    def _use_pipelining(self, client: SMTPClient) -> bool:
        if self.args.pipelining == "force":
            return True
        if self.args.pipelining == "never":
            return False
        return client.pipelining

    async def _connect(self) -> SMTPClient:
        return await SMTPClient.connect(self.host, self.port, timeout=self.args.io_timeout)

    async def run_phase(self, start: int, count: int, measure: bool) -> None:
        self._next, self._end = start, start + count
        workers = [
            asyncio.create_task(self._worker(slot, measure)) for slot in range(len(self.clients))
        ]
        await asyncio.gather(*workers)

    def _take(self) -> int | None:
        if self._next >= self._end:
            return None
        n = self._next
        self._next += 1
        return n

    async def _worker(self, slot: int, measure: bool) -> None:
        client = self.clients[slot]
        sent_on_conn = 0
        connect_failures = 0
        try:
            while (n := self._take()) is not None:
                msg = self.factory.make(n)
                if client is None:
                    try:
                        client = await self._connect()
                    except SMTPClientError as exc:
                        connect_failures += 1
                        self.records[msg.ident] = Record("error", reply=str(exc))
                        self.replies[f"connect: {exc}"[:90]] += 1
                        if connect_failures >= 3:
                            return  # this worker gives up; the others go on
                        await asyncio.sleep(0.2)
                        continue
                    sent_on_conn = 0
                    connect_failures = 0
                    if self.pipelining is None:
                        self.pipelining = self._use_pipelining(client)
                # Until the reply is in, the outcome is unknown (the body may have gone out).
                self.records[msg.ident] = Record(
                    "error", body_sent=True, digest=msg.digest, rcpts=len(msg.rcpts)
                )
                result: TxResult = await client.send(msg, pipelining=bool(self.pipelining))
                self.records[msg.ident] = Record(
                    result.outcome,
                    result.rcpts_accepted,
                    result.body_sent,
                    msg.digest,
                    len(msg.rcpts),
                    result.reply,
                )
                if measure and result.outcome != "error":
                    self.latencies.append(result.latency)
                if result.outcome != "accepted":
                    self.replies[result.reply[:90]] += 1
                sent_on_conn += 1
                if result.drop_connection:
                    client.close()
                    client = None
                elif self.args.per_connection and sent_on_conn >= self.args.per_connection:
                    await client.quit()
                    client = None
        except asyncio.CancelledError:
            if client is not None:  # cancelled mid-transaction: the connection is unusable
                client.close()
                client = None
            raise
        finally:
            self.clients[slot] = client

    def mark_unsent(self, start: int, end: int) -> None:
        for n in range(start, end):
            self.records.setdefault(self.factory.ident(n), Record("unsent"))

    async def close(self) -> None:
        await asyncio.gather(*(c.quit() for c in self.clients if c is not None))
        self.clients = []


# The ratios printed under each scenario's table: (numerator, denominator) targets.
RATIOS = (
    ("gate-off", "passthrough"),
    ("gate-enforce", "gate-off"),
    ("gate-postfix", "gate-off-postfix"),
    ("postfix-milter", "gate-postfix"),
    ("postfix-milter", "postfix"),
    ("gate-postfix", "postfix"),
)


async def settle(
    sink: Sink, quiet: float = 0.3, limit: float = 5.0, expected: int | None = None
) -> None:
    """Wait until the sink has received nothing new for ``quiet`` seconds, or, given
    ``expected`` (a target that queues before it delivers), until it has that many messages
    and then nothing new for ``quiet`` seconds (at most ``limit`` seconds in all)."""
    deadline = time.monotonic() + limit
    last = sink.stats.messages
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        if sink.stats.messages == last and (expected is None or last >= expected):
            return
        last = sink.stats.messages


def verify(driver: Driver, sink: Sink, result: ScenarioResult, sink_is_upstream: bool) -> None:
    problems: list[str] = []
    stats = sink.stats
    unknown = 0
    for ident, rec in driver.records.items():
        got = stats.by_id.get(ident, [])
        if rec.outcome == "accepted":
            if len(got) != 1:
                problems.append(f"{ident}: accepted, received {len(got)} times")
            elif got[0].digest != rec.digest:
                problems.append(f"{ident}: body altered in transit (digest mismatch)")
            elif got[0].rcpts != rec.rcpts_accepted:
                problems.append(
                    f"{ident}: {rec.rcpts_accepted} recipients accepted, "
                    f"upstream got {got[0].rcpts}"
                )
        elif rec.outcome == "error" and rec.body_sent:
            unknown += 1  # outcome unknown to the client: delivered at most once is fine
            if len(got) > 1:
                problems.append(f"{ident}: outcome unknown, received {len(got)} times")
        elif got:
            problems.append(f"{ident}: {rec.outcome} ({rec.reply}), yet received {len(got)}x")
    strays = [i for i in stats.by_id if i not in driver.records]
    if strays:
        problems.append(f"{len(strays)} received ids never sent in this scenario, e.g. {strays[0]}")
    if stats.without_id:
        problems.append(f"{stats.without_id} received messages without X-Loadtest-Id")
    if not sink_is_upstream and stats.messages == 0 and result.accepted:
        problems.append("the sink received nothing: does the target relay to --sink?")
    result.unknown_outcome = unknown
    result.verify_problems = problems
    result.verify_ok = not problems


async def run_scenario(
    args: argparse.Namespace,
    sink: Sink,
    target_name: str,
    host: str,
    port: int,
    pid: int | None,
    size: int,
    rcpts: int,
    run_id: str,
    sink_is_upstream: bool,
    queues: bool = False,
) -> ScenarioResult:
    result = ScenarioResult(target_name, size, rcpts, args.messages, args.concurrency)
    factory = MessageFactory(
        size,
        rcpts,
        prefix=f"{run_id}-{target_name}-{size}-{rcpts}",
        refuse_every=args.refuse_every,
        personalize=args.bodies == "personalized",
        recipient_pool=args.recipient_pool,
    )
    sink.reset()
    driver = Driver(args, factory, host, port)
    warmup = args.warmup
    deadline = time.monotonic() + args.scenario_timeout
    measured = False
    try:
        await asyncio.wait_for(driver.open(), args.io_timeout + 5)
        if warmup:
            await asyncio.wait_for(
                driver.run_phase(0, warmup, measure=False), deadline - time.monotonic()
            )
        before = cpu_snapshot(pid)
        host0 = host_cpu()
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        measured = True
        try:
            await asyncio.wait_for(
                driver.run_phase(warmup, args.messages, measure=True),
                max(deadline - time.monotonic(), 0.1),
            )
        finally:
            result.elapsed = time.perf_counter() - t0
            after = cpu_snapshot(pid)
            ru1 = resource.getrusage(resource.RUSAGE_SELF)
            host1 = host_cpu()
            result.cpu_ms, result.child_cpu_ms = cpu_delta_ms(before, after)
            driver_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
            if result.elapsed > 0:
                result.driver_cpu_pct = 100.0 * driver_cpu / result.elapsed
                ours = (
                    driver_cpu + ((result.cpu_ms or 0.0) + sum(result.child_cpu_ms.values())) / 1000
                )
                other = max(host1[0] - host0[0] - ours, 0.0)
                if pid is not None or sink_is_upstream:  # else the target's CPU is in it
                    result.other_cpu_pct = 100.0 * other / result.elapsed
                result.steal_pct = 100.0 * (host1[1] - host0[1]) / result.elapsed
    except TimeoutError:
        result.timed_out = True
        if not measured:
            result.elapsed = 0.0
    driver.mark_unsent(0, warmup + args.messages)
    await driver.close()
    if queues:
        accepted = sum(r.outcome == "accepted" for r in driver.records.values())
        await settle(sink, limit=args.scenario_timeout, expected=accepted)
    else:
        await settle(sink)
    result.pipelining = driver.pipelining
    if pid is not None:
        result.peak_rss_kb = vm_hwm_kb(pid)
        for kid in children(pid):
            hwm = vm_hwm_kb(kid)
            if hwm is not None:
                result.child_peak_rss_kb[comm(kid)] = hwm
    measured_ids = {factory.ident(n) for n in range(warmup, warmup + args.messages)}
    for ident, rec in driver.records.items():
        if ident not in measured_ids:
            continue
        if rec.outcome == "accepted":
            result.accepted += 1
        elif rec.outcome == "refused":
            result.refused += 1
        elif rec.outcome == "error":
            result.errors += 1
        else:
            result.unsent += 1
    lat = sorted(driver.latencies)
    p50, p99 = percentile(lat, 50), percentile(lat, 99)
    result.p50_ms = p50 * 1000 if p50 is not None else None
    result.p99_ms = p99 * 1000 if p99 is not None else None
    result.replies = dict(driver.replies.most_common(5))
    if args.verify:
        verify(driver, sink, result, sink_is_upstream)
    return result


# --------------------------------------------------------------------------- reporting


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def table(results: list[ScenarioResult]) -> str:
    has_children = any(r.child_cpu_ms for r in results)
    head = ["target", "msg/s", "p50 ms", "p99 ms", "CPU ms/msg"]
    if has_children:
        head.append("child CPU ms/msg")
    head += [
        "peak RSS MB",
        "accepted",
        "refused",
        "errors",
        "pipelining",
        "driver CPU %",
        "other CPU %",
        "verify",
    ]
    rows = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in results:
        if r.start_error is not None:
            cells = [r.target, "not started"] + [""] * (len(head) - 2)
            rows.append("| " + " | ".join(cells) + " |")
            continue
        verdict = "n/a" if r.verify_ok is None else ("OK" if r.verify_ok else "**FAIL**")
        if r.timed_out:
            verdict += " (timed out)"
        cells = [
            r.target,
            fmt(r.msgs_per_s, 0),
            fmt(r.p50_ms, 2),
            fmt(r.p99_ms, 2),
            fmt(r.cpu_ms_per_msg, 3),
        ]
        if has_children:
            kids = ", ".join(f"{k} {v / r.answered:.3f}" for k, v in r.child_cpu_ms.items())
            cells.append(kids if r.answered and kids else "n/a")
        rss = r.peak_rss_kb / 1024 if r.peak_rss_kb is not None else None
        cells += [
            fmt(rss, 1),
            str(r.accepted),
            str(r.refused),
            str(r.errors + r.unsent),
            {None: "n/a", True: "yes", False: "no"}[r.pipelining],
            fmt(r.driver_cpu_pct, 0),
            fmt(r.other_cpu_pct, 0),
            verdict,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def ratios(results: list[ScenarioResult], runs: list[ScenarioResult] | None = None) -> list[str]:
    """The ratios of the table's rows; with ``runs`` (every run, in the order they ran) and more
    than one run per target, also the msg/s ratio of each repetition's pair, which ran back to
    back, so a drift of the machine's speed between repetitions cancels out."""
    by = {r.target: r for r in results if r.start_error is None}
    lines = []
    for num, den in RATIOS:
        if num in by and den in by:
            a, b = by[num], by[den]
            line = (
                f"- {num} / {den}: msg/s {ratio(a.msgs_per_s, b.msgs_per_s)}, "
                f"CPU ms/msg {ratio(a.cpu_ms_per_msg, b.cpu_ms_per_msg)}"
            )
            paired = [
                x.msgs_per_s / y.msgs_per_s
                for x, y in zip(
                    [r for r in runs or () if r.target == num],
                    [r for r in runs or () if r.target == den],
                    strict=False,
                )
                if x.msgs_per_s and y.msgs_per_s
            ]
            if len(paired) > 1:
                line += (
                    f"; msg/s per repetition {' '.join(f'{q:.2f}x' for q in paired)}"
                    f" (median {statistics.median(paired):.2f}x)"
                )
            lines.append(line)
    return lines


def details(results: list[ScenarioResult]) -> list[str]:
    lines = []
    for r in results:
        if r.start_error is not None:
            lines.append(f"- {r.target}: could not start:\n{r.start_error}")
            continue
        if r.replies:
            sample = "; ".join(f"{n}x {text}" for text, n in r.replies.items())
            lines.append(f"- {r.target}: refusals/errors: {sample}")
        if r.child_peak_rss_kb:
            kids = ", ".join(f"{k} {v / 1024:.1f} MB" for k, v in r.child_peak_rss_kb.items())
            lines.append(f"- {r.target}: children's peak RSS: {kids}")
        if r.steal_pct is not None and r.steal_pct >= 5:
            lines.append(f"- {r.target}: the hypervisor stole {r.steal_pct:.0f}% CPU meanwhile")
        if r.unknown_outcome:
            lines.append(
                f"- {r.target}: {r.unknown_outcome} messages with unknown outcome "
                "(error after the body was sent; each may arrive at most once)"
            )
        if r.unsent:
            lines.append(f"- {r.target}: {r.unsent} messages never sent")
        for problem in r.verify_problems[:10]:
            lines.append(f"- {r.target}: FAIL {problem}")
        if len(r.verify_problems) > 10:
            lines.append(f"- {r.target}: ... {len(r.verify_problems) - 10} more problems")
    return lines


def representatives(runs: list[ScenarioResult]) -> list[ScenarioResult]:
    """One row per target: its median run by msg/s, carrying every run's verification."""
    by_target: dict[str, list[ScenarioResult]] = {}
    for r in runs:
        by_target.setdefault(r.target, []).append(r)
    rows = []
    for same in by_target.values():
        ranked = sorted(same, key=lambda r: r.msgs_per_s or 0.0)
        row = ranked[(len(ranked) - 1) // 2]
        if len(same) > 1:
            verdicts = [r.verify_ok for r in same if r.verify_ok is not None]
            row = dataclasses.replace(
                row,
                verify_ok=all(verdicts) if verdicts else None,
                verify_problems=[p for r in same for p in r.verify_problems],
                timed_out=any(r.timed_out for r in same),
            )
        rows.append(row)
    return rows


def report(all_results: list[ScenarioResult], args: argparse.Namespace) -> str:
    out = []
    scenarios: dict[tuple[int, int], list[ScenarioResult]] = {}
    for r in all_results:
        scenarios.setdefault((r.size, r.rcpts), []).append(r)
    for (size, rcpts), runs in scenarios.items():
        results = representatives(runs)
        repeat = f", median of {args.repeat} runs by msg/s" if args.repeat > 1 else ""
        out.append(
            f"\n### {size_label(size)} message, {rcpts} recipient{'s' if rcpts > 1 else ''}"
            f" — {args.messages} messages (+{args.warmup} warm-up), "
            f"concurrency {args.concurrency}{repeat}\n"
        )
        out.append(table(results))
        extra = ratios(results, runs) + details(results)
        if extra:
            out.append("")
            out.extend(extra)
    return "\n".join(out)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    p.add_argument("--messages", type=int, help="measured messages per scenario (default 2000)")
    p.add_argument("--concurrency", type=int, default=50, help="parallel connections")
    p.add_argument("--warmup", type=int, help="unmeasured messages first (default N/20)")
    p.add_argument("--sizes", default="2k,50k", help="message sizes, e.g. 2k,50k")
    p.add_argument("--rcpts", default="1,10", help="recipients per message, e.g. 1,10")
    p.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="passthrough, passthrough-connect, gate-off, gate-enforce (gate-on), gate-monitor",
    )
    p.add_argument(
        "--target",
        type=parse_hostport,
        help="drive this already-running SMTP server instead of starting targets",
    )
    p.add_argument("--target-pid", type=int, help="PID of --target, for CPU/RSS figures")
    p.add_argument("--quick", action="store_true", help="300 messages per scenario")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs per scenario and target; the table shows the median",
    )
    p.add_argument("--sink", type=parse_hostport, default=("127.0.0.1", 0), help="sink address")
    p.add_argument(
        "--pipelining",
        choices=("auto", "force", "never"),
        default="auto",
        help="auto: pipeline when the server advertises PIPELINING",
    )
    p.add_argument(
        "--bodies",
        choices=("same", "personalized"),
        default="same",
        help="same: one body for every message; personalized: a mail merge (a name, a token "
        "and an unsubscribe link of each message's own)",
    )
    p.add_argument(
        "--recipient-pool",
        type=int,
        default=0,
        metavar="P",
        help="0 (default): every message to the same recipients (rcpt0..); P: message n to the "
        "next recipients of a pool of P addresses, so each gets a copy every P/rcpts messages "
        "(a campaign to many recipients; P must be at least --rcpts)",
    )
    p.add_argument("--per-connection", type=int, default=500, help="transactions per connection")
    p.add_argument(
        "--refuse-every",
        type=int,
        default=0,
        metavar="K",
        help="every Kth message goes to recipients the sink refuses (tests refusal accounting)",
    )
    p.add_argument("--sink-data-delay-ms", type=float, default=0.0, help="slow upstream")
    p.add_argument("--scenario-timeout", type=float, default=180.0, help="seconds per scenario")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for 220")
    p.add_argument("--io-timeout", type=float, default=30.0, help="seconds per SMTP reply")
    p.add_argument("--python", default=sys.executable, help="interpreter for the targets")
    p.add_argument(
        "--gate-server-option",
        action="append",
        default=[],
        metavar="KEY=TOML",
        help="extra [server] line for the gate's config, e.g. max_connections_per_client=200",
    )
    p.add_argument(
        "--gate-store-url",
        default="embedded",
        metavar="URL",
        help="the gate's [store] url (default: embedded), e.g. a redis-server on another CPU",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="pin the driver to the first CPU and each target (with its children) to the others",
    )
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.add_argument("--json", type=Path, help="write results here (default loadtest/results/)")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and state")
    args = p.parse_args(argv)
    if args.messages is None:
        args.messages = 300 if args.quick else 2000
    if args.warmup is None:
        args.warmup = max(args.messages // 20, min(args.concurrency, args.messages))
    args.size_list = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    args.rcpt_list = int_list(args.rcpts)
    if args.recipient_pool < 0 or 0 < args.recipient_pool < max(args.rcpt_list):
        p.error(f"--recipient-pool must be 0 or at least {max(args.rcpt_list)} (--rcpts)")
    try:
        args.target_names = resolve_targets(args.targets)
    except ValueError as exc:
        p.error(str(exc))
    extra: dict[str, str] = {}
    for item in args.gate_server_option:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--gate-server-option wants KEY=VALUE, got {item!r}")
        extra[key.strip()] = value.strip()
    args.gate_server_extra = extra
    return args


async def amain(args: argparse.Namespace) -> int:
    sink = Sink(reject_rcpt="reject", data_delay=args.sink_data_delay_ms / 1000.0)
    sink_addr = await sink.start(*args.sink)
    run_id = time.strftime("%Y%m%d%H%M%S")
    workroot = Path(tempfile.mkdtemp(prefix="mailguard-loadtest-"))
    print(f"sink on {sink_addr[0]}:{sink_addr[1]}; work dir {workroot}", flush=True)
    results: list[ScenarioResult] = []
    dead: dict[str, str] = {}  # targets that could not be started
    try:
        for size in args.size_list:
            for rcpts in args.rcpt_list:
                for rep in range(args.repeat):
                    # Targets interleaved, so that machine noise hits them alike.
                    if args.target is not None:
                        host, port = args.target
                        name = f"{host}:{port}"
                        print(f"-- {name}: {size_label(size)} x {rcpts} rcpt ...", flush=True)
                        results.append(
                            await run_scenario(
                                args,
                                sink,
                                name,
                                host,
                                port,
                                args.target_pid,
                                size,
                                rcpts,
                                f"{run_id}.{rep}",
                                (host, port) == sink_addr,
                            )
                        )
                        continue
                    for name in args.target_names:
                        if name in dead:
                            if rep == 0:
                                result = ScenarioResult(
                                    name, size, rcpts, args.messages, args.concurrency
                                )
                                result.start_error = dead[name]
                                results.append(result)
                            continue
                        target = make_target(
                            name,
                            upstream=sink_addr,
                            python=args.python,
                            workdir=workroot / f"{name}-{size}-{rcpts}-{rep}",
                            gate_server_extra=args.gate_server_extra,
                            gate_store_url=args.gate_store_url,
                        )
                        target.cpus = args.target_cpus
                        result = await run_one(args, sink, target, size, rcpts, f"{run_id}.{rep}")
                        results.append(result)
                        if result.start_error is not None:
                            dead[name] = "not started (see the first scenario)"
    finally:
        await sink.close()
        if not args.keep_workdir:
            shutil.rmtree(workroot, ignore_errors=True)
    print(report(results, args))
    save(results, args, run_id)
    failed = [r for r in results if r.verify_ok is False]
    print()
    if failed:
        print(f"VERIFY FAIL in {len(failed)} run(s)")
        return 1
    if dead:
        print("verify OK for every target that ran; some targets could not be started")
        return 2
    print("verify OK" if args.verify else "verify skipped (--no-verify)")
    return 0


async def run_one(
    args: argparse.Namespace,
    sink: Sink,
    target: TargetProcess,
    size: int,
    rcpts: int,
    run_id: str,
) -> ScenarioResult:
    print(f"-- {target.name}: {size_label(size)} x {rcpts} rcpt ...", flush=True)
    try:  # the finally also runs when we are interrupted while it starts
        try:
            await target.start(args.start_timeout)
        except TargetStartError as exc:
            print(f"   {target.name} failed to start:\n{exc}", flush=True)
            result = ScenarioResult(target.name, size, rcpts, args.messages, args.concurrency)
            result.start_error = str(exc)
            return result
        return await run_scenario(
            args,
            sink,
            target.name,
            target.host,
            target.port,
            target.pid,
            size,
            rcpts,
            run_id,
            True,
            queues=getattr(target, "queues", False),
        )
    finally:
        await target.stop()
        if target.proc is not None and target.proc.returncode not in (0, -15, None):
            print(
                f"   note: {target.name} exited with status {target.proc.returncode}\n"
                f"{target.stderr_tail(10)}",
                flush=True,
            )


def save(results: list[ScenarioResult], args: argparse.Namespace, run_id: str) -> None:
    path = args.json or RESULTS_DIR / f"run-{run_id}.json"
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        payload: dict[str, Any] = {
            "run_id": run_id,
            "argv": sys.argv[1:],
            "cpus": os.cpu_count(),
            "results": [
                {
                    **asdict(r),
                    "msgs_per_s": r.msgs_per_s,
                    "cpu_ms_per_msg": r.cpu_ms_per_msg,
                    "child_cpu_ms_per_msg": r.child_cpu_per_msg(),
                }
                for r in results
            ],
        }
        path.write_text(json.dumps(payload, indent=2))
        print(f"results written to {path}")


def pin_cpus(args: argparse.Namespace) -> None:
    """``--pin``: the driver on one CPU, the targets on the rest (needs two or more)."""
    args.target_cpus = None
    if not args.pin:
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        print("--pin ignored: fewer than two CPUs available")
        return
    os.sched_setaffinity(0, {cpus[0]})
    args.target_cpus = set(cpus[1:])
    print(f"pinned: driver+sink on CPU {cpus[0]}, targets on CPU(s) {cpus[1:]}")


def run_interruptibly(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro``; SIGTERM and Ctrl-C cancel it, so that the targets it started are stopped
    (they run in their own sessions and do not get the terminal's or our signals)."""

    async def guarded() -> int:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        return asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: targets stopped", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pin_cpus(args)
    install_uvloop()
    return run_interruptibly(amain(args))


if __name__ == "__main__":
    sys.exit(main())
