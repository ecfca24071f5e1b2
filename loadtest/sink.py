"""A fast upstream SMTP sink that records what it receives.

A raw ``asyncio.Protocol`` (no aiosmtpd: the sink must not be the bottleneck) speaking just
enough SMTP for a relay to deliver to it: EHLO/HELO (advertising PIPELINING, 8BITMIME, SIZE and
ENHANCEDSTATUSCODES), MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, VRFY and QUIT.  Every
message is recorded by its ``X-Loadtest-Id:`` header value, with its recipient count and a
digest of its body, so a driver can verify that each accepted message arrived exactly once,
unaltered, and that nothing else arrived.

``XSTATS`` (a private command) answers ``250`` with the counters as JSON.

Standalone: ``python -m loadtest.sink --listen 127.0.0.1:2525`` (prints counters on exit).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, cast

BANNER_HOST = "sink.loadtest.invalid"
MAX_COMMAND_LINE = 4096
SIZE_LIMIT = 100 * 1000 * 1000
ID_HEADER = b"\nx-loadtest-id:"


def body_digest(body: bytes) -> str:
    """The digest the sink records for a message body (the bytes after the header block)."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


def split_message(content: bytes) -> tuple[bytes, bytes]:
    """Split an RFC 5322 message (CRLF line ends) into its header block and body."""
    end = content.find(b"\r\n\r\n")
    if end < 0:
        return content, b""
    return content[:end], content[end + 4 :]


def loadtest_id(header: bytes) -> str | None:
    """The ``X-Loadtest-Id`` value in a header block, or None."""
    lowered = b"\n" + header.lower()
    pos = lowered.find(ID_HEADER)
    if pos < 0:
        return None
    start = pos + len(ID_HEADER) - 1  # index into ``header`` (``lowered`` has one extra byte)
    end = header.find(b"\r\n", start)
    value = header[start:] if end < 0 else header[start:end]
    return value.strip().decode("ascii", "replace")


@dataclass(slots=True)
class Delivery:
    """One message as the sink received it."""

    sender: str
    rcpts: int
    digest: str
    size: int


@dataclass(slots=True)
class SinkStats:
    """Everything the sink received since the last reset."""

    by_id: dict[str, list[Delivery]] = field(default_factory=dict)
    without_id: int = 0
    messages: int = 0
    recipients: int = 0
    octets: int = 0
    connections: int = 0
    rejected_rcpts: int = 0

    def record(self, sender: str, rcpts: int, content: bytes) -> None:
        self.messages += 1
        self.recipients += rcpts
        self.octets += len(content)
        header, body = split_message(content)
        ident = loadtest_id(header)
        if ident is None:
            self.without_id += 1
            return
        delivery = Delivery(sender, rcpts, body_digest(body), len(content))
        self.by_id.setdefault(ident, []).append(delivery)

    @property
    def duplicates(self) -> int:
        """Deliveries beyond the first of any id."""
        return sum(len(d) - 1 for d in self.by_id.values() if len(d) > 1)

    def summary(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "recipients": self.recipients,
            "octets": self.octets,
            "connections": self.connections,
            "distinct_ids": len(self.by_id),
            "duplicates": self.duplicates,
            "without_id": self.without_id,
            "rejected_rcpts": self.rejected_rcpts,
        }


class Sink:
    """The sink server; ``stats`` is what it received (``reset()`` between scenarios)."""

    def __init__(
        self,
        *,
        hostname: str = BANNER_HOST,
        reject_rcpt: str | None = None,
        data_delay: float = 0.0,
    ) -> None:
        self.hostname = hostname
        self.reject_rcpt = reject_rcpt.lower() if reject_rcpt else None
        self.data_delay = data_delay
        self.stats = SinkStats()
        self.server: asyncio.Server | None = None
        self.ehlo_reply = (
            f"250-{hostname}\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
            f"250-SIZE {SIZE_LIMIT}\r\n250 ENHANCEDSTATUSCODES\r\n"
        ).encode()

    def reset(self) -> None:
        self.stats = SinkStats()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (``port=0`` picks a free one)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(
            lambda: SinkProtocol(self), host, port, reuse_address=True, backlog=1024
        )
        sockname = self.server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None


def _address(arg: bytes) -> str:
    """The address inside ``FROM:<...>`` / ``TO:<...>`` (lenient)."""
    start = arg.find(b"<")
    end = arg.find(b">", start + 1)
    if start >= 0 and end > start:
        return arg[start + 1 : end].decode("utf-8", "replace")
    _, _, rest = arg.partition(b":")
    return rest.strip().split(b" ", 1)[0].decode("utf-8", "replace")


class SinkProtocol(asyncio.Protocol):
    """One client connection.  Replies produced by one read are written in one call."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.blocked = False  # waiting to send a delayed DATA reply
        self.closing = False
        self.mail: str | None = None
        self.rcpts = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        self.sink.stats.connections += 1
        self.transport.write(f"220 {self.sink.hostname} ESMTP loadtest sink\r\n".encode())

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buf += data
        if not self.blocked:
            self._run()

    def _run(self) -> None:
        out: list[bytes] = []
        self._process(out)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.closing and self.transport is not None:
            self.transport.close()

    def _process(self, out: list[bytes]) -> None:
        while not self.closing and not self.blocked:
            if self.in_data:
                if not self._data(out):
                    return
                continue
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > MAX_COMMAND_LINE:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    self.closing = True
                return
            line = bytes(self.buf[:end]).rstrip(b"\r")
            del self.buf[: end + 1]
            self._command(line, out)

    def _data(self, out: list[bytes]) -> bool:
        """Consume message data; True once the terminating dot was seen."""
        buf = self.buf
        end = buf.find(b"\r\n.\r\n", self.scan_from)
        if end < 0:
            self.scan_from = max(0, len(buf) - 4)
            return False
        # ``buf`` starts with a synthetic CRLF, so a stuffed first line is unstuffed too.
        content = bytes(buf[: end + 2]).replace(b"\r\n..", b"\r\n.")[2:]
        del buf[: end + 5]
        self.in_data = False
        self.scan_from = 0
        self.sink.stats.record(self.mail or "", self.rcpts, content)
        self.mail = None
        self.rcpts = 0
        reply = f"250 2.0.0 Ok: queued as {self.sink.stats.messages}\r\n".encode()
        if self.sink.data_delay > 0:
            self.blocked = True
            asyncio.get_running_loop().call_later(self.sink.data_delay, self._unblock, reply)
        else:
            out.append(reply)
        return True

    def _unblock(self, reply: bytes) -> None:
        self.blocked = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(reply)
        self._run()

    def _command(self, line: bytes, out: list[bytes]) -> None:
        verb = line[:4].upper()
        if verb == b"MAIL":
            if self.mail is not None:
                out.append(b"503 5.5.1 Error: nested MAIL command\r\n")
                return
            self.mail = _address(line[4:])
            self.rcpts = 0
            out.append(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            if self.mail is None:
                out.append(b"503 5.5.1 Error: need MAIL command\r\n")
                return
            rcpt = _address(line[4:])
            if self.sink.reject_rcpt and self.sink.reject_rcpt in rcpt.lower():
                self.sink.stats.rejected_rcpts += 1
                out.append(b"550 5.1.1 Recipient address rejected by sink\r\n")
                return
            self.rcpts += 1
            out.append(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if self.mail is None:
                out.append(b"503 5.5.1 Error: need MAIL command\r\n")
            elif self.rcpts == 0:
                out.append(b"554 5.5.1 Error: no valid recipients\r\n")
            else:
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
                self.scan_from = 0
                self.buf[:0] = b"\r\n"
        elif verb == b"EHLO":
            self.mail, self.rcpts = None, 0
            out.append(self.sink.ehlo_reply)
        elif verb == b"HELO":
            self.mail, self.rcpts = None, 0
            out.append(f"250 {self.sink.hostname}\r\n".encode())
        elif verb == b"RSET":
            self.mail, self.rcpts = None, 0
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"NOOP":
            out.append(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            out.append(b"221 2.0.0 Bye\r\n")
            self.closing = True
        elif verb == b"VRFY":
            out.append(b"252 2.0.0 Cannot VRFY user\r\n")
        elif line.upper() == b"XSTATS":
            out.append(f"250 {json.dumps(self.sink.stats.summary())}\r\n".encode())
        else:
            out.append(b"500 5.5.2 Error: command not recognized\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT`` to a tuple."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def install_uvloop() -> bool:
    """Use uvloop for new event loops when it is installed."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True


async def _serve(args: argparse.Namespace) -> None:
    sink = Sink(reject_rcpt=args.reject_rcpt, data_delay=args.data_delay_ms / 1000.0)
    host, port = await sink.start(*args.listen)
    print(f"sink listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.stats_interval or None)
            if args.stats_interval and not stop.is_set():
                print(json.dumps(sink.stats.summary()), flush=True)
    finally:
        await sink.close()
        print(json.dumps(sink.stats.summary()), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.sink", description=__doc__)
    parser.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 2525))
    parser.add_argument(
        "--reject-rcpt",
        metavar="SUBSTRING",
        help="answer 550 to RCPT addresses containing SUBSTRING",
    )
    parser.add_argument(
        "--data-delay-ms", type=float, default=0.0, help="delay each end-of-DATA reply"
    )
    parser.add_argument(
        "--stats-interval", type=float, default=0.0, help="print counters every N seconds"
    )
    args = parser.parse_args(argv)
    install_uvloop()
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
