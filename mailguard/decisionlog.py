"""The decision log: one JSON line per SMTP transaction, for admins and their tools.

Responsible for: the line's format and writing it (one ``write`` per line, flushed, so lines
from concurrent transactions never interleave).  Fields: ``ts`` (ISO 8601 UTC), ``tx``,
``client``, ``customer``, ``auth``, ``helo``, ``mail_from``, ``rcpts`` (each with its reply
code), ``size`` (octets), ``decision`` (accept / reject / defer / aborted), ``rule``,
``numbers``, ``reply`` (the last reply the client got: the upstream's own, mirrored, unless
``rule`` names a mailguard refusal), ``policy`` (what the rules found, also in monitor mode),
``ms`` (timings in milliseconds: total, policy, upstream).
Must never: decide anything or raise into the SMTP session (a failing log is reported once on
the operational log).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from typing import IO, Any

log = logging.getLogger("mailguard")


class DecisionLog:
    """Appends decision lines to a file, or to standard output for ``"-"``."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._stream: IO[str] = (
            sys.stdout if target == "-" else open(target, "a", encoding="utf-8")  # noqa: SIM115
        )
        self._lock = threading.Lock()  # the milter writes from libmilter's threads
        self._failed = False

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(
            {"ts": datetime.now(UTC).isoformat(timespec="milliseconds"), **record},
            ensure_ascii=True,  # client-supplied text may hold lone surrogates
            separators=(",", ":"),
            default=str,
        )
        try:
            with self._lock:
                self._stream.write(line + "\n")
                self._stream.flush()
            self._failed = False
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                log.error("decision log %s cannot be written: %s", self.target, exc)

    def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()
