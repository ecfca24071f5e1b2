"""Operational logging: one JSON object per line on standard error.

Responsible for: the format of operational log lines (time, level, logger, message, and the
transaction id when a line concerns one).  Decision lines are ``mailguard.decisionlog``'s job.
Must never: be configured twice in one process or log message contents or passwords.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)  # ASCII-escaped: client text may hold lone surrogates


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosmtpd logs every command at INFO; mailguard's decision log covers transactions.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, logging.getLevelName(level)))
