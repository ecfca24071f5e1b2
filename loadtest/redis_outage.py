"""Redis killed during a milter load run (issue 5): tempfails, never an uncounted accept, and
recovery without restarting the milter.

``python -m loadtest.redis_outage`` starts this package's sink, a redis-server of its own (unix
socket, ``appendonly yes`` with ``appendfsync always``, so a SIGKILL loses nothing it confirmed),
and the ``postfix-milter`` target (a private Postfix asking ``mailguard milter``, relaying to the
sink) with its store on that redis-server.  ``--concurrency`` clients send messages for
``--duration`` seconds; at ``--kill-at`` the redis-server gets SIGKILL, at ``--restart-at`` it
is started again on the same files.  Then, once Postfix has delivered what it accepted:

- every message the clients saw accepted (250 after DATA) reached the sink exactly once;
- the milter counted at least as many copies as were accepted (the campaign's committed sends
  to the load's recipient, read from Redis): an accepted message is never uncounted; more
  counted than accepted can only be a commit whose reply was lost in the kill (reported);
- transactions that ran entirely while Redis was down were all tempfailed (4xx); those that
  a kill or restart cut across may go either way (reported);
- after the restart messages were accepted again by the same milter process (no restart).

Exit status 0 when all hold, 1 otherwise.  Loopback only; bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.client import MessageFactory, SMTPClient, SMTPClientError
from loadtest.milter_target import PostfixTarget
from loadtest.run import run_interruptibly, settle
from loadtest.sink import Sink, install_uvloop
from mailguard.store.counting import CampaignKeys, recipient_key
from mailguard.store.redis_store import RedisStore

CUSTOMER = "load"  # the customer of loadtest.targets.gate_config


@dataclass
class Outcome:
    ident: str
    phase: str  # "before", "outage", "after": while it ran; "across": a kill or restart in it
    outcome: str  # accepted, tempfail, refused, error
    reply: str


@dataclass
class Tally:
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, phase: str | None = None) -> Counter[str]:
        return Counter(o.outcome for o in self.outcomes if phase in (None, o.phase))


class RedisProcess:
    """A redis-server on a unix socket that can be killed and started again on its files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [binary, "--port", "0", "--unixsocket", str(self.socket), "--dir",
             str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", ""],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not self.socket.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        with contextlib.suppress(FileNotFoundError):
            self.socket.unlink()


async def client_loop(
    n: int,
    args: argparse.Namespace,
    target: PostfixTarget,
    factory: MessageFactory,
    seq: list[int],
    phase: list[str],
    tally: Tally,
    stop: asyncio.Event,
) -> None:
    client: SMTPClient | None = None
    while not stop.is_set():
        if client is None:
            try:
                client = await SMTPClient.connect(target.host, target.port, timeout=30)
            except SMTPClientError:
                await asyncio.sleep(0.1)
                continue
        seq[0] += 1
        msg = factory.make(seq[0])
        started_in = phase[0]
        result = await client.send(msg, pipelining=client.pipelining)
        if started_in != phase[0]:
            started_in = "across"  # Redis was killed or restarted while it was under way
        outcome = result.outcome
        if outcome == "refused" and result.reply[:1] == "4":
            outcome = "tempfail"
        tally.outcomes.append(Outcome(msg.ident, started_in, outcome, result.reply))
        if result.drop_connection:
            client.close()
            client = None
    if client is not None:
        with contextlib.suppress(SMTPClientError, OSError):
            await client.quit()
        client.close()


async def counted(redis_url: str, decisions: Path, rcpt: str) -> tuple[int, set[str]]:
    """Committed sends to ``rcpt`` in the campaigns the milter logged, read from Redis."""
    campaigns = {
        json.loads(line).get("campaign", "")
        for line in decisions.read_text().splitlines()
        if line.strip()
    } - {""}
    store = RedisStore(redis_url, timeout=5.0)
    try:
        total = 0
        for campaign in campaigns:
            log = CampaignKeys.of(store, CUSTOMER, campaign).mailbomb_prefix + recipient_key(rcpt)
            total += int(await store.command("count", "ZCARD", log))
    finally:
        await store.close()
    return total, campaigns


async def amain(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="mailguard-redis-outage-"))
    sink = Sink()
    redis = RedisProcess(workdir)
    target: PostfixTarget | None = None
    tally = Tally()
    problems: list[str] = []
    try:
        host, port = await sink.start("127.0.0.1", 0)
        redis.start()
        target = PostfixTarget(
            "postfix-milter",
            mode="milter",
            upstream=(host, port),
            python=sys.executable,
            workdir=workdir / "target",
            store_url=redis.url,
        )
        await target.start(60)
        milter_pid = target.pid
        factory = MessageFactory(args.size, 1, prefix=f"outage-{int(time.time())}")
        rcpt = factory.recipients(0)[0]
        seq, phase, stop = [0], ["before"], asyncio.Event()
        workers = [
            asyncio.create_task(client_loop(i, args, target, factory, seq, phase, tally, stop))
            for i in range(args.concurrency)
        ]
        t0 = time.monotonic()
        await asyncio.sleep(args.kill_at)
        redis.kill()
        phase[0] = "outage"
        print(f"{time.monotonic() - t0:5.1f}s redis-server killed (SIGKILL)", flush=True)
        await asyncio.sleep(args.restart_at - args.kill_at)
        redis.start()
        phase[0] = "after"
        print(f"{time.monotonic() - t0:5.1f}s redis-server started again", flush=True)
        await asyncio.sleep(max(args.duration - args.restart_at, 0))
        stop.set()
        await asyncio.gather(*workers)
        accepted = [o for o in tally.outcomes if o.outcome == "accepted"]
        await settle(sink, limit=120, expected=len(accepted))
        if target.pid != milter_pid or (target.proc and target.proc.poll() is not None):
            problems.append("the milter process did not survive the outage")
        decisions = workdir / "target" / "decisions.log"
        n_counted, campaigns = await counted(redis.url, decisions, rcpt)
    finally:
        if target is not None:
            await target.stop()
        redis.kill()
        await sink.close()

    for phase_name in ("before", "across", "outage", "after"):
        c = tally.count(phase_name)
        print(f"{phase_name:>7}: " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
    accepted_ids = [o.ident for o in tally.outcomes if o.outcome == "accepted"]
    received = sink.stats.by_id
    lost = [i for i in accepted_ids if len(received.get(i, [])) != 1]
    strays = [i for i in received if i not in set(accepted_ids)]
    print(f"accepted {len(accepted_ids)}, delivered to the sink {sink.stats.messages}, "
          f"counted in Redis {n_counted} (campaigns {len(campaigns)})")  # fmt: skip
    if lost:
        problems.append(f"{len(lost)} accepted messages not delivered exactly once, e.g. {lost[0]}")
    if strays:
        problems.append(f"{len(strays)} delivered messages the clients did not see accepted")
    if n_counted < len(accepted_ids):
        problems.append(f"only {n_counted} counted for {len(accepted_ids)} accepted")
    elif n_counted > len(accepted_ids):
        print(f"note: {n_counted - len(accepted_ids)} counted but not accepted "
              "(a commit whose reply the kill cut off; the safe direction)")  # fmt: skip
    outage = tally.count("outage")
    if not outage.get("tempfail"):
        problems.append("no tempfail while Redis was down")
    bad = [o for o in tally.outcomes if o.phase == "outage" and o.outcome != "tempfail"]
    if bad:
        problems.append(f"{len(bad)} answers other than 4xx while Redis was down: {bad[0].reply}")
    for phase_name in ("before", "across", "outage", "after"):
        replies = Counter(
            o.reply[:70]
            for o in tally.outcomes
            if o.phase == phase_name and o.outcome != "accepted"
        )
        if replies:
            print(f"{phase_name} replies other than 250: "
                  + "; ".join(f"{n}x {r}" for r, n in replies.most_common(3)))  # fmt: skip
    if not tally.count("after").get("accepted"):
        problems.append("nothing accepted after Redis came back")
    for p in problems:
        print(f"FAIL: {p}")
    print("OK" if not problems else "FAILED")
    if not args.keep_workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.redis_outage", description=__doc__)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--size", type=int, default=2048, help="message size in bytes")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load in all")
    p.add_argument("--kill-at", type=float, default=6.0)
    p.add_argument("--restart-at", type=float, default=12.0)
    p.add_argument("--keep-workdir", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.kill_at < args.restart_at <= args.duration:
        p.error("need 0 < --kill-at < --restart-at <= --duration")
    install_uvloop()
    return run_interruptibly(amain(args))


if __name__ == "__main__":
    raise SystemExit(main())
