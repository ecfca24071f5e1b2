"""The store interface: every piece of shared state mailguard keeps, as one typed protocol.

Responsible for: the contract between the doors (gate, milter, CLI) and state.  Times are Unix
seconds (float) passed in by the caller's clock; implementations never read a clock for
decisions.  Every operation that reads then writes is atomic.
Must never: decide policy.
"""

from __future__ import annotations

from typing import Protocol


class StoreError(Exception):
    """The store failed or timed out; callers turn this into the configured degraded reply."""


class Store(Protocol):
    """Shared state behind the policy.  All methods raise ``StoreError`` on any failure."""

    async def ping(self) -> None:
        """Check that the store answers."""

    async def note_auth_failure(self, client: str, now: float, window: float) -> int:
        """Record one failed SMTP AUTH from ``client`` (an IP address string) at ``now``.

        Returns the number of failures from ``client`` within ``(now - window, now]``, this one
        included.  Atomic: concurrent callers each see a distinct count.
        """

    async def auth_failures(self, client: str, now: float, window: float) -> int:
        """Failures from ``client`` within ``(now - window, now]`` (read only)."""

    async def close(self) -> None:
        """Release connections (and stop an embedded server this store owns)."""
