"""One client connection to the gate: aiosmtpd's protocol engine with mailguard's transaction logic.

Responsible for: identifying the client (TCP peer or SMTP AUTH), refusing relay to anyone who is
not a customer (554 5.7.1), mirroring each transaction to the upstream before answering (MAIL
and every RCPT are relayed first; DATA is answered with the upstream's reply only after the
policy accepted the whole message), reading DATA in large chunks instead of aiosmtpd's
line-by-line loop, and refusing input that could smuggle a message boundary or command past the
gate (bare CR, bare LF, NUL) as Postfix's ``smtpd_forbid_bare_newline`` does.
Must never: answer 250 to DATA before the upstream has, honour XCLIENT/XFORWARD, let a
library's ``500 Error: (Exception) ...`` reach a client, or import uvloop (server.py does).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from mailguard.config.schema import Customer
from mailguard.core.addresses import AddressError, EnvelopeArg, parse_envelope_arg
from mailguard.core.policy import Decision, MessageFacts, RcptFacts, SessionFacts
from mailguard.core.verdict import Accept, Verdict
from mailguard.decisionlog import decision_record, ended_at_rcpt, rcpt_finding
from mailguard.gate.upstream import UpstreamConnection, UpstreamError, UpstreamReply
from mailguard.store.counting import Reservation
from mailguard.trace import TRACE_HEADER, trace_value

if TYPE_CHECKING:
    from mailguard.gate.runtime import GateRuntime

log = logging.getLogger("mailguard.gate")

_READ_CHUNK = 1 << 16
_MAX_LOGGED_RCPTS = 2000
_END_OF_DATA = b"\r\n.\r\n"

# Enhanced status codes (RFC 3463) for replies aiosmtpd builds without one.
_DEFAULT_ENHANCED = {
    "221": "2.0.0", "235": "2.7.0", "250": "2.0.0", "251": "2.1.5", "252": "2.0.0",
    "421": "4.3.0", "450": "4.0.0", "451": "4.3.0", "452": "4.3.1", "454": "4.7.0",
    "500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
    "530": "5.7.0", "535": "5.7.8", "538": "5.7.11", "550": "5.0.0", "552": "5.3.4",
    "553": "5.1.3", "554": "5.0.0", "555": "5.5.4",
}  # fmt: skip
# Replies after which the client may legitimately wait before sending more: never held back.
_NEVER_HELD = frozenset({"220", "221", "235", "334", "354", "421", "521"})
# Local refusals that probing for a relay produces; counted with protocol errors (M6).
_PROBE_REFUSALS = ("554 5.7.1", "553 5.7.1")
_PROTOCOL_ERRORS = frozenset({"500", "501", "502", "503", "504", "555"})
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


class BareNewline(Exception):
    """A command line ended with a bare LF or held a bare CR or NUL."""


class LineTooLong(Exception):
    """An AUTH response line longer than the reader's buffer limit."""


class _StrictReader:
    """Wraps aiosmtpd's StreamReader so command lines must end in CRLF and hold no CR or NUL."""

    def __init__(self, inner: asyncio.StreamReader) -> None:
        object.__setattr__(self, "_inner", inner)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        line: bytes = await self._inner.readuntil(separator)
        if separator == b"\n" and (
            not line.endswith(b"\r\n") or line.count(b"\r") != 1 or b"\0" in line
        ):
            raise BareNewline()
        return line

    async def readline(self) -> bytes:
        """Like StreamReader.readline (used by aiosmtpd's AUTH challenges), strictly."""
        try:
            return await self.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            return exc.partial
        except asyncio.LimitOverrunError:
            raise LineTooLong() from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)


class _Hooks:
    """aiosmtpd handler hooks that must reach the session (aiosmtpd passes it as ``server``)."""

    async def handle_PROXY(
        self, server: GateSession, session: Any, envelope: Any, proxy_data: Any
    ) -> bool:
        return server.proxied(proxy_data)


_HOOKS = _Hooks()


def new_transaction_id() -> str:
    return secrets.token_hex(6)


@dataclass(slots=True)
class Transaction:
    """State of one MAIL ... DATA transaction."""

    id: str
    mail_from: EnvelopeArg
    started: float
    upstream: UpstreamConnection | None = None
    upstream_failure: str | None = None  # set once the upstream failed: every later reply
    accepted: list[str] = field(default_factory=list)
    rcpts: list[dict[str, Any]] = field(default_factory=list)
    rcpts_unlogged: int = 0  # RCPTs past _MAX_LOGGED_RCPTS, counted only
    policy_ms: float = 0.0
    upstream_ms: float = 0.0
    campaign: str | None = None  # the message's campaign (cluster) id, once assigned
    reservation: Reservation | None = None  # counted when settled: commit if sent
    rcpt_decision: Decision | None = None  # the last RCPT the policy deferred (a mail-bomb hold)


class GateSession(SMTP):
    """The SMTP protocol for one client connection."""

    # The reader's limit only bounds buffering; command length is checked per command and DATA
    # is read in chunks, so this is not a line-length rule.
    line_length_limit = _READ_CHUNK

    def __init__(self, runtime: GateRuntime) -> None:
        config = runtime.config
        server = config.server
        super().__init__(
            handler=_HOOKS,
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            hostname=server.hostname,
            ident="ESMTP mailguard",
            tls_context=runtime.tls_context,
            timeout=server.command_timeout,
            auth_require_tls=server.auth_require_tls,
            authenticator=self._defer_authentication,
            proxy_protocol_timeout=10.0 if server.proxy_protocol else None,
            loop=asyncio.get_running_loop(),
        )
        self.runtime = runtime
        self.config = config  # the config this connection started with (SIGHUP-safe)
        limit = server.max_command_length
        self.command_size_limit = limit
        self.command_size_limits = collections.defaultdict(lambda: limit)
        self.client_ip = ""
        self.customer: Customer | None = None
        self.auth_user: str | None = None
        self.tx: Transaction | None = None
        self.transactions = 0
        self.auth_failures = 0
        self._held: list[bytes] = []  # replies held back while pipelined commands wait
        self.errors = 0  # protocol errors, as Postfix's smtpd_hard_error_limit counts them
        self._pending_auth: LoginPassword | None = None
        self._upstream_waits = 0
        self._counted = False
        self._busy = False  # inside a transaction's DATA or upstream exchange
        self.closing = False  # draining: close after the current transaction

    # -- connection lifecycle -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:  # first call; a second one follows STARTTLS
            peer = transport.get_extra_info("peername")
            self.client_ip = str(peer[0]) if peer else ""
            refusal = self.runtime.admit(self)
            if refusal is not None:
                log.warning("refused connection from %s: %s", self.client_ip, refusal)
                cast(asyncio.WriteTransport, transport).write(f"{refusal}\r\n".encode())
                transport.close()
                return
            self._counted = True
            self.customer = self.runtime.directory.by_address(self.client_ip)
        super().connection_made(transport)

    def proxied(self, proxy_data: Any) -> bool:
        """Take the client address from a PROXY header (sent by a trusted load balancer, as
        ``admit`` checked); False closes the connection."""
        src = getattr(proxy_data, "src_addr", None)
        if src is None or not proxy_data.valid:
            log.warning("invalid PROXY header from %s", self.client_ip)
            return False
        address = str(getattr(src, "ip", src))
        refusal = self.runtime.readdress(self, address)
        if refusal is not None:
            log.warning("refused proxied client %s: %s", address, refusal)
            self.hang_up(refusal)
            return False
        self.customer = self.runtime.directory.by_address(self.client_ip)
        return True

    def connection_lost(self, error: BaseException | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._abort_transaction("connection lost")
        self.runtime.forget(self)
        super().connection_lost(error)  # type: ignore[arg-type]

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super()._cb_client_connected(reader, writer)
        self._reader = _StrictReader(reader)  # type: ignore[assignment]

    async def push(self, status: str | bytes, *, raw: bool = False) -> None:
        """Send a reply, adding an enhanced status code where aiosmtpd's replies lack one
        (unless ``raw``); close the connection after a 421 or 521.

        While the client has more complete command lines waiting (PIPELINING), replies are
        held and sent together with the reply to the last of them (RFC 2920 3.2): one write
        instead of one per command.
        """
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else status
        if not raw:
            lines = text.split("\r\n")
            for i, line in enumerate(lines):
                code = line[:3]
                if code in _DEFAULT_ENHANCED and not _HAS_ENHANCED.match(line) and len(line) >= 3:
                    sep = line[3:4] or " "
                    lines[i] = f"{code}{sep}{_DEFAULT_ENHANCED[code]} {line[4:]}".rstrip()
            text = "\r\n".join(lines)
        code = text[:3]
        self._held.append(text.encode("utf-8", "surrogateescape") + b"\r\n")
        if code in _PROTOCOL_ERRORS or text.startswith(_PROBE_REFUSALS):
            self.errors += 1
            if self.errors >= self.config.server.max_bad_commands:
                log.warning("client=%s closed after %d errors", self.client_ip, self.errors)
                self.hang_up("421 4.7.0 Too many errors, closing connection")
                return
        if code not in _NEVER_HELD and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return
        out = b"".join(self._held)
        self._held.clear()
        self._writer.write(out)
        await self._writer.drain()
        if code in ("421", "521") and self.transport is not None:
            self.transport.close()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, LineTooLong):
            return "500 5.5.2 Error: line too long"
        if type(error).__name__ == "TLSSetupException":
            log.info("client=%s TLS handshake failed: %r", self.client_ip, error.__cause__)
            return "454 4.7.0 TLS handshake failed"
        if isinstance(error, BareNewline):
            return (
                "521 5.5.2 Error: bare <CR>, <LF> or <NUL> in a command line; "
                "lines must end with <CR><LF>"
            )
        log.exception(
            "tx=%s client=%s internal error", self.tx.id if self.tx else "-", self.client_ip
        )
        return "451 4.3.0 Internal error, please try again later"

    # -- commands ---------------------------------------------------------------------------

    async def smtp_EHLO(self, hostname: str) -> None:
        if not hostname:
            await self.push("501 5.5.4 Syntax: EHLO hostname")
            return
        self._abort_transaction("EHLO")
        assert self.session is not None
        self.session.extended_smtp = True
        self.session.host_name = hostname
        lines = [
            self.hostname,
            "PIPELINING",
            f"SIZE {self.data_size_limit}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
            "SMTPUTF8",
        ]
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("STARTTLS")
        if self._auth_allowed():
            lines.append("AUTH PLAIN LOGIN")
        # EHLO keywords must not get enhanced codes.
        await self.push(UpstreamReply(250, tuple(lines)).render(), raw=True)

    async def smtp_HELO(self, hostname: str) -> None:
        self._abort_transaction("HELO")
        await super().smtp_HELO(hostname)

    async def smtp_RSET(self, arg: str) -> None:
        if arg:
            await self.push("501 5.5.4 Syntax: RSET")
            return
        self._abort_transaction("RSET")
        await self.push("250 2.0.0 OK")

    async def smtp_NOOP(self, arg: str) -> None:
        await self.push("250 2.0.0 OK")

    async def smtp_VRFY(self, arg: str) -> None:
        await self.push("252 2.5.2 Cannot VRFY user, but will accept message and attempt delivery")

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            await self.push("503 5.5.1 Error: TLS already active")
            return
        if self.tx is not None:
            await self.push("503 5.5.1 Error: STARTTLS not allowed during a mail transaction")
            return
        if b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            # Commands pipelined after STARTTLS would be injected into the TLS session.
            await self.push("554 5.5.1 Error: commands pipelined after STARTTLS")
            self.hang_up("421 4.7.0 Closing connection")
            return
        await super().smtp_STARTTLS(arg)
        # RFC 3207 4.2: forget everything learnt before TLS.
        self.auth_user = None
        self.customer = self.runtime.directory.by_address(self.client_ip)
        if self.session is not None:
            self.session.authenticated = None
            self.session.host_name = None
            self.session.extended_smtp = False

    async def smtp_QUIT(self, arg: str) -> None:
        self._abort_transaction("QUIT")
        await super().smtp_QUIT(arg)

    def _auth_allowed(self) -> bool:
        return bool(self.runtime.directory.has_users) and (
            not self.config.server.auth_require_tls or self._tls_protocol is not None
        )

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.tx is not None:
            await self.push("503 5.5.1 Error: nested MAIL command")
            return
        if self.closing:
            await self.push("421 4.3.2 Service shutting down, please try again later")
            return
        if not arg or arg[:5].upper() != "FROM:":
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address>")
            return
        try:
            sender = parse_envelope_arg(arg[5:], null_allowed=True)
        except AddressError as exc:
            await self.push(exc.reply)
            return
        bad = self._check_mail_params(sender)
        if bad:
            await self.push(bad)
            return
        if self.transactions >= self.config.server.max_transactions_per_connection:
            await self.push("421 4.7.0 Too many transactions on one connection")
            return
        self.transactions += 1
        tx = Transaction(new_transaction_id(), sender, time.perf_counter())
        self.tx = tx
        if self.customer is None:
            # Not a customer: nothing is relayed; every RCPT gets 554 5.7.1 (as Postfix does).
            await self.push("250 2.1.0 OK")
            return
        reply = await self._upstream_mail(tx)
        if not reply.positive:
            self._abort_transaction("upstream refused MAIL", log_it=True, reply=reply.render())
        await self.push(reply.render())

    def _check_mail_params(self, sender: EnvelopeArg) -> str | None:
        params = sender.params
        for key in params:
            if key not in ("SIZE", "BODY", "SMTPUTF8", "AUTH"):
                return f"555 5.5.4 MAIL parameter {key} is not supported"
        size = params.get("SIZE")
        if size is not None:
            if not size.isdigit():
                return "501 5.5.4 Bad SIZE parameter"
            if int(size) > self.config.server.max_message_size:
                return (
                    "552 5.3.4 Message size exceeds the limit of "
                    f"{self.config.server.max_message_size} octets"
                )
        if params.get("BODY", "7BIT").upper() not in ("7BIT", "8BITMIME"):
            return "501 5.5.4 BODY must be 7BIT or 8BITMIME"
        if params.get("SMTPUTF8"):
            return "501 5.5.4 SMTPUTF8 takes no value"
        if not sender.ascii and "SMTPUTF8" not in params:
            return "553 5.6.7 Sender address has non-ASCII characters but SMTPUTF8 was not given"
        return None

    async def _upstream_mail(self, tx: Transaction) -> UpstreamReply:
        """Open (or reuse) an upstream connection and relay MAIL FROM; a failure becomes the
        configured 4xx and is remembered so the rest of the transaction fails the same way."""
        start = time.perf_counter()
        pool = self.runtime.pool
        for attempt in (1, 2):
            conn: UpstreamConnection | None = None
            reused = False
            try:
                async with self._waiting_on_upstream():
                    conn, reused = await pool.acquire()
                    unsupported = self._unsupported_by(conn, tx.mail_from)
                    if unsupported is not None:
                        conn.release()
                        return _reply_of(unsupported)
                    reply = await conn.start(self._upstream_mail_command(tx.mail_from, conn))
            except UpstreamError as exc:
                if conn is not None:
                    conn.close()
                if reused and attempt == 1:
                    continue  # a pooled connection went stale; a fresh one is safe to try
                return self._upstream_failed(tx, exc)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            tx.upstream = conn
            tx.upstream_ms += (time.perf_counter() - start) * 1000
            return reply
        raise AssertionError("unreachable")

    @staticmethod
    def _unsupported_by(conn: UpstreamConnection, sender: EnvelopeArg) -> str | None:
        """A refusal when the upstream lacks an extension this transaction needs: the gate
        does not downgrade 8-bit bodies or UTF-8 addresses (RFC 6152, RFC 6531)."""
        if "SMTPUTF8" in sender.params and "SMTPUTF8" not in conn.extensions:
            return "553 5.6.7 SMTPUTF8 is not supported by the upstream mail server"
        if sender.params.get("BODY", "").upper() == "8BITMIME" and "8BITMIME" not in (
            conn.extensions
        ):
            return "554 5.6.3 8-bit message bodies are not supported by the upstream mail server"
        return None

    @contextlib.asynccontextmanager
    async def _waiting_on_upstream(self) -> AsyncIterator[None]:
        """While the upstream is asked, aiosmtpd's client idle timer must not close the
        connection silently: the upstream's own deadlines end the wait with a 4xx reply."""
        self._upstream_waits += 1
        try:
            yield
        finally:
            self._upstream_waits -= 1
            self._reset_timeout()

    def _timeout_cb(self) -> None:
        if self._upstream_waits:
            self._reset_timeout()
            return
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    def _upstream_mail_command(self, sender: EnvelopeArg, conn: UpstreamConnection) -> bytes:
        parts = [f"MAIL FROM:<{sender.address}>"]
        ext = conn.extensions
        for key, value in sender.params.items():
            if key == "SIZE" and "SIZE" in ext:
                parts.append(f"SIZE={value}")
            elif key == "BODY" and "8BITMIME" in ext:
                parts.append(f"BODY={value.upper()}")
            elif key == "SMTPUTF8" and "SMTPUTF8" in ext:
                parts.append("SMTPUTF8")
        return " ".join(parts).encode("utf-8")

    def _upstream_failed(self, tx: Transaction, exc: UpstreamError) -> UpstreamReply:
        if tx.upstream is not None:
            tx.upstream.close()
            tx.upstream = None
        own = exc.reply
        reply = (
            own
            if own is not None and 400 <= own.code < 500
            else _reply_of(str(self.config.policy.upstream_failure_reply))
        )
        tx.upstream_failure = reply.render()
        log.warning("tx=%s client=%s upstream failure: %s", tx.id, self.client_ip, exc)
        return reply

    async def smtp_RCPT(self, arg: str | None) -> None:
        """One RCPT, plus the RCPTs the client pipelined right behind it: their upstream
        RCPTs go out in one write and their replies come back in one (RFC 2920).  The
        mail-bomb holds of the whole batch are read first, in one store read; a held recipient
        gets the hold's 450 4.7.1 and is not relayed (``core.rules.campaign``)."""
        if await self.check_helo_needed():
            return
        tx = self.tx
        if tx is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        args: list[str | None] = [arg]
        if tx.upstream is not None and tx.upstream.pipelining:
            args += self._take_pipelined_rcpts()
        parsed: list[EnvelopeArg | str] = []  # the address, or the reply refusing its syntax
        for one in args:
            if not one or one[:3].upper() != "TO:":
                parsed.append("501 5.5.4 Syntax: RCPT TO:<address>")
                continue
            try:
                parsed.append(parse_envelope_arg(one[3:], null_allowed=False))
            except AddressError as exc:
                parsed.append(exc.reply)
        addresses = [p.address for p in parsed if not isinstance(p, str)]
        customer = self.customer
        holds: list[Decision | None]
        if addresses and customer is not None and self.runtime.may_hold(customer):
            holds = await self.runtime.rcpt_holds(customer, tx, addresses)
        else:  # no hold can apply (the common case): not even a coroutine
            holds = [None] * len(addresses)
        replies: list[str | None] = []
        relay: list[tuple[int, str]] = []  # (index in args, address) to ask the upstream
        logged: list[tuple[int, dict[str, Any]]] = []  # decision-log entries to complete
        for i, rcpt in enumerate(parsed):
            if isinstance(rcpt, str):
                replies.append(rcpt)
                continue
            pending = tuple(addr for _, addr in relay)
            held = holds.pop(0)
            refusal, found, deferred = await self._rcpt_refusal(tx, rcpt, pending, held)
            entry: dict[str, Any] = {"rcpt": rcpt.address, "reply": ""}
            if found is not None:  # monitor mode: what would have been refused
                entry["policy"] = {
                    "found": found.action,
                    "rule": found.rule,
                    "numbers": dict(found.numbers),
                }
            elif deferred is not None:  # a mail-bomb hold
                entry["policy"] = rcpt_finding(deferred)
                tx.rcpt_decision = deferred
            if len(tx.rcpts) < _MAX_LOGGED_RCPTS:
                tx.rcpts.append(entry)
            else:
                tx.rcpts_unlogged += 1
            logged.append((i, entry))
            replies.append(refusal)
            if refusal is None:
                relay.append((i, rcpt.address))
        if relay:
            await self._relay_rcpts(tx, relay, replies)
        for i, entry in logged:
            entry["reply"] = str(replies[i])[:3]
        for reply in replies:
            assert reply is not None
            await self.push(reply)

    def _take_pipelined_rcpts(self) -> list[str | None]:
        """Remove the complete ``RCPT`` lines waiting right after this one in the input buffer
        and return their arguments, as aiosmtpd would have passed them.  Stops at the first
        line that is anything else, or that the command loop would refuse (bare CR or LF, NUL,
        too long), and leaves it for the command loop."""
        reader = self._reader
        buf: bytearray = reader._buffer  # type: ignore[attr-defined]
        limit = self.config.server.max_command_length
        taken: list[str | None] = []
        pos = 0
        while len(taken) < 1000:
            end = buf.find(b"\n", pos)
            if end < 0:
                break
            line = bytes(buf[pos : end + 1])
            if (
                line[:5].upper() != b"RCPT "
                or not line.endswith(b"\r\n")
                or line.count(b"\r") != 1
                or b"\0" in line
                or len(line) - 2 > limit
            ):
                break
            taken.append(line[5:-2].strip().decode("utf-8", "surrogateescape") or None)
            pos = end + 1
        if pos:
            del buf[:pos]
            reader._maybe_resume_transport()  # type: ignore[attr-defined]
        return taken

    async def _rcpt_refusal(
        self,
        tx: Transaction,
        rcpt: EnvelopeArg,
        pending: tuple[str, ...],
        held: Decision | None = None,
    ) -> tuple[str | None, Verdict | None, Decision | None]:
        """The reply refusing ``rcpt`` before the upstream is asked (None: relay it), a
        refusal the policy found but did not apply (monitor mode), and the mail-bomb hold's
        decision when that is what refused it, for the decision log.
        ``pending`` are recipients of this batch already on their way to the upstream;
        ``held`` is the deferral a mail-bomb hold calls for (after the local checks)."""
        local = self._rcpt_local_refusal(tx, rcpt, pending)
        if local is not None:
            return local, None, None
        if held is not None and held.refused:
            return held.verdict.reply(), None, held  # type: ignore[union-attr]
        runtime = self.runtime
        if runtime.policy.active:
            facts = RcptFacts(
                self._facts(),
                tx.mail_from.address,
                rcpt.address,
                (*tx.accepted, *pending),
                time.time(),
            )
            decision = await runtime.evaluate_rcpt(facts, tx)
            if decision.refused:
                return decision.verdict.reply(), None, None  # type: ignore[union-attr]
            if not isinstance(decision.found, Accept):
                return None, decision.found, None
        return None, None, None

    def _rcpt_local_refusal(
        self, tx: Transaction, rcpt: EnvelopeArg, pending: tuple[str, ...]
    ) -> str | None:
        if self.customer is None:
            return f"554 5.7.1 <{rcpt.address}>: Relay access denied"
        if rcpt.params:
            return f"555 5.5.4 RCPT parameter {next(iter(rcpt.params))} is not supported"
        if rcpt.routed:
            return (
                f"553 5.7.1 <{rcpt.address}>: Sender-specified routing "
                "(source routes, %, ! or quoted @) is not allowed"
            )
        if not rcpt.ascii and "SMTPUTF8" not in tx.mail_from.params:
            return "553 5.6.7 Recipient address has non-ASCII characters but SMTPUTF8 was not given"
        if len(tx.accepted) + len(pending) >= self.config.server.max_recipients:
            return f"452 4.5.3 Too many recipients (at most {self.config.server.max_recipients})"
        return tx.upstream_failure

    async def _relay_rcpts(
        self, tx: Transaction, relay: list[tuple[int, str]], replies: list[str | None]
    ) -> None:
        """Ask the upstream about ``relay`` (pipelined when it can) and fill in ``replies``."""
        assert tx.upstream is not None
        start = time.perf_counter()
        try:
            async with self._waiting_on_upstream():
                answers = await tx.upstream.commands(
                    [f"RCPT TO:<{address}>".encode() for _, address in relay]
                )
        except UpstreamError as exc:
            failure = self._upstream_failed(tx, exc).render()
            answers = []
            for i, _ in relay:
                replies[i] = failure
        finally:
            tx.upstream_ms += (time.perf_counter() - start) * 1000
        for (i, address), answer in zip(relay, answers, strict=False):
            replies[i] = answer.render()
            if answer.positive:
                tx.accepted.append(address)

    def _facts(self) -> SessionFacts:
        host = self.session.host_name if self.session is not None else None
        return SessionFacts(
            self.client_ip, self.customer.id if self.customer else None, self.auth_user, host
        )

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        tx = self.tx
        if tx is None:
            await self.push("503 5.5.1 Error: need MAIL command")
            return
        if tx.upstream_failure is None and not tx.accepted:
            await self.push("554 5.5.1 Error: no valid recipients")
            return
        if tx.upstream_failure is not None or tx.upstream is None:
            # The upstream failed during this transaction: nothing more can be relayed in it.
            reply = tx.upstream_failure or str(self.config.policy.upstream_failure_reply)
            self._finish(tx, "defer", reply, rule="upstream")
            await self.push(reply)
            return
        self._busy = True
        try:
            await self._data(tx)
        finally:
            self._busy = False
        if self.closing and self.transport is not None:
            await self.push("421 4.3.2 Service shutting down, please try again later")

    async def _data(self, tx: Transaction) -> None:
        server = self.config.server
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        # aiosmtpd's idle timer would close silently; the DATA deadline below answers 421 first.
        self._reset_timeout(server.data_timeout + 5)
        try:
            async with asyncio.timeout(server.data_timeout):
                body, size, over = await self._read_data(server.max_message_size)
        except TimeoutError:
            self._finish(tx, "defer", "421 4.4.2 DATA timeout", rule="data_timeout")
            await self.push("421 4.4.2 Timeout: message data not received in time")
            return
        self._reset_timeout()
        problem = self._content_problem(body, size, over)
        if problem is not None:
            reply, rule = problem
            self._finish(tx, "reject", reply, rule=rule, size=size)
            await self.push(reply)
            return
        message, dots = unstuff(body)
        size -= dots  # the message's size (RFC 1870), as the milter sees it
        decision: Decision | None = None
        if self.runtime.policy.active:
            decision = await self.runtime.evaluate_message(
                MessageFacts(
                    self._facts(), tx.mail_from.address, tuple(tx.accepted), size, time.time(), body
                ),
                tx,
            )
            if decision.refused:
                reply = decision.verdict.reply()  # type: ignore[union-attr]
                self._finish(tx, decision.verdict.action, reply, decision=decision, size=size)
                await self.push(reply)
                return
        if self.customer is not None and self.runtime.enforcer is not None:
            campaign = await self.runtime.evaluate_campaign(
                self.customer, self.client_ip, tx, message
            )
            tx.campaign = campaign.campaign
            # The log keeps the first finding: an earlier rule's (monitor) or this one's.
            if (
                decision is None
                or not _found_refusal(decision)
                or _found_refusal(campaign.decision)
            ):
                decision = campaign.decision
            if decision.refused:
                reply = decision.verdict.reply()  # type: ignore[union-attr]
                self._finish(tx, decision.verdict.action, reply, decision=decision, size=size)
                await self.push(reply)
                if decision.verdict.rule != "store_failure":
                    await self.runtime.note_refusal(self.customer, tx, decision)
                return
            tx.reservation = campaign.reservation
        conn = tx.upstream
        assert conn is not None
        start = time.perf_counter()
        try:
            async with self._waiting_on_upstream():
                upstream_reply = await conn.data(self._trace_headers(tx) + body + b".\r\n")
        except UpstreamError as exc:
            reply = self._upstream_failed(tx, exc).render()
            tx.upstream_ms += (time.perf_counter() - start) * 1000
            await self.runtime.settle(tx, sent=False)
            self._finish(tx, "defer", reply, rule="upstream", size=size, decision=decision)
            await self.push(reply)
            return
        tx.upstream_ms += (time.perf_counter() - start) * 1000
        await self.runtime.settle(tx, sent=upstream_reply.positive)
        reply = upstream_reply.render()
        action = (
            "accept"
            if upstream_reply.positive
            else ("defer" if upstream_reply.code < 500 else "reject")
        )
        self._finish(
            tx,
            action,
            reply,
            rule="upstream" if action != "accept" else None,
            size=size,
            decision=decision,
        )
        await self.push(reply)

    async def _read_data(self, limit: int) -> tuple[bytes, int, bool]:
        """Read message data up to ``<CRLF>.<CRLF>``, as received (still dot-stuffed).

        Returns the data including its final CRLF, its size in octets, and whether it exceeded
        ``limit`` (then the data is discarded as it arrives and ``b""`` is returned).  Bytes the
        client pipelined after the terminator are put back for the command loop.
        """
        reader = self._reader
        buf = bytearray(b"\r\n")  # the CRLF that ended the DATA command line
        scanned = 0
        discarded = 0
        while True:
            idx = buf.find(_END_OF_DATA, scanned)
            if idx >= 0:
                rest = buf[idx + len(_END_OF_DATA) :]
                if rest:
                    reader._buffer[0:0] = rest  # type: ignore[attr-defined]  # not read yet: the next pipelined command
                size = discarded + idx
                if discarded:
                    return b"", size, True
                return bytes(buf[2 : idx + 2]), size, size > limit
            scanned = max(0, len(buf) - len(_END_OF_DATA) + 1)
            if len(buf) > limit + 2:
                keep = len(_END_OF_DATA)
                discarded += len(buf) - keep
                del buf[:-keep]
                scanned = 0
            chunk = await reader.read(_READ_CHUNK)
            if not chunk:
                raise ConnectionResetError("client closed the connection during DATA")
            buf += chunk

    def _content_problem(self, body: bytes, size: int, over: bool) -> tuple[str, str] | None:
        """A refusal for data the gate must not relay, or None."""
        if over:
            return (
                f"552 5.3.4 Message size exceeds the limit of "
                f"{self.config.server.max_message_size} octets",
                "max_message_size",
            )
        crlf = body.count(b"\r\n")
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf or b"\0" in body:
            return (
                "554 5.6.0 Message refused: bare <CR>, <LF> or <NUL> in message data; "
                "lines must end with <CR><LF> (RFC 5321 2.3.8)",
                "bare_newline",
            )
        max_line = self.config.server.max_line_length
        if max_line and size > max_line and self.runtime.long_line(body):
            return (
                f"554 5.6.0 Message refused: a line is longer than {max_line} octets "
                "(RFC 5321 4.5.3.1.6)",
                "max_line_length",
            )
        return None

    def _trace_headers(self, tx: Transaction) -> bytes:
        """This hop's ``Received:`` and the ``X-Mailguard`` trace both doors add."""
        session = self.session
        helo = _printable(session.host_name if session and session.host_name else "unknown")
        proto = "ESMTP" if session is not None and session.extended_smtp else "SMTP"
        if self._tls_protocol is not None:
            proto += "S"
        if self.auth_user is not None:
            proto += "A"
        rcpt = f"\r\n\tfor <{tx.accepted[0]}>" if len(tx.accepted) == 1 else ""
        return (
            f"Received: from {helo} ([{self.client_ip}])\r\n"
            f"\tby {self.hostname} (mailguard) with {proto} id {tx.id}{rcpt};\r\n"
            f"\t{self.runtime.rfc2822_now()}\r\n"
            f"{TRACE_HEADER}: {trace_value(tx.id, tx.campaign)}\r\n"
        ).encode("utf-8", "replace")

    # -- transaction end ---------------------------------------------------------------------

    def _finish(
        self,
        tx: Transaction,
        action: str,
        reply: str,
        *,
        rule: str | None = None,
        size: int | None = None,
        decision: Decision | None = None,
    ) -> None:
        """End the transaction: log its decision line and return the upstream connection."""
        self.tx = None
        if tx.upstream is not None:
            tx.upstream.release()
            tx.upstream = None
        record = decision_record(
            tx=tx.id,
            client=self.client_ip,
            customer=self.customer.id if self.customer else None,
            auth=self.auth_user,
            helo=self.session.host_name if self.session else None,
            mail_from=tx.mail_from.address,
            rcpts=tx.rcpts,
            rcpts_unlogged=tx.rcpts_unlogged,
            size=size,
            campaign=tx.campaign,
            action=action,
            rule=rule,
            reply=reply,
            decision=decision,
            total_ms=(time.perf_counter() - tx.started) * 1000,
            policy_ms=tx.policy_ms,
            upstream_ms=tx.upstream_ms,
        )
        self.runtime.decision_log.write(record)

    def _abort_transaction(self, why: str, *, log_it: bool = True, reply: str = "") -> None:
        tx = self.tx
        if tx is None:
            return
        if tx.upstream is not None:
            tx.upstream.dirty = True
        if log_it:
            action, rule, text, decision = ended_at_rcpt(
                reply or why, bool(tx.accepted), tx.rcpt_decision
            )
            self._finish(tx, action, text, rule=rule, decision=decision)
        else:
            self.tx = None
            if tx.upstream is not None:
                tx.upstream.release()

    def hang_up(self, reply: str) -> None:
        """Send a last reply and close, without waiting (for draining)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        held, self._held = b"".join(self._held), []
        cast(asyncio.WriteTransport, transport).write(held + reply.encode() + b"\r\n")
        transport.close()

    @property
    def idle(self) -> bool:
        """Between transactions and not waiting on the upstream: safe to close when draining."""
        return self.tx is None and not self._busy

    # -- AUTH ------------------------------------------------------------------------------

    def _defer_authentication(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        """aiosmtpd calls this synchronously; the password hash check (tens of milliseconds of
        CPU) must not run on the event loop, so it is recorded here and done in smtp_AUTH."""
        self._pending_auth = auth_data if isinstance(auth_data, LoginPassword) else None
        return AuthResult(success=False, handled=True)

    async def smtp_AUTH(self, arg: str) -> None:
        runtime = self.runtime
        if not runtime.directory.has_users:
            await self.push("502 5.5.1 Error: authentication not enabled")
            return
        if self.tx is not None:
            await self.push("503 5.5.1 Error: AUTH not allowed during a mail transaction")
            return
        try:
            blocked = await runtime.auth_blocked(self.client_ip)
        except Exception:  # StoreError, logged by the runtime
            await self.push("454 4.7.0 Temporary authentication failure, please try again later")
            return
        if blocked:
            await self.push(
                "421 4.7.0 Too many failed authentication attempts from your address, "
                "try again later"
            )
            return
        self._pending_auth = None
        await super().smtp_AUTH(arg)
        pending, self._pending_auth = self._pending_auth, None
        if pending is None:
            return
        name = pending.login.decode("utf-8", "replace")
        customer = await runtime.verify_user(name, pending.password)
        if customer is not None:
            assert self.session is not None
            self.session.authenticated = True
            self.customer = customer
            self.auth_user = name
            log.info(
                "client=%s authenticated as %s (customer %s)", self.client_ip, name, customer.id
            )
            await self.push("235 2.7.0 Authentication successful")
            return
        self.auth_failures += 1
        log.warning("client=%s failed AUTH as %r", self.client_ip, name[:64])
        with contextlib.suppress(Exception):
            over = await runtime.note_auth_failure(self.client_ip)
            if over:
                await self.push(
                    "421 4.7.0 Too many failed authentication attempts from your address"
                )
                return
        if self.auth_failures >= self.config.server.max_auth_failures_per_connection:
            await self.push("421 4.7.0 Too many failed authentication attempts")
            return
        await self.push("535 5.7.8 Authentication credentials invalid")


def _found_refusal(decision: Decision) -> bool:
    return not isinstance(decision.found, Accept)


def _reply_of(text: str) -> UpstreamReply:
    return UpstreamReply(int(text[:3]), (text[4:],))


_STUFFED_LINE = re.compile(rb"\r\n\.\.")


def unstuff(data: bytes) -> tuple[bytes, int]:
    """SMTP DATA as received (dot-stuffed, RFC 5321 4.5.2; ending with its last line's CRLF) to
    the message itself, and how many octets that removed (one per stuffed line).

    One regex pass: about 2.5x faster than ``bytes.replace`` on a 50 KB message with stuffed
    lines (``replace`` counts the matches in a pass of its own), and faster than ``bytes.count``.
    """
    message, dots = _STUFFED_LINE.subn(b"\r\n.", data)
    if message.startswith(b".."):
        return message[1:], dots + 1
    return message, dots


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() and c not in "()" else "?" for c in text)[:255]
