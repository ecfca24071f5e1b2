"""The milter door: mailguard's policy behind Postfix or Sendmail through libmilter (pymilter).

Responsible for: turning milter callbacks into the same facts the gate collects and asking the
same AUP core (``mailguard.enforcement.CampaignEnforcer``).  ``run`` is the entry point.
Must never: import the gate (or uvloop), decide policy itself, or block a libmilter thread on
the store beyond the configured timeout.
"""

from __future__ import annotations

__all__ = ["run"]


def run(config_path: str, socket_spec: str | None = None, timeout: float | None = None) -> int:
    """Serve the milter until SIGTERM/SIGINT (see ``mailguard.milter.server.run``)."""
    from mailguard.milter.server import run as _run

    return _run(config_path, socket_spec, timeout)
