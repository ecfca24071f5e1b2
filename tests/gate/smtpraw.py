"""A raw SMTP client for protocol tests: exact bytes out, whole replies back."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType


class RawClient:
    def __init__(self, host: str, port: int, timeout: float = 10.0, proxy: bytes = b"") -> None:
        self.proxy = proxy  # a PROXY protocol header to send before the banner
        self.host = host
        self.port = port
        self.timeout = timeout
        self.banner = ""

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        if self.proxy:
            await self.send(self.proxy)
        self.banner = await self.reply()
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def reply(self) -> str:
        """One whole reply (multi-line joined with CRLF); "" if the server closed."""
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not line:
                return "\r\n".join(lines)
            text = line.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text)
            if text[3:4] != "-":
                return "\r\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> str:
        data = line.encode() if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def ehlo(self, name: str = "client.test") -> str:
        reply = await self.cmd(f"EHLO {name}")
        assert reply.startswith("250"), reply
        return reply

    async def data(self, body: bytes) -> str:
        """DATA with ``body`` sent as is (caller dot-stuffs), then the final reply."""
        reply = await self.cmd("DATA")
        if not reply.startswith("354"):
            return reply
        await self.send(body + b".\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        try:
            return await asyncio.wait_for(self.reader.read(1), self.timeout) == b""
        except (ConnectionError, OSError):
            return True
