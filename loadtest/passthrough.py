"""The baseline: a plain aiosmtpd relay on uvloop, as an engineer would write it in an afternoon.

aiosmtpd's ``SMTP`` protocol served straight from ``loop.create_server`` (no ``Controller``
thread), on a uvloop event loop.  ``handle_DATA`` relays the envelope and content to the
upstream with aiosmtplib and answers the client with the upstream's reply, so, like the gate,
it is a before-queue relay: the client's ``250`` means the upstream has the message.

Upstream connections: ``--upstream-mode reuse`` (default) keeps idle aiosmtplib connections in
a simple stack and reuses them; ``--upstream-mode connect`` opens one connection per message.
No policy, no limits beyond aiosmtpd's defaults, no recipient checks before DATA.

``python -m loadtest.passthrough --listen 127.0.0.1:10026 --upstream 127.0.0.1:2525``
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

import aiosmtplib
import uvloop
from aiosmtpd.smtp import SMTP, Envelope, Session

from loadtest.sink import parse_hostport

log = logging.getLogger("passthrough")


class RelayHandler:
    """aiosmtpd handler: relay each message to the upstream, answer with its reply."""

    def __init__(self, host: str, port: int, *, reuse: bool, helo: str) -> None:
        self.host = host
        self.port = port
        self.reuse = reuse
        self.helo = helo
        self.idle: list[aiosmtplib.SMTP] = []

    async def _connect(self) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            local_hostname=self.helo,
            start_tls=False,
            timeout=60,
        )
        await smtp.connect()
        return smtp

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        assert isinstance(content, bytes)
        assert envelope.mail_from is not None
        options = [o for o in envelope.mail_options if o.upper().startswith("BODY=")]
        smtp: aiosmtplib.SMTP | None = None
        keep = False
        try:
            smtp = self.idle.pop() if self.reuse and self.idle else await self._connect()
            _errors, message = await smtp.sendmail(
                envelope.mail_from, envelope.rcpt_tos, content, mail_options=options
            )
            keep = True
            return f"250 {message}"
        except aiosmtplib.SMTPRecipientsRefused as exc:
            keep = True
            first = exc.recipients[0]
            return f"{first.code} {first.message}"
        except aiosmtplib.SMTPResponseException as exc:
            keep = exc.code != 421
            return f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError) as exc:
            log.warning("upstream failed: %r", exc)
            return "451 4.4.1 Upstream unavailable, try again later"
        finally:
            if smtp is not None:
                if keep and self.reuse and smtp.is_connected:
                    self.idle.append(smtp)
                else:
                    await _close(smtp, polite=keep)


async def _close(smtp: aiosmtplib.SMTP, *, polite: bool) -> None:
    try:
        if polite and smtp.is_connected:
            await smtp.quit()
        else:
            smtp.close()
    except (aiosmtplib.SMTPException, OSError):
        smtp.close()


async def serve(
    listen: tuple[str, int], upstream: tuple[str, int], *, reuse: bool, hostname: str
) -> None:
    handler = RelayHandler(*upstream, reuse=reuse, helo=hostname)
    loop = asyncio.get_running_loop()

    def factory() -> SMTP:
        return SMTP(handler, hostname=hostname, data_size_limit=60 * 1000 * 1000)

    server = await loop.create_server(factory, *listen, backlog=1024)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("passthrough listening on %s:%s -> %s:%s", *listen, *upstream)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        for smtp in handler.idle:
            await _close(smtp, polite=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.passthrough", description=__doc__)
    parser.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 10026))
    parser.add_argument("--upstream", type=parse_hostport, default=("127.0.0.1", 2525))
    parser.add_argument("--upstream-mode", choices=("reuse", "connect"), default="reuse")
    parser.add_argument("--hostname", default="passthrough.loadtest.invalid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    kwargs: dict[str, Any] = {"reuse": args.upstream_mode == "reuse", "hostname": args.hostname}
    uvloop.run(serve(args.listen, args.upstream, **kwargs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
