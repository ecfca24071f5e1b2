"""The bridge from libmilter's threads to the one event loop: results, errors, bounded waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from mailguard.milter.loop import LoopThread


@pytest.fixture
def bridge() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.stop()


async def _answer(value: int) -> tuple[int, int]:
    await asyncio.sleep(0)
    return value, threading.get_ident()


async def _fail() -> None:
    raise ValueError("store said no")


def test_many_threads_share_one_loop(bridge: LoopThread) -> None:
    results: list[tuple[int, int]] = []

    def worker(i: int) -> None:
        results.append(bridge.call(_answer(i), 5))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(v for v, _ in results) == list(range(20))
    assert len({ident for _, ident in results}) == 1  # all ran on the loop's one thread


def test_errors_reach_the_caller(bridge: LoopThread) -> None:
    with pytest.raises(ValueError, match="store said no"):
        bridge.call(_fail(), 5)


def test_a_slow_call_times_out_and_is_cancelled(bridge: LoopThread) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    start = time.monotonic()
    with pytest.raises(TimeoutError):
        bridge.call(slow(), 0.1)
    assert time.monotonic() - start < 1
    assert cancelled.wait(2)
    assert bridge.call(_answer(7), 5)[0] == 7  # the loop is still serving
