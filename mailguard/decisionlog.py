"""The decision log: one JSON line per SMTP transaction, for admins and their tools.

Responsible for: the line's format and writing it (one ``write(2)`` per line on a file opened
for appending, unbuffered, so lines from concurrent transactions, threads and gate worker
processes sharing the file never interleave).  Fields: ``ts`` (ISO 8601 UTC), ``tx``,
``client``, ``customer``, ``auth``, ``helo``, ``mail_from``, ``rcpts`` (each with its reply
code), ``size`` (the message's octets as the door received it, without dot-stuffing, RFC 1870),
``campaign``, ``decision`` (accept / reject / defer / aborted), ``rule``, ``numbers``,
``reply`` (the last reply the client got: the upstream's own, mirrored, unless ``rule`` names a
mailguard refusal; for an abandoned transaction, rule ``abandoned``, the event that ended it),
``policy`` (what the rules found, also in monitor mode), ``ms`` (timings in milliseconds: total,
policy, upstream).
``decision_record`` builds the line's fields for every door (gate and milter), so both log the
same line for the same input, except where a door cannot know what the other does: ``ts``,
``tx`` and ``ms`` always differ; an accepted message's ``reply`` is the upstream's own at the
gate and ``250 2.0.0 Ok`` at the milter (which never sees the MTA's final reply); and the
abandoned transaction's event (the gate sees ``RSET``, ``QUIT``; libmilter only ``abort``).
A transaction that ends with no recipient accepted after the policy deferred one at RCPT (a
mail-bomb hold, ``mailguard.core.rules.campaign``) is logged with that deferral (``decision``
``defer``, its ``rule``, ``numbers`` and ``reply``), not as abandoned (``ended_at_rcpt``); each
recipient's entry in ``rcpts`` carries its reply code and, when the policy deferred it, the
finding (``policy``: found, rule, numbers).
Must never: decide anything or raise into the SMTP session (a failing log is reported once on
the operational log).
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from mailguard.core.verdict import Accept

if TYPE_CHECKING:
    from mailguard.core.policy import Decision

log = logging.getLogger("mailguard")

ABANDONED = "abandoned"  # the rule of a transaction that ended before its message was decided


def ended_at_rcpt(
    event: str, accepted: bool, rcpt_decision: Decision | None
) -> tuple[str, str, str, Decision | None]:
    """(decision, rule, reply, policy decision) for the line of a transaction that ended before
    its message was decided (``event``: what ended it): the RCPT-time policy refusal when it left
    no recipient accepted, otherwise an abandoned transaction."""
    if not accepted and rcpt_decision is not None and rcpt_decision.refused:
        verdict = rcpt_decision.verdict
        reply = verdict.reply() if not isinstance(verdict, Accept) else event
        return verdict.action, verdict.rule or ABANDONED, reply, rcpt_decision
    return "aborted", ABANDONED, event, None


def rcpt_finding(decision: Decision) -> dict[str, Any]:
    """A recipient's ``policy`` entry in ``rcpts``: what the policy found at RCPT."""
    found = decision.found
    return {"found": found.action, "rule": found.rule, "numbers": dict(found.numbers)}


class DecisionLog:
    """Appends decision lines to a file, or to standard output for ``"-"``."""

    def __init__(self, target: str) -> None:
        self.target = target
        # O_APPEND and no buffer: each line is one write at the end of the file, also when
        # several gate worker processes append to it.
        self._stream: IO[bytes] = (
            sys.stdout.buffer if target == "-" else open(target, "ab", buffering=0)  # noqa: SIM115
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
                self._stream.write(line.encode("ascii") + b"\n")
                self._stream.flush()
            self._failed = False
        except (OSError, ValueError) as exc:
            if not self._failed:
                self._failed = True
                log.error("decision log %s cannot be written: %s", self.target, exc)

    def close(self) -> None:
        if self.target != "-":
            self._stream.close()


def decision_record(
    *,
    tx: str,
    client: str,
    customer: str | None,
    auth: str | None,
    helo: str | None,
    mail_from: str,
    rcpts: Sequence[dict[str, Any]],
    rcpts_unlogged: int = 0,
    size: int | None,
    campaign: str | None,
    action: str,
    rule: str | None,
    reply: str,
    decision: Decision | None,
    total_ms: float,
    policy_ms: float,
    upstream_ms: float = 0.0,
) -> dict[str, Any]:
    """The record for ``DecisionLog.write`` (which adds ``ts``)."""
    record: dict[str, Any] = {
        "tx": tx,
        "client": client,
        "customer": customer,
        "auth": auth,
        "helo": helo,
        "mail_from": mail_from,
        "rcpts": list(rcpts),
        **({"rcpts_unlogged": rcpts_unlogged} if rcpts_unlogged else {}),
        "size": size,
        **({"campaign": campaign} if campaign else {}),
        "decision": action,
        "rule": rule,
        "reply": reply.split("\r\n")[-1][:300],
    }
    if decision is not None:
        found = decision.found
        record["policy"] = {
            "mode": decision.mode,
            "found": found.action,
            "rule": found.rule,
            "numbers": dict(found.numbers),
        }
        if decision.refused:
            record["rule"] = found.rule
            record["numbers"] = dict(found.numbers)
    record["ms"] = {
        "total": round(total_ms, 2),
        "policy": round(policy_ms, 2),
        "upstream": round(upstream_ms, 2),
    }
    return record
