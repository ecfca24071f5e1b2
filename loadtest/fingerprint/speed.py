"""Throughput of fingerprint + cluster assignment on ~10 KB multipart messages, on one core.

The process is pinned to one CPU (when the OS allows it) while measuring.  The set is built
first (not timed); then a short warm-up, then ``repeats`` timed passes over the whole set, each
with a fresh cluster index (fewer passes if they take more than ``budget_s`` in all).
Reported: messages/s of the best pass (least disturbed by other work on a shared machine) and
the median pass.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

from loadtest.fingerprint.corpus import Labelled
from loadtest.fingerprint.methods import Method


@dataclass(slots=True)
class SpeedResult:
    method: str
    messages: int
    mean_bytes: float
    passes: list[float]  # messages/s per timed pass
    cpu: str

    @property
    def best(self) -> float:
        return max(self.passes)

    @property
    def median(self) -> float:
        return statistics.median(self.passes)

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "messages": self.messages,
            "mean_bytes": self.mean_bytes,
            "passes_msgs_per_s": self.passes,
            "best_msgs_per_s": self.best,
            "median_msgs_per_s": self.median,
            "cpu": self.cpu,
        }


@contextlib.contextmanager
def one_core() -> Iterator[str]:
    """Pin this process to the CPU it is running on; yields a description."""
    if not hasattr(os, "sched_setaffinity"):
        yield "not pinned (no sched_setaffinity)"
        return
    before = os.sched_getaffinity(0)
    cpu = min(before)
    try:
        with open("/proc/self/stat") as fh:  # field 39: the CPU last run on
            cur = int(fh.read().rsplit(")", 1)[1].split()[36])
        if cur in before:
            cpu = cur
    except (OSError, ValueError, IndexError):
        pass
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as exc:
        yield f"not pinned ({exc})"
        return
    try:
        yield f"pinned to CPU {cpu}"
    finally:
        os.sched_setaffinity(0, before)


def measure(
    method: Method, msgs: list[Labelled], repeats: int = 3, budget_s: float = 45.0
) -> SpeedResult:
    """Time method.assign over msgs (mailguard gets raw bytes; text baselines get the text)."""
    from loadtest.fingerprint.decode import visible_text

    texts = [""] * len(msgs)
    passes: list[float] = []
    started = time.perf_counter()
    with one_core() as cpu:
        method.reset()
        for m in msgs[: min(200, len(msgs))]:  # warm-up (imports, caches)
            method.assign(m, visible_text(m.raw) if method.uses_text else "")
        for _ in range(repeats):
            method.reset()
            assign = method.assign
            t0 = time.perf_counter()
            if method.uses_text:
                for m in msgs:
                    assign(m, visible_text(m.raw))
            else:
                for m, t in zip(msgs, texts, strict=True):
                    assign(m, t)
            passes.append(len(msgs) / (time.perf_counter() - t0))
            if time.perf_counter() - started > budget_s:  # slow method: keep the run bounded
                break
    mean = sum(len(m.raw) for m in msgs) / len(msgs) if msgs else 0.0
    return SpeedResult(method.name, len(msgs), mean, passes, cpu)
