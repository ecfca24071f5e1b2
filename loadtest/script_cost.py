"""Redis's own cost of the AUP rules' store scripts per message: the steady figure of the store.

``python -m loadtest.script_cost`` starts a redis-server of its own (a unix socket in a temporary
directory; ``--aof``: with the embedded store's persistence, ``appendonly yes`` and ``appendfsync
everysec``) and, through mailguard's own store code (``CampaignDecider.assign_and_reserve``, then
``CampaignCounter.settle`` with commit: what the gate runs at end of DATA), stores ``--messages``
copies of one campaign of customer ``load`` to ``--rcpts`` recipients, one message at a time, the
clock advancing ``--step`` seconds per message.  The thresholds are raised as in ``loadtest.run``
(nothing is refused; every rule runs).  ``--recipient-pool P``: message n goes to the next
``--rcpts`` of P recipients, as ``loadtest.run``'s option.

The server logs every command of 5 us or more (the slow log), so per script it prints
the calls and the median and mean microseconds per call as Redis itself measures them: the
script's Lua and the commands it calls, not the socket I/O, the event loop or the AOF write
(those are in the server's CPU per message, also printed, which moves with the machine).  Per
message it prints the commands the scripts called (``INFO commandstats``: calls and
microseconds).  The first ``--warmup`` messages are not counted (``SLOWLOG RESET`` and ``CONFIG
RESETSTAT`` after them).  Unlike ``loadtest.instructions`` (the gate process only) this is the
store's side: on a machine where Redis shares the CPUs with the gates, every microsecond here is
taken from them.  Needs redis-server; exits 2 if it cannot be started.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from loadtest.client import MessageFactory
from loadtest.stress import SharedRedis
from loadtest.targets import TargetStartError
from mailguard.core.fingerprint import fingerprint
from mailguard.gate.session import unstuff
from mailguard.store.clustering import ClusterStore
from mailguard.store.counting import CampaignCounter, CampaignDecider, CountingParams, decide_script
from mailguard.store.redis_store import RedisStore, lua_script

CUSTOMER = "load"
# Redis 7 logs the commands a script calls too: only those of at least this many microseconds
# are kept (every script call takes longer; the calls counted are checked below).
SLOWLOG_FROM_US = 5
SLOWLOG_LEN = 1_000_000
# What the commandstats count besides the scripts' commands: the calls themselves, this
# tool's own requests, and the store's connection handshake.
_NOT_FROM_SCRIPTS = frozenset(
    {"evalsha", "config|resetstat", "slowlog|reset", "slowlog|get", "info", "client|setname"}
)
PARAMS = CountingParams(bulk_recipients=1_000_000, mailbomb_messages=1_000_000)


def sha(source: str) -> str:
    return hashlib.sha1(source.encode("utf-8")).hexdigest()


async def store_messages(
    url: str, factory: MessageFactory, first: int, count: int, start: float, step: float
) -> None:
    """Decide and commit messages ``first`` .. ``first + count - 1`` of ``factory``."""
    store = RedisStore(url)
    try:
        clusters = ClusterStore(store, max(PARAMS.bulk_window, PARAMS.mailbomb_window))
        counter = CampaignCounter(store)
        decider = CampaignDecider(clusters, counter)
        for n in range(first, first + count):
            message = factory.make(n)
            recipients = message.rcpts
            now = start + n * step
            fp = fingerprint(unstuff(message.data)[0], recipients)  # as the gate does
            _, result = await decider.assign_and_reserve(
                CUSTOMER, fp, recipients, now, params=PARAMS, reservation_id=f"m{n}"
            )
            if result.reservation is None:
                raise RuntimeError(f"message {n} was not reserved: {result}")
            await counter.settle(result.reservation, commit=True, now=now + step / 2)
    finally:
        await store.close()


def cpu_seconds(info: dict[str, Any]) -> float:
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(args: argparse.Namespace, directory: Path) -> int:
    server = SharedRedis(
        directory,
        aof=args.aof,
        options=(
            "--slowlog-log-slower-than", str(SLOWLOG_FROM_US),
            "--slowlog-max-len", str(SLOWLOG_LEN),
        ),
    )  # fmt: skip
    try:
        await server.start()
    except TargetStartError as exc:
        print(f"script_cost: {exc}", file=sys.stderr)
        return 2
    admin = Redis(unix_socket_path=str(server.socket))
    try:
        factory = MessageFactory(
            size=args.size, rcpts=args.rcpts, prefix="cost", recipient_pool=args.recipient_pool
        )
        start = time.time()
        await store_messages(server.url, factory, 0, args.warmup, start, args.step)
        await admin.slowlog_reset()
        await admin.config_resetstat()
        cpu_before = cpu_seconds(await admin.info("cpu"))
        await store_messages(server.url, factory, args.warmup, args.messages, start, args.step)
        cpu_after = cpu_seconds(await admin.info("cpu"))
        entries = await admin.slowlog_get(SLOWLOG_LEN)
        stats = await admin.info("commandstats")
    finally:
        await admin.aclose()
        await server.stop()
    names = {sha(decide_script()): "decide", sha(lua_script("campaign_settle")): "settle"}
    durations: dict[str, list[int]] = {name: [] for name in names.values()}
    for entry in entries:
        words = entry["command"].split(b" ")
        if words[0].upper() == b"EVALSHA" and len(words) > 1:
            name = names.get(words[1].decode("ascii", "replace"))
            if name is not None:
                durations[name].append(int(entry["duration"]))
    n = args.messages
    short = [name for name, values in durations.items() if len(values) != n]
    if short:
        print(f"script_cost: the slow log lost calls of {', '.join(short)}", file=sys.stderr)
        return 1
    print(
        f"{n} messages of {args.size} bytes to {args.rcpts} recipient(s)"
        f"{f' of a pool of {args.recipient_pool}' if args.recipient_pool else ''}, "
        f"AOF {'on' if args.aof else 'off'}; microseconds as Redis measures them"
    )
    print()
    print("| script | calls | median us | mean us |")
    print("|---|---:|---:|---:|")
    total = 0.0
    for name, values in durations.items():
        total += sum(values) / n
        print(f"| {name} | {len(values)} | {statistics.median(values):.0f} "
              f"| {statistics.mean(values):.1f} |")  # fmt: skip
    print()
    print(f"scripts per message: {total:.1f} us; redis-server CPU per message (user+sys, "
          f"with the socket I/O{' and the AOF' if args.aof else ''}): "
          f"{(cpu_after - cpu_before) / n * 1e6:.1f} us")  # fmt: skip
    print()
    print("| command called by the scripts | calls per message | us per message |")
    print("|---|---:|---:|")
    rows = [
        (name, value)
        for name, value in ((key.removeprefix("cmdstat_"), v) for key, v in stats.items())
        if name not in _NOT_FROM_SCRIPTS
    ]
    rows.sort(key=lambda item: -float(item[1]["usec"]))
    for name, value in rows:
        print(f"| {name} | {int(value['calls']) / n:.2f} | {float(value['usec']) / n:.2f} |")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.script_cost", description=__doc__)
    p.add_argument("--messages", type=int, default=3000, help="messages measured")
    p.add_argument("--warmup", type=int, default=200, help="messages before the measurement")
    p.add_argument("--size", type=int, default=2048, help="message size in bytes (about)")
    p.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    p.add_argument("--recipient-pool", type=int, default=0, help="as loadtest.run's option")
    p.add_argument("--step", type=float, default=0.01, help="seconds of the clock per message")
    p.add_argument("--aof", action="store_true", help="appendonly yes, appendfsync everysec")
    args = p.parse_args(argv)
    if args.messages < 1 or args.warmup < 0 or args.rcpts < 1 or not args.step > 0:
        p.error("--messages and --rcpts must be >= 1, --warmup >= 0, --step > 0")
    if args.recipient_pool and args.recipient_pool < args.rcpts:
        p.error(f"--recipient-pool must be 0 or at least {args.rcpts} (--rcpts)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mailguard-script-cost-") as name:
        return asyncio.run(measure(args, Path(name)))


if __name__ == "__main__":
    sys.exit(main())
