"""Stress run of issue 4's concurrency case: two gates, one Redis, one campaign, 50 connections.

``python -m loadtest.stress`` repeats, for up to ``--rounds`` rounds and at most ``--time-limit``
seconds (loopback only): start a fresh redis-server on a unix socket and two ``mailguard serve``
processes sharing it (customer ``load``, not a list server, the default thresholds:
``bulk_recipients`` 20), then send one campaign (one body, personalized greeting) to
``--recipients`` (50) distinct recipients over as many concurrent connections, alternately to
the two gates, each connection one transaction to one recipient.  Every round must end with
exactly ``bulk_recipients`` messages accepted by the gates AND received by the upstream sink
(each once, to the one recipient), and every other one refused with ``550 5.7.1``; no errors.
Prints per-round counts and latencies, the totals and latency percentiles over all rounds, and
exits 1 on any violation (2 if a process could not be started).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.client import Message, SMTPClient, SMTPClientError, TxResult, body_digest, dot_stuff
from loadtest.run import percentile, run_interruptibly
from loadtest.sink import Sink, install_uvloop
from loadtest.targets import TargetProcess, TargetStartError, free_port, gate_config

SENDER = "news@load.example"
BODY = (
    "Dear {name},\r\n"
    "\r\n"
    "Our spring sale starts on Monday: every garden tool, seed packet and plant pot in the\r\n"
    "shop is reduced by a fifth for one week, and members get free delivery on orders above\r\n"
    "thirty euros.  Come to the opening morning for coffee and a short talk on pruning fruit\r\n"
    "trees, or order online as usual.  We look forward to seeing you.\r\n"
    "\r\n"
    "The Garden Shop team\r\n"
)


@dataclass
class Round:
    number: int
    accepted: int = 0
    refused: int = 0  # 550 5.7.1
    other: Counter[str] = field(default_factory=Counter)  # anything else: a violation
    received: int = 0  # messages the sink received
    latencies: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0


def campaign_message(run: str, i: int) -> Message:
    """Copy ``i`` of the campaign: one recipient, a personalized greeting, a unique id."""
    rcpt = f"reader{i}@dest{i % 5}.example"
    ident = f"{run}-{i:03d}"
    body = BODY.format(name=f"Reader {i}").encode()
    header = (
        f"From: Garden Shop <{SENDER}>\r\n"
        f"To: <{rcpt}>\r\n"
        "Subject: Spring sale\r\n"
        f"Message-ID: <{ident}@load.example>\r\n"
        f"X-Loadtest-Id: {ident}\r\n"
        "\r\n"
    ).encode()
    return Message(ident, SENDER, (rcpt,), dot_stuff(header + body), body_digest(body), False)


class SharedRedis:
    """A redis-server on a unix socket in ``directory``, started by us: no persistence, or with
    ``aof`` the embedded store's (``appendonly yes``, ``appendfsync everysec``); ``options``:
    more ``--name value`` arguments."""

    def __init__(
        self, directory: Path, *, aof: bool = False, options: tuple[str, ...] = ()
    ) -> None:
        self.socket = directory / "redis.sock"
        self.directory = directory
        self.aof = aof
        self.options = options
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    async def start(self, timeout: float = 10.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        binary = shutil.which("redis-server")
        if binary is None:
            raise TargetStartError("redis-server not found (apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--dir", str(self.directory), "--save", "",
             "--appendonly", "yes" if self.aof else "no", "--appendfsync", "everysec",
             "--logfile", str(self.directory / "redis.log"), *self.options],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise TargetStartError(f"redis-server exited with {self.proc.returncode}")
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_unix_connection(str(self.socket))
                writer.write(b"PING\r\n")
                pong = await asyncio.wait_for(reader.readline(), 2.0)
                writer.close()
                if pong.startswith(b"+PONG"):
                    return
            await asyncio.sleep(0.02)
        await self.stop()
        raise TargetStartError(f"redis-server not ready on {self.socket} within {timeout:g}s")

    async def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        for _ in range(100):
            if proc.poll() is not None:
                return
            await asyncio.sleep(0.05)
        proc.kill()
        proc.wait()


def make_gate(
    n: int, workdir: Path, upstream: tuple[str, int], store_url: str, bulk_recipients: int
) -> TargetProcess:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "state").mkdir(exist_ok=True)
    config = workdir / "mailguard.toml"
    config.write_text(
        gate_config(
            port=port,
            upstream=upstream,
            mode="enforce",
            workdir=workdir,
            store_url=store_url,
            # otherwise the defaults: mailbomb_messages 10, every action reject
            policy={"bulk_recipients": str(bulk_recipients)},
        )
    )
    argv = [sys.executable, "-m", "mailguard", "serve", "--config", str(config)]
    env = {"MAILGUARD_STATE_DIR": str(workdir / "state")}
    return TargetProcess(f"gate{n}", argv, "127.0.0.1", port, workdir, env)


async def send_one(port: int, msg: Message, timeout: float) -> TxResult:
    try:
        client = await SMTPClient.connect("127.0.0.1", port, timeout=timeout)
    except SMTPClientError as exc:
        return TxResult("error", 0.0, reply=f"connect: {exc}")
    try:
        return await client.send(msg, pipelining=False)
    finally:
        with contextlib.suppress(SMTPClientError, OSError):
            await client.quit()
        client.close()


async def one_round(args: argparse.Namespace, number: int, sink: Sink, sink_addr: tuple[str, int],
                    root: Path) -> Round:  # fmt: skip
    result = Round(number)
    workdir = root / f"round{number}"
    redis = SharedRedis(workdir / "redis")
    gates = [
        make_gate(n, workdir / f"gate{n}", sink_addr, redis.url, args.bulk_recipients)
        for n in (1, 2)
    ]
    sink.reset()
    try:
        await redis.start()
        await asyncio.gather(*(gate.start(args.start_timeout) for gate in gates))
        run = f"stress{time.strftime('%H%M%S')}r{number}"
        messages = [campaign_message(run, i) for i in range(args.recipients)]
        start = time.perf_counter()
        replies = await asyncio.gather(
            *(send_one(gates[i % 2].port, m, args.io_timeout) for i, m in enumerate(messages))
        )
        result.seconds = time.perf_counter() - start
        await asyncio.sleep(0.2)  # the sink has the message before the gate answers; be sure
        accepted_ids = set()
        for msg, tx in zip(messages, replies, strict=True):
            if tx.outcome == "accepted":
                result.accepted += 1
                accepted_ids.add(msg.ident)
            elif tx.reply.startswith("550 5.7.1"):
                result.refused += 1
            else:
                result.other[f"{tx.outcome}: {tx.reply[:80]}"] += 1
            if tx.outcome != "error":
                result.latencies.append(tx.latency)
        stats = sink.stats
        result.received = stats.messages
        expected = args.bulk_recipients
        if result.accepted != expected:
            result.problems.append(f"{result.accepted} accepted, expected exactly {expected}")
        if result.refused != args.recipients - expected:
            result.problems.append(
                f"{result.refused} refused with 550 5.7.1, expected {args.recipients - expected}"
            )
        if result.other:
            result.problems.append(f"other replies: {dict(result.other)}")
        if set(stats.by_id) != accepted_ids or stats.duplicates or stats.without_id:
            result.problems.append(
                f"the sink received {stats.messages} messages ({len(stats.by_id)} ids, "
                f"{stats.duplicates} duplicates, {stats.without_id} without id); the gates "
                f"accepted {len(accepted_ids)}"
            )
        for msg in messages:
            for delivery in stats.by_id.get(msg.ident, []):
                if delivery.rcpts != 1 or delivery.digest != msg.digest:
                    result.problems.append(f"{msg.ident}: received altered or to several rcpts")
    except TargetStartError as exc:
        result.problems.append(f"could not start: {exc}")
        raise
    finally:
        for gate in gates:
            await gate.stop()
            if gate.proc is not None and gate.proc.returncode not in (0, -15, None):
                result.problems.append(
                    f"{gate.name} exited with {gate.proc.returncode}\n{gate.stderr_tail(10)}"
                )
        await redis.stop()
    return result


def ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1000:.1f}"


async def amain(args: argparse.Namespace) -> int:
    sink = Sink()
    sink_addr = await sink.start("127.0.0.1", 0)
    root = Path(tempfile.mkdtemp(prefix="mailguard-stress-"))
    rounds: list[Round] = []
    deadline = time.monotonic() + args.time_limit
    print(
        f"stress: up to {args.rounds} rounds / {args.time_limit:g}s; per round two gates, one "
        f"redis-server, {args.recipients} recipients over {args.recipients} connections; "
        f"expect {args.bulk_recipients} accepted"
    )
    print("| round | accepted | refused 5.7.1 | other | sink received | p50 ms | p99 ms | max ms "
          "| seconds | verdict |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    status = 0
    try:
        for number in range(1, args.rounds + 1):
            if time.monotonic() >= deadline:
                print(f"time limit reached after {len(rounds)} rounds")
                break
            try:
                r = await one_round(args, number, sink, sink_addr, root)
            except TargetStartError as exc:
                print(f"round {number}: could not start the processes:\n{exc}")
                status = 2
                break
            rounds.append(r)
            lat = sorted(r.latencies)
            verdict = "OK" if not r.problems else "**FAIL**"
            print(
                f"| {number} | {r.accepted} | {r.refused} | {sum(r.other.values())} | "
                f"{r.received} | {ms(percentile(lat, 50))} | {ms(percentile(lat, 99))} | "
                f"{ms(lat[-1] if lat else None)} | {r.seconds:.2f} | {verdict} |",
                flush=True,
            )
            for problem in r.problems:
                print(f"  round {number}: {problem}")
    finally:
        await sink.close()
        if not args.keep_workdir:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"work dir kept: {root}")
    failed = [r for r in rounds if r.problems]
    every = sorted(x for r in rounds for x in r.latencies)
    print(
        f"\ntotal: {len(rounds)} rounds, {sum(r.accepted for r in rounds)} accepted, "
        f"{sum(r.refused for r in rounds)} refused with 550 5.7.1, "
        f"{sum(sum(r.other.values()) for r in rounds)} other, "
        f"{sum(r.received for r in rounds)} received by the sink; "
        f"latency p50 {ms(percentile(every, 50))} / p90 {ms(percentile(every, 90))} / "
        f"p99 {ms(percentile(every, 99))} / max {ms(every[-1] if every else None)} ms"
    )
    if failed:
        print(f"VIOLATION in {len(failed)} of {len(rounds)} rounds")
        return 1
    if status:
        return status
    if not rounds:
        print("no round ran")
        return 2
    print(f"OK: every round accepted exactly {args.bulk_recipients}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.stress", description=__doc__)
    p.add_argument("--rounds", type=int, default=10, help="rounds at most (default 10)")
    p.add_argument(
        "--time-limit", type=float, default=300.0, help="seconds; no round starts after it"
    )
    p.add_argument("--recipients", type=int, default=50, help="copies = connections (default 50)")
    p.add_argument(
        "--bulk-recipients",
        type=int,
        default=20,
        help="the gates' bulk_recipients (default 20, as by default): accepted per round",
    )
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--io-timeout", type=float, default=60.0, help="seconds per SMTP reply")
    p.add_argument("--keep-workdir", action="store_true", help="keep configs, logs and state")
    args = p.parse_args(argv)
    if not 1 <= args.rounds <= 1000:
        p.error("--rounds must be 1..1000")
    if args.recipients <= args.bulk_recipients:
        p.error("--recipients must exceed --bulk-recipients, or nothing is refused")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_uvloop()
    return run_interruptibly(amain(args))


if __name__ == "__main__":
    sys.exit(main())
