"""A small, fast SMTP client for the load driver, and the test messages it sends.

A raw ``asyncio.Protocol`` (no smtplib, no aiosmtplib): one object per persistent connection,
sending many transactions.  MAIL, every RCPT and DATA go out in one write when the server
advertises PIPELINING (RFC 2920), as real MTAs do; otherwise one command per round trip.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, cast

from loadtest.sink import body_digest

Outcome = Literal["accepted", "refused", "error"]


class SMTPClientError(Exception):
    """The connection failed, timed out or the server broke the protocol."""


@dataclass(slots=True)
class Reply:
    code: int
    lines: list[str]

    def __str__(self) -> str:
        return f"{self.code} {self.lines[-1] if self.lines else ''}".strip()


@dataclass(slots=True)
class TxResult:
    """The outcome of one transaction as the client saw it."""

    outcome: Outcome
    latency: float  # seconds, from writing MAIL to the deciding reply
    rcpts_accepted: int = 0
    body_sent: bool = False  # the final dot was written: delivery is possible
    reply: str = ""  # the deciding reply, or the error
    drop_connection: bool = False  # 421 or error: open a new connection for the next one


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.partial: list[str] = []
        self.replies: deque[Reply] = deque()
        self.waiter: asyncio.Future[None] | None = None
        self.exc: BaseException | None = None
        self.write_ok: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\n")
            if end < 0:
                break
            line = bytes(self.buf[:end]).rstrip(b"\r")
            del self.buf[: end + 1]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._fail(SMTPClientError(f"malformed reply line {line[:80]!r}"))
                return
            self.partial.append(line[4:].decode("utf-8", "replace"))
            if line[3:4] != b"-":
                self.replies.append(Reply(int(line[:3]), self.partial))
                self.partial = []
        if self.replies:
            self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc
        if self.transport is not None:
            self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.exc is None:
            self.exc = exc or SMTPClientError("connection closed by server")
        self._wake()
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_result(None)

    def pause_writing(self) -> None:
        self.write_ok = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self.write_ok is not None and not self.write_ok.done():
            self.write_ok.set_result(None)
        self.write_ok = None


class SMTPClient:
    """One persistent SMTP connection."""

    def __init__(self, protocol: _Protocol, timeout: float) -> None:
        self._p = protocol
        self.timeout = timeout
        self.extensions: dict[str, str] = {}
        self.banner = ""

    @classmethod
    async def connect(
        cls, host: str, port: int, *, helo: str = "client.load.example", timeout: float = 30.0
    ) -> SMTPClient:
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(_Protocol, host, port), timeout
            )
        except (OSError, TimeoutError) as exc:
            raise SMTPClientError(f"connect to {host}:{port}: {exc!r}") from exc
        client = cls(protocol, timeout)
        try:
            banner = await client.reply()
            if banner.code != 220:
                raise SMTPClientError(f"banner: {banner}")
            client.banner = str(banner)
            ehlo = await client.command(f"EHLO {helo}")
            if ehlo.code != 250:
                raise SMTPClientError(f"EHLO: {ehlo}")
        except BaseException:
            client.close()
            raise
        for line in ehlo.lines[1:]:
            keyword, _, params = line.partition(" ")
            client.extensions[keyword.upper()] = params
        return client

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def reply(self) -> Reply:
        p = self._p
        deadline = time.monotonic() + self.timeout
        while not p.replies:
            if p.exc is not None:
                raise SMTPClientError(f"connection lost: {p.exc!r}")
            p.waiter = asyncio.get_running_loop().create_future()
            remaining = deadline - time.monotonic()
            try:
                await asyncio.wait_for(p.waiter, max(remaining, 0.0))
            except TimeoutError:
                raise SMTPClientError(f"no reply within {self.timeout:g}s") from None
            finally:
                p.waiter = None
        return p.replies.popleft()

    def write(self, data: bytes) -> None:
        p = self._p
        if p.exc is not None or p.transport is None or p.transport.is_closing():
            raise SMTPClientError(f"connection lost: {p.exc!r}")
        p.transport.write(data)

    async def drain(self) -> None:
        waiter = self._p.write_ok
        if waiter is not None:
            try:
                await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
            except TimeoutError:
                raise SMTPClientError("write stalled") from None

    async def command(self, line: str) -> Reply:
        self.write(line.encode("utf-8") + b"\r\n")
        return await self.reply()

    async def send(self, msg: Message, *, pipelining: bool) -> TxResult:
        """One transaction.  Never raises for SMTP-level failures; see ``TxResult``."""
        params = ""
        if "SIZE" in self.extensions:
            params += f" SIZE={len(msg.data)}"
        if msg.eightbit and "8BITMIME" in self.extensions:
            params += " BODY=8BITMIME"
        mail = f"MAIL FROM:<{msg.sender}>{params}\r\n".encode()
        rcpts = [f"RCPT TO:<{r}>\r\n".encode() for r in msg.rcpts]
        start = time.perf_counter()
        state = _TxState()
        try:
            return await self._send(msg, mail, rcpts, pipelining, start, state)
        except SMTPClientError as exc:
            outcome: Outcome = "refused" if state.saw_421 and not state.body_sent else "error"
            return TxResult(
                outcome,
                time.perf_counter() - start,
                state.rcpts_accepted,
                state.body_sent,
                str(exc),
                drop_connection=True,
            )

    async def _send(
        self,
        msg: Message,
        mail: bytes,
        rcpts: list[bytes],
        pipelining: bool,
        start: float,
        state: _TxState,
    ) -> TxResult:
        def refused(reply: Reply) -> TxResult:
            return TxResult(
                "refused",
                time.perf_counter() - start,
                state.rcpts_accepted,
                False,
                str(reply),
                drop_connection=reply.code == 421,
            )

        if pipelining:
            self.write(mail + b"".join(rcpts) + b"DATA\r\n")
            mail_reply = await self._read(state)
            rcpt_refusal: Reply | None = None
            for _ in rcpts:
                r = await self._read(state)
                if r.code // 100 == 2:
                    state.rcpts_accepted += 1
                elif rcpt_refusal is None:
                    rcpt_refusal = r
            data_reply = await self._read(state)
            if data_reply.code != 354:
                # The deciding reply: MAIL's, else the first RCPT refusal, else DATA's.
                if mail_reply.code // 100 != 2:
                    deciding = mail_reply
                elif state.rcpts_accepted == 0 and rcpt_refusal is not None:
                    deciding = rcpt_refusal
                else:
                    deciding = data_reply
                result = refused(deciding)
                if not state.saw_421:
                    await self._rset()
                else:
                    result.drop_connection = True
                return result
            if state.rcpts_accepted == 0 or mail_reply.code // 100 != 2:
                # RFC 2920 says the server must refuse DATA here; it did not.
                self.write(b".\r\n")
                await self._read(state)
                return TxResult(
                    "error",
                    time.perf_counter() - start,
                    0,
                    False,
                    f"server answered DATA with 354 after refusing the envelope: {data_reply}",
                    drop_connection=True,
                )
        else:
            self.write(mail)
            mail_reply = await self._read(state)
            if mail_reply.code // 100 != 2:
                result = refused(mail_reply)
                if mail_reply.code != 421:
                    await self._rset()
                return result
            first_refusal = None
            for rcpt in rcpts:
                self.write(rcpt)
                r = await self._read(state)
                if r.code // 100 == 2:
                    state.rcpts_accepted += 1
                else:
                    first_refusal = first_refusal or r
                    if r.code == 421:
                        return refused(r)
            if state.rcpts_accepted == 0:
                assert first_refusal is not None
                await self._rset()
                return refused(first_refusal)
            self.write(b"DATA\r\n")
            data_reply = await self._read(state)
            if data_reply.code != 354:
                result = refused(data_reply)
                if data_reply.code != 421:
                    await self._rset()
                return result
        self.write(msg.data)
        self.write(b".\r\n")
        state.body_sent = True
        await self.drain()
        final = await self._read(state)
        latency = time.perf_counter() - start
        if final.code // 100 == 2:
            return TxResult("accepted", latency, state.rcpts_accepted, True, str(final))
        if final.code // 100 in (4, 5):
            return TxResult(
                "refused",
                latency,
                state.rcpts_accepted,
                True,
                str(final),
                drop_connection=final.code == 421,
            )
        return TxResult(
            "error", latency, state.rcpts_accepted, True, f"unexpected reply {final}", True
        )

    async def _read(self, state: _TxState) -> Reply:
        r = await self.reply()
        if r.code == 421:
            state.saw_421 = True
        return r

    async def _rset(self) -> None:
        r = await self.command("RSET")
        if r.code != 250:
            raise SMTPClientError(f"RSET: {r}")

    async def quit(self) -> None:
        try:
            self.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 2.0)
        except (SMTPClientError, TimeoutError):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self._p.transport is not None:
            self._p.transport.close()


@dataclass(slots=True)
class _TxState:
    rcpts_accepted: int = 0
    body_sent: bool = False
    saw_421: bool = False


# --------------------------------------------------------------------------- messages

SENDER = "sender@load.example"
# fmt: off
WORDS = (
    "invoice", "shipment", "account", "renewal", "hosting", "domain", "mailbox", "quota",
    "backup", "restore", "server", "customer", "support", "ticket", "update", "reminder",
    "meeting", "agenda", "report", "weekly", "monthly", "summary", "please", "find",
    "attached", "below", "regards", "thanks", "order", "confirmation", "delivery", "tracking",
    "number",
)
# fmt: on


@dataclass(slots=True, frozen=True)
class Message:
    ident: str
    sender: str
    rcpts: tuple[str, ...]
    data: bytes  # dot-stuffed, CRLF line ends, ending with CRLF (without the final dot)
    digest: str  # of the unstuffed body, as the sink computes it
    eightbit: bool


def _body(target: int, eightbit: bool) -> bytes:
    """A plain-text body of about ``target`` bytes, with lines that need dot-stuffing."""
    lines: list[str] = ["Hello,", ""]
    size = 0
    i = 0
    while size < target:
        if i % 17 == 5:
            line = ". a line starting with a dot (must be dot-stuffed on the wire)"
        elif i % 53 == 11:
            line = "."  # a lone dot: the end-of-data marker unless stuffed
        elif i % 29 == 3:
            line = "..two dots" if not eightbit else "Grüße aus dem Lasttest, ça va? 日本語"
        else:
            words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(11)]
            line = " ".join(words).capitalize() + "."
        lines.append(line)
        size += len(line.encode()) + 2
        i += 1
    lines += ["", "-- ", "The load test"]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


FIRST_NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elif", "Farid", "Grace", "Hiroshi", "Ines", "Jonas",
    "Kamala", "Lars", "Mei", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tomasz",
)  # fmt: skip


def personalized(body: bytes, n: int) -> bytes:
    """``body`` as a mail merge makes it for message ``n``: a greeting with a name, and a
    reference token and an unsubscribe link of its own before the signature."""
    name = f"{FIRST_NAMES[n % len(FIRST_NAMES)]} {FIRST_NAMES[(n // 7) % len(FIRST_NAMES)]}son"
    token = hashlib.blake2b(n.to_bytes(8, "big"), digest_size=8).hexdigest()
    greeting = f"Hello {name},".encode()
    tail = (
        f"Your customer reference is {token[:10].upper()}.\r\n"
        f"Unsubscribe: https://lists.load.example/u/{token}\r\n"
    ).encode()
    _, _, rest = body.partition(b"\r\n")  # the plain greeting
    main, _, signature = rest.rpartition(b"\r\n-- \r\n")
    return greeting + b"\r\n" + main + b"\r\n" + tail + b"-- \r\n" + signature


def dot_stuff(data: bytes) -> bytes:
    return (b"\r\n" + data).replace(b"\r\n.", b"\r\n..")[2:]


@dataclass(slots=True)
class MessageFactory:
    """Messages of about ``size`` bytes to ``rcpts`` recipients, each with a unique id."""

    size: int
    rcpts: int
    prefix: str
    eightbit: bool = True
    refuse_every: int = 0  # every Nth message goes to recipients the sink refuses
    personalize: bool = False  # each message's body is its own (``personalized``)
    # 0: every message to the same recipients; P >= rcpts: message n to the next ``rcpts`` of a
    # pool of P addresses (a campaign to many recipients, each getting a copy every P/rcpts)
    recipient_pool: int = 0
    _body: bytes = field(init=False)
    _stuffed_body: bytes = field(init=False)
    _digest: str = field(init=False)
    _date: tuple[int, str] = field(init=False, default=(0, ""))

    def __post_init__(self) -> None:
        if self.recipient_pool and self.recipient_pool < self.rcpts:
            raise ValueError(f"a recipient pool of {self.recipient_pool} < {self.rcpts} recipients")
        header_estimate = 420 + 30 * self.rcpts
        self._body = _body(max(self.size - header_estimate, 64), self.eightbit)
        self._stuffed_body = dot_stuff(self._body)
        self._digest = body_digest(self._body)

    def recipients(self, n: int) -> tuple[str, ...]:
        refuse = self.refuse_every > 0 and n % self.refuse_every == self.refuse_every - 1
        local = "reject" if refuse else "rcpt"
        pool = self.recipient_pool or self.rcpts  # a pool of rcpts: the same ones every time
        first = n * self.rcpts
        return tuple(
            f"{local}{k}@dest{k % 3}.example"
            for k in ((first + i) % pool for i in range(self.rcpts))
        )

    def expect_refused(self, n: int) -> bool:
        return self.refuse_every > 0 and n % self.refuse_every == self.refuse_every - 1

    def _now(self) -> str:
        second = int(time.time())
        if self._date[0] != second:
            self._date = (second, email.utils.formatdate(second, localtime=True))
        return self._date[1]

    def ident(self, n: int) -> str:
        return f"{self.prefix}-{n:07d}"

    def make(self, n: int) -> Message:
        ident = self.ident(n)
        rcpts = self.recipients(n)
        to = ",\r\n ".join(f"<{r}>" for r in rcpts)
        cte = "8bit" if self.eightbit else "7bit"
        header = (
            f"Received: from client.load.example (localhost [127.0.0.1])\r\n"
            f"\tby client.load.example (loadtest) with ESMTP id {n:x}; {self._now()}\r\n"
            f'From: "Load Test" <{SENDER}>\r\n'
            f"To: {to}\r\n"
            f"Subject: Load test message {n} ({len(self._body)} byte body)\r\n"
            f"Date: {self._now()}\r\n"
            f"Message-ID: <{ident}@load.example>\r\n"
            f"MIME-Version: 1.0\r\n"
            f"Content-Type: text/plain; charset=utf-8; format=flowed\r\n"
            f"Content-Transfer-Encoding: {cte}\r\n"
            f"X-Loadtest-Id: {ident}\r\n"
            f"\r\n"
        ).encode()
        if not self.personalize:
            return Message(
                ident, SENDER, rcpts, header + self._stuffed_body, self._digest, self.eightbit
            )
        body = personalized(self._body, n)
        return Message(
            ident, SENDER, rcpts, header + dot_stuff(body), body_digest(body), self.eightbit
        )
