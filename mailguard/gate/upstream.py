"""The gate's SMTP client to the upstream MTA, and its connection pool.

Responsible for: speaking SMTP to the upstream (EHLO, optional STARTTLS, PIPELINING when
offered), parsing its replies strictly, and passing the client's DATA bytes through unchanged
(they arrive dot-stuffed with CRLF line endings, and are forwarded as they are, so the upstream
sees exactly the message boundaries the gate saw).  Pooled connections are reset with RSET
(pipelined with the next MAIL) before they carry another transaction.
Must never: decide policy, answer the client, or retry a DATA whose outcome is unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass

from mailguard.config.schema import UpstreamConfig

log = logging.getLogger("mailguard.upstream")

_MAX_REPLY_LINES = 100


class UpstreamError(Exception):
    """The upstream could not be reached, timed out, or sent an unparseable reply.

    The connection it happened on is unusable.  ``reply`` is the upstream's own 4xx reply when
    it sent one (e.g. a 421 greeting), else None and the gate uses its configured failure reply.
    """

    def __init__(self, message: str, reply: UpstreamReply | None = None) -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    """One (possibly multi-line) SMTP reply.  ``lines`` hold the text after the code."""

    code: int
    lines: tuple[str, ...]

    @property
    def positive(self) -> bool:
        """2xx: the command was accepted (a 3xx only ever answers DATA, checked there)."""
        return 200 <= self.code < 300

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def render(self) -> str:
        """The reply as the client should see it, lines joined with CRLF (no final CRLF)."""
        last = len(self.lines) - 1
        return "\r\n".join(
            f"{self.code}{' ' if i == last else '-'}{line}" for i, line in enumerate(self.lines)
        )


async def _read_reply(reader: asyncio.StreamReader) -> UpstreamReply:
    """Read one reply; any deviation from RFC 5321 4.2 raises UpstreamError."""
    code: int | None = None
    lines: list[str] = []
    while True:
        raw = await reader.readline()
        if not raw.endswith(b"\n"):
            raise UpstreamError("upstream closed the connection")
        line = raw.rstrip(b"\r\n")
        if len(line) < 3 or not line[:3].isdigit() or (len(line) > 3 and line[3:4] not in b" -"):
            raise UpstreamError(f"unparseable upstream reply: {line[:80]!r}")
        this = int(line[:3])
        if code is None:
            code = this
        elif this != code:
            raise UpstreamError(f"inconsistent codes in upstream reply: {code} then {this}")
        if not 200 <= this <= 599:
            raise UpstreamError(f"unparseable upstream reply code: {this}")
        lines.append(line[4:].decode("utf-8", "replace"))
        if len(lines) > _MAX_REPLY_LINES:
            raise UpstreamError("upstream reply too long")
        if line[3:4] != b"-":
            return UpstreamReply(code, tuple(lines))


class UpstreamConnection:
    """One SMTP session with the upstream.  Not safe for concurrent use by two transactions."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, config: UpstreamConfig
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._config = config
        self.extensions: dict[str, str] = {}
        self.dirty = False  # carried a transaction: reset with RSET before the next one
        self.broken = False
        self.owed = 0  # replies the upstream still owes; a connection owing any is never reused
        self.pool: UpstreamPool | None = None
        self.last_used = time.monotonic()
        self.transactions = 0

    @classmethod
    async def open(cls, config: UpstreamConfig, helo: str) -> UpstreamConnection:
        """Connect, read the greeting, EHLO, and STARTTLS when configured."""
        target = f"{config.host}:{config.port}"
        try:
            async with asyncio.timeout(config.connect_timeout):
                reader, writer = await asyncio.open_connection(config.host, config.port)
        except (OSError, TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to upstream {target}: {exc!r}") from exc
        conn = cls(reader, writer, config)
        conn.owed = 1  # the greeting
        try:
            greeting = await conn._reply(config.command_timeout)
            if greeting.code != 220:
                raise UpstreamError(
                    f"upstream {target} greeted with {greeting.code}",
                    greeting if 400 <= greeting.code < 500 else None,
                )
            await conn._ehlo(helo)
            if config.starttls != "off":
                await conn._starttls(helo)
        except BaseException:
            conn.close()
            raise
        return conn

    async def _ehlo(self, helo: str) -> None:
        reply = await self.command(f"EHLO {helo}".encode(), "EHLO")
        if reply.code != 250:
            reply = await self.command(f"HELO {helo}".encode(), "HELO")
            if reply.code != 250:
                raise UpstreamError(f"upstream refused HELO: {reply.render()!r}")
            self.extensions = {}
            return
        ext: dict[str, str] = {}
        for line in reply.lines[1:]:
            key, _, value = line.partition(" ")
            ext[key.upper()] = value
        self.extensions = ext

    async def _starttls(self, helo: str) -> None:
        cfg = self._config
        if "STARTTLS" not in self.extensions:
            if cfg.starttls == "require":
                raise UpstreamError("upstream does not offer STARTTLS and it is required")
            return
        reply = await self.command(b"STARTTLS", "STARTTLS")
        if reply.code != 220:
            if cfg.starttls == "require":
                raise UpstreamError(f"upstream refused STARTTLS: {reply.render()!r}")
            return
        context = ssl.create_default_context(
            cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None
        )
        if not cfg.tls_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            async with asyncio.timeout(cfg.command_timeout):
                await self._writer.start_tls(context, server_hostname=cfg.host)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise UpstreamError(f"TLS handshake with upstream failed: {exc!r}") from exc
        await self._ehlo(helo)

    @property
    def alive(self) -> bool:
        """False once broken or closed by either side (as far as can be seen without I/O)."""
        return not (self.broken or self.owed or self._writer.is_closing() or self._reader.at_eof())

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.extensions

    async def _reply(self, timeout: float) -> UpstreamReply:
        try:
            async with asyncio.timeout(timeout):
                reply = await _read_reply(self._reader)
        except UpstreamError:
            self.broken = True
            raise
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            self.broken = True
            raise UpstreamError(f"upstream read failed: {exc!r}") from exc
        except BaseException:
            # Cancelled (the client went away): replies may be in flight, so the
            # connection is out of step and must never carry another transaction.
            self.broken = True
            raise
        self.owed -= 1
        return reply

    def _send(self, data: bytes, replies: int) -> None:
        """Write ``data``, for which the upstream owes ``replies`` replies."""
        if self._writer.is_closing():
            self.broken = True
            raise UpstreamError("upstream connection is closed")
        self.owed += replies
        self._writer.write(data)

    async def command(self, line: bytes, what: str = "command") -> UpstreamReply:
        """Send one command line (without CRLF) and return its reply."""
        self._send(line + b"\r\n", 1)
        return await self._reply(self._config.command_timeout)

    async def commands(self, lines: list[bytes]) -> list[UpstreamReply]:
        """Send several commands, pipelined when the upstream offers PIPELINING."""
        if not self.pipelining:
            return [await self.command(line) for line in lines]
        self._send(b"".join(line + b"\r\n" for line in lines), len(lines))
        return [await self._reply(self._config.command_timeout) for _ in lines]

    async def start(self, mail_from: bytes) -> UpstreamReply:
        """Start a transaction with ``MAIL FROM:...``, resetting a used connection first."""
        if self.dirty:
            rset, reply = await self.commands([b"RSET", mail_from])
            if rset.code != 250:
                self.broken = True
                raise UpstreamError(f"upstream refused RSET: {rset.render()!r}")
        else:
            reply = await self.command(mail_from)
        self.dirty = True
        return reply

    async def data(self, payload: bytes) -> UpstreamReply:
        """Send DATA, then ``payload`` (dot-stuffed, ending with ``.\\r\\n``), return the reply.

        A failure after the payload was sent leaves the outcome unknown; the caller must not
        claim success, and the connection is marked broken.
        """
        reply = await self.command(b"DATA")
        if reply.code != 354:
            if reply.code < 400:
                self.broken = True
                raise UpstreamError(f"upstream answered DATA with {reply.code}, not 354")
            return reply
        self._send(payload, 1)
        try:
            async with asyncio.timeout(self._config.data_timeout):
                await self._writer.drain()
        except (OSError, TimeoutError) as exc:
            self.broken = True
            raise UpstreamError(f"upstream write failed: {exc!r}") from exc
        reply = await self._reply(self._config.data_timeout)
        if not 200 <= reply.code < 300 and reply.code < 400:
            self.broken = True
            raise UpstreamError(f"upstream answered end of data with {reply.code}")
        self.transactions += 1
        return reply

    def release(self) -> None:
        """Back to the pool it came from (closed if that pool is gone or it is unusable)."""
        if self.pool is None:
            self.close()
        else:
            self.pool.release(self)

    def close(self) -> None:
        self.broken = True
        with contextlib.suppress(Exception):
            self._writer.close()

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            self._writer.write(b"QUIT\r\n")
            async with asyncio.timeout(1):
                await self._reply(1)
        self.close()


class UpstreamPool:
    """Idle upstream connections, reused LIFO; at most ``pool_size`` are kept idle."""

    def __init__(self, config: UpstreamConfig, helo: str) -> None:
        self.config = config
        self.helo = helo
        self._idle: deque[UpstreamConnection] = deque()
        self._closed = False

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A ready connection and whether it was reused from the pool."""
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            if not conn.alive or now - conn.last_used > self.config.pool_idle_timeout:
                conn.close()
                continue
            return conn, True
        conn = await UpstreamConnection.open(self.config, self.helo)
        conn.pool = self
        return conn, False

    def release(self, conn: UpstreamConnection) -> None:
        """Give a connection back; broken ones are closed, surplus ones are closed."""
        if not conn.alive or self._closed or len(self._idle) >= self.config.pool_size:
            conn.close()
            return
        conn.last_used = time.monotonic()
        self._idle.append(conn)

    async def close(self) -> None:
        self._closed = True
        idle = list(self._idle)
        self._idle.clear()
        await asyncio.gather(*(c.quit() for c in idle), return_exceptions=True)
