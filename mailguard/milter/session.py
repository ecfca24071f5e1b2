"""One MTA connection to the milter: pymilter callbacks turned into the gate's transaction facts.

Responsible for: identifying the client (connect address, or the ``{auth_authen}`` macro at
MAIL), refusing every recipient of a non-customer with 554 5.7.1 like the gate, deferring a
recipient under a mail-bomb hold with the gate's 450 4.7.1 reply (``setreply``), collecting the
envelope and the message (headers and body reassembled to RFC 5322 bytes with CRLF), answering
at end of message with the verdict's exact codes and text (``setreply``), adding the
``X-Mailguard`` trace header on accept, and writing one decision-log line per transaction.
Must never: decide policy itself, touch the store (``MilterRuntime`` does), or let an exception
escape into libmilter (it becomes the configured tempfail).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import Milter  # type: ignore[import-untyped]

from mailguard.config.schema import Customer
from mailguard.core.policy import Decision
from mailguard.core.verdict import Defer, Reject
from mailguard.decisionlog import decision_record, ended_at_rcpt, rcpt_finding
from mailguard.milter.runtime import MilterRuntime
from mailguard.trace import TRACE_HEADER, trace_value

log = logging.getLogger("mailguard.milter")

_MAX_LOGGED_RCPTS = 2000


@dataclass(slots=True)
class Transaction:
    """State of one MAIL ... end-of-message transaction."""

    id: str
    mail_from: str
    started: float
    accepted: list[str] = field(default_factory=list)
    rcpts: list[dict[str, Any]] = field(default_factory=list)
    rcpts_unlogged: int = 0
    parts: list[bytes] = field(default_factory=list)
    rcpt_decision: Decision | None = None  # the last RCPT the policy deferred (a mail-bomb hold)


def _address(arg: str) -> str:
    """An envelope argument as libmilter passes it (``<a@b>``) to the bare address."""
    arg = arg.strip()
    if arg.startswith("<") and arg.endswith(">"):
        arg = arg[1:-1]
    return arg


def _crlf(data: bytes) -> bytes:
    """Line ends as CRLF whatever the MTA passed (folded header values come with bare LF)."""
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


class MailguardMilter(Milter.Base):  # type: ignore[misc]
    """The milter for one MTA connection; libmilter calls it from one thread at a time."""

    def __init__(self, runtime: MilterRuntime) -> None:
        self.runtime = runtime
        self.client_ip = ""
        self.helo: str | None = None
        self.auth_user: str | None = None
        self.customer: Customer | None = None
        self.tx: Transaction | None = None

    # -- connection ----------------------------------------------------------------------------

    # Every callback answers (no ``Milter.noreply``): over TCP, an MTA that writes several
    # commands without waiting for answers stalls 40 ms per transaction on Nagle's algorithm
    # against the milter's delayed ACK (measured: 49 ms per transaction, 3 ms with answers).
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        if isinstance(hostaddr, tuple) and hostaddr:
            self.client_ip = str(hostaddr[0])
        self.customer = self.runtime.customer_of(self.client_ip, None)
        return int(Milter.CONTINUE)

    def hello(self, heloname: str) -> int:
        self.helo = heloname
        return int(Milter.CONTINUE)

    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._abort("MAIL")  # a transaction libmilter did not end (should not happen)
        auth = self.getsymval("{auth_authen}")
        self.auth_user = str(auth) if auth else None
        self.customer = self.runtime.customer_of(self.client_ip, self.auth_user)
        self.tx = Transaction(secrets.token_hex(6), _address(mailfrom), time.perf_counter())
        return int(Milter.CONTINUE)

    def envrcpt(self, to: str, *params: str) -> int:
        tx = self.tx
        if tx is None:
            return int(Milter.CONTINUE)
        address = _address(to)
        entry: dict[str, Any] = {"rcpt": address, "reply": "250"}
        held = None
        if self.customer is None:
            entry["reply"] = "554"
        else:
            held = self.runtime.rcpt_hold(self.customer, tx.id, tx.mail_from, address)
        verdict = held.verdict if held is not None else None
        if held is not None and isinstance(verdict, Defer):
            entry["reply"] = str(verdict.code)
            entry["policy"] = rcpt_finding(held)
        if len(tx.rcpts) < _MAX_LOGGED_RCPTS:
            tx.rcpts.append(entry)
        else:
            tx.rcpts_unlogged += 1
        if self.customer is None:
            # Not a customer: nothing is relayed (as the gate and Postfix answer).
            self.setreply("554", "5.7.1", f"<{address}>: Relay access denied")
            return int(Milter.REJECT)
        if held is not None and isinstance(verdict, Defer):
            # A mail-bomb hold: the same 450 4.7.1 and text as the gate's RCPT reply.
            tx.rcpt_decision = held
            self.setreply(str(verdict.code), verdict.enhanced, verdict.text)
            return int(Milter.TEMPFAIL)
        tx.accepted.append(address)
        return int(Milter.CONTINUE)

    # -- message -------------------------------------------------------------------------------

    def data(self) -> int:
        """Nothing to do at DATA, but answering it (libmilter only asks when the milter has
        the callback) sends the ACK for the MTA's DATA-stage macros at once: see above."""
        return int(Milter.CONTINUE)

    @Milter.decode("bytes")  # type: ignore[untyped-decorator]
    def header(self, name: str | bytes, value: bytes | str) -> int:
        if self.tx is not None:
            raw_name = name if isinstance(name, bytes) else name.encode("utf-8", "surrogateescape")
            raw = value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")
            self.tx.parts.append(raw_name + b": " + _crlf(raw) + b"\r\n")
        return int(Milter.CONTINUE)

    def eoh(self) -> int:
        if self.tx is not None:
            self.tx.parts.append(b"\r\n")
        return int(Milter.CONTINUE)

    def body(self, chunk: bytes) -> int:
        if self.tx is not None:
            self.tx.parts.append(chunk)
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        tx, self.tx = self.tx, None
        if tx is None:
            return int(Milter.CONTINUE)
        try:
            return self._end_of_message(tx)
        except Exception:  # a bug: never let libmilter's default answer reach the client
            log.exception("tx=%s client=%s internal error", tx.id, self.client_ip)
            reply = self.runtime.config.policy.store_failure_reply
            self.setreply(str(reply.code), reply.enhanced, reply.text)
            self._log(tx, "defer", str(reply), rule="internal_error")
            return int(Milter.TEMPFAIL)

    def _end_of_message(self, tx: Transaction) -> int:
        message = _crlf(b"".join(tx.parts))
        tx.parts = []
        size = len(message)
        customer = self.customer
        if customer is None or not tx.accepted:
            return int(Milter.CONTINUE)  # every recipient was refused: the MTA will not send
        outcome = self.runtime.decide(
            customer, self.client_ip, tx.id, tx.mail_from, tx.accepted, message
        )
        decision = outcome.decision
        verdict = decision.verdict
        if isinstance(verdict, Reject | Defer):
            self.setreply(str(verdict.code), verdict.enhanced, verdict.text)
            self._log(
                tx,
                verdict.action,
                verdict.reply(),
                size=size,
                campaign=outcome.campaign,
                decision=decision,
                policy_ms=outcome.policy_ms,
            )
            return int(Milter.REJECT if isinstance(verdict, Reject) else Milter.TEMPFAIL)
        try:
            self.addheader(TRACE_HEADER, trace_value(tx.id, outcome.campaign))
        except Exception as exc:  # the MTA did not grant ADDHDRS: accept without the header
            log.warning("tx=%s could not add %s: %s", tx.id, TRACE_HEADER, exc)
        self._log(
            tx,
            "accept",
            "250 2.0.0 Ok",
            size=size,
            campaign=outcome.campaign,
            decision=decision,
            policy_ms=outcome.policy_ms,
        )
        return int(Milter.ACCEPT)

    # -- transaction end -----------------------------------------------------------------------

    def abort(self) -> int:
        self._abort("abort")
        return int(Milter.CONTINUE)

    def close(self) -> int:
        self._abort("connection closed")
        return int(Milter.CONTINUE)

    def _abort(self, why: str) -> None:
        tx, self.tx = self.tx, None
        if tx is not None:
            action, rule, reply, decision = ended_at_rcpt(why, bool(tx.accepted), tx.rcpt_decision)
            self._log(tx, action, reply, rule=rule, decision=decision)

    def _log(
        self,
        tx: Transaction,
        action: str,
        reply: str,
        *,
        rule: str | None = None,
        size: int | None = None,
        campaign: str | None = None,
        decision: Decision | None = None,
        policy_ms: float = 0.0,
    ) -> None:
        self.runtime.decision_log.write(
            decision_record(
                tx=tx.id,
                client=self.client_ip,
                customer=self.customer.id if self.customer else None,
                auth=self.auth_user,
                helo=self.helo,
                mail_from=tx.mail_from,
                rcpts=tx.rcpts,
                rcpts_unlogged=tx.rcpts_unlogged,
                size=size,
                campaign=campaign,
                action=action,
                rule=rule,
                reply=reply,
                decision=decision,
                total_ms=(time.perf_counter() - tx.started) * 1000,
                policy_ms=policy_ms,
            )
        )
