"""``RedisStore``: the ``Store`` on Redis (a server, Redis Cluster, or the embedded child).

Responsible for: running one Lua script per operation (``mailguard/store/lua/*.lua``, loaded once
from package data, called by EVALSHA with a fallback to SCRIPT LOAD), bounding every call by
``[store] timeout``, reconnecting after the server comes back, and turning every failure (Redis
error, timeout, OSError) into ``StoreError`` naming the store (password hidden) and the operation.
Must never: read a clock for decisions, decide policy, or let a Redis exception escape.

URLs (``[store] url``), as redis-py parses them::

    redis://[[user]:[password]@]host[:port][/db]      TCP
    rediss://[[user]:[password]@]host[:port][/db]     TCP with TLS
    unix:///path/to/redis.sock[?db=0&password=...]   unix socket
    redis://host:port?cluster=1                      Redis Cluster (any node as the seed;
                                                     also rediss://; not with unix://)

``cluster=1`` (or ``true``/``yes``) is mailguard's own query parameter: it selects
``redis.asyncio.cluster.RedisCluster``; the key layout (``keys``) keeps each script's keys in one
hash slot.  Other query parameters go to redis-py unchanged.

Timeouts: every call fails with ``StoreError`` within ``timeout`` (retries included).  Through
redis-py (a cluster, and ``run``'s callers) the socket connect/read timeouts are ``timeout`` and
the call is bounded by ``asyncio.timeout``.  On a single server scripts and commands
(``run_script``, ``command``) go over the store's own pipelined connection
(``_DirectConnections``), which bounds them itself: each command fails as timed out when IT
has waited ``timeout`` for its reply (one timer per connection, see ``_Link``), so a server
pause longer than the timeout fails only the calls that waited that long, and the connection
is kept; it is dropped (and the next call connects again) only when nothing at all was
received for max(3 x ``timeout``, 5 s) while commands were waiting (half-open TCP, a dead
server).  Connecting (redis-py's handshake included), and retrying, run under
``asyncio.timeout``.  The connection speaks RESP2 whatever ``protocol=`` the URL gives (that
applies to redis-py's own connections only), so no server push can come unasked.

Retries: a call on a single server is retried twice after a few milliseconds only when its
command was certainly never written (no connection, or one found closed), so a down server is
reported within milliseconds; a command that may have run is never sent again (``StoreError``
'... may have run').  After a server restart the next call reconnects without an error if the
event loop has already seen the old connection close (an idle connection: the next loop
iteration), or, over a unix socket, also when it has not (the write fails with EPIPE: not
sent, retried).  Over TCP a call issued in the same loop iteration as the restart became
visible can be written to the closed connection before its end is read: it then fails with
'may have run', and the next call reconnects.  The scripts are replay-safe all the same
(each call carries a unique id: a repeated ``auth_failure`` does not count twice), as the
cluster client (redis-py) does retry.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import math
import random
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import hiredis as _hiredis  # a dependency (redis[hiredis]): replies are parsed by it
from redis._parsers.base import BaseParser
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import (
    InvalidResponse,
    NoScriptError,
    RedisClusterException,
    RedisError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from redis.maint_notifications import MaintNotificationsConfig as _MaintConfig
except ImportError:  # pragma: no cover - redis-py without maintenance notifications
    _MaintConfig = None  # type: ignore[assignment,misc]

from mailguard.store.base import StoreError
from mailguard.store.keys import Keys

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis older than 2.1
    _hiredis_pack = None  # type: ignore[assignment]

T = TypeVar("T")

_SCHEMES = ("redis", "rediss", "unix")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})
_SECRET_PARAMS = frozenset({"password", "ssl_password"})
_RETRIES = 2
MAX_CONNECTIONS = 64


@cache
def lua_script(name: str) -> str:
    """The text of ``mailguard/store/lua/{name}.lua`` (package data, read once)."""
    return resources.files("mailguard.store").joinpath("lua", f"{name}.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class StoreURL:
    """A parsed ``[store] url``: what redis-py gets, whether it is a cluster, and what we show."""

    url: str  # for redis-py, mailguard's own parameters removed
    cluster: bool
    display: str  # password replaced by ***

    @classmethod
    def parse(cls, url: str) -> StoreURL:
        """Parse and check ``url``; ``ValueError`` with a user-facing text if it is not usable."""
        base, _, query = url.partition("?")
        scheme = urlsplit(base).scheme
        if scheme not in _SCHEMES:
            raise ValueError(
                f"[store] url {redact_url(url)!r}: must be redis://, rediss://, unix:// or"
                ' "embedded"'
            )
        params = parse_qsl(query, keep_blank_values=True)
        cluster = False
        for name, value in params:
            if name == "cluster":
                if value.lower() not in _TRUE | _FALSE:
                    raise ValueError(f"[store] url: cluster={value!r} must be 1 or 0")
                cluster = value.lower() in _TRUE
        if cluster and scheme == "unix":
            raise ValueError("[store] url: cluster=1 needs redis:// or rediss://, not unix://")
        rest = [(n, v) for n, v in params if n != "cluster"]
        clean = f"{base}?{urlencode(rest)}" if rest else base
        return cls(url=clean, cluster=cluster, display=redact_url(url))


def redact_url(url: str) -> str:
    """``url`` with any password (user-info or ``password=`` parameter) replaced by ``***``."""
    base, sep, query = url.partition("?")
    scheme, rest = base.split("://", 1) if "://" in base else ("", base)
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{host}"
    base = f"{scheme}://{netloc}{slash}{path}" if scheme else f"{netloc}{slash}{path}"
    if sep:
        pairs = [p.partition("=") for p in query.split("&")]
        query = "&".join(
            f"{n}{eq}***" if n in _SECRET_PARAMS and eq else f"{n}{eq}{v}" for n, eq, v in pairs
        )
    return f"{base}{sep}{query}"


_last_float: tuple[float, str] = (math.nan, "")  # the last value float_arg formatted


def float_arg(name: str, value: float) -> str:
    """``value`` (seconds, a time or a window) as a script or command argument: the shortest
    text that round-trips, so Redis (C or Lua's ``tonumber``) reads back the same double.
    ``ValueError`` naming ``name`` if it is not finite.  The last value's text is kept: a
    message's calls pass the same ``now`` more than once (formatting a double costs ~1 us)."""
    global _last_float
    value = float(value)
    last = _last_float
    if value == last[0]:  # never for NaN; 0.0 == -0.0, which Redis compares as equal too
        return last[1]
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, not {value!r}")
    text = repr(value)
    _last_float = (value, text)
    return text


def _window_arg(window: float) -> str:
    if not window > 0:
        raise ValueError(f"window must be positive, not {window!r}")
    return float_arg("window", window)


_PACKABLE = frozenset({str, bytes, int})
_FAST_CLASSES: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def fast_packing(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with commands packed by hiredis (C) instead of redis-py's Python loop.

    redis-py's asyncio connections pack every command in Python (about 40 us for a script call
    with 40 arguments, the biggest part of a call's client CPU); hiredis, already installed as
    redis-py's parser, packs the same bytes in about 3 us.  Used only for what both pack
    identically: a one-word command name and arguments of type str, bytes or int, with
    redis-py's default utf-8/strict encoding; anything else goes to redis-py's own packer.
    """
    if _hiredis_pack is None:
        return cls
    found = _FAST_CLASSES.get(cls)
    if found is not None:
        return found
    pack = _hiredis_pack

    class FastPacking(cls):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0] if args else None
            if (
                type(first) is str
                and " " not in first
                and frozenset(map(type, args)) <= _PACKABLE
                and self.encoder.encoding == "utf-8"
                and self.encoder.encoding_errors == "strict"
            ):
                return [pack(args)]
            return super().pack_command(*args)  # type: ignore[no-any-return]

    FastPacking.__name__ = FastPacking.__qualname__ = f"FastPacking{cls.__name__}"
    _FAST_CLASSES[cls] = FastPacking
    return FastPacking


def _pack_args(args: tuple[Any, ...]) -> bytes | None:
    """``args`` packed by hiredis when it packs them as redis-py would, else ``None``."""
    if _hiredis_pack is None or not frozenset(map(type, args)) <= _PACKABLE:
        return None
    return _hiredis_pack(args)  # type: ignore[no-any-return]


class _NotSent(Exception):
    """A command that was never written to the server (it cannot have run): safe to retry."""


class _MayHaveRun(RedisConnectionError):
    """The connection failed after the command was written: it may have run, never retry it."""


class _ConnectTimedOut(RedisConnectionError, RedisTimeoutError):
    """Connecting took the store's timeout: nothing was sent, a caller with time left retries
    on a new connection; a timeout (``StoreError`` '... timed out') if it is the last try."""


class _TimedOut(_MayHaveRun, RedisTimeoutError):
    """No reply to this command within the store's timeout (it may still run; the link stays)."""


class _Stalled(_MayHaveRun, RedisTimeoutError):
    """Nothing received for ``dead`` seconds with commands outstanding: the link was dropped."""


_NO_REPLY = object()  # hiredis.Reader.gets(): no complete reply buffered yet
_PUSH: type = getattr(_hiredis, "PushNotification", _NotSent)  # a RESP3 push (never a reply)
_READ_SIZE = 65536
_TIMER_SLACK = 0.001  # an event loop's timer may fire up to a millisecond early
_DEAD_MIN = 5.0  # a link is dead after max(3 x the store timeout, this) with nothing received


class _Link:
    """One connection on which the commands of concurrent callers are pipelined.

    Commands submitted in one event-loop iteration are written in ONE write, at the end of
    that iteration (``loop.call_soon``), and a single reader task hands out the replies in the
    order the commands were written: Redis answers the commands of a connection in order, so
    the n-th reply read is the n-th command's.  Invariants:

    * ``sent`` holds a future per command written and not yet answered, oldest first; a reply
      always goes to ``sent``'s head, and a future is only ever resolved by its own reply, by
      its own timeout, or by the link failing.  A caller that gives up (its timeout,
      cancellation) leaves its entry in place: its reply is still read, then dropped.  RESP3
      push messages (the link speaks RESP2, but a command such as ``HELLO 3`` could switch
      it) are skipped: they never take a command's reply.  Nothing else is ever read.
    * A command whose caller gave up before its batch was written is not written at all.
    * When the link fails (connection lost, protocol error, an unexpected reply, ``dead``, or
      ``close``) it is never used again: futures in ``sent`` fail with ``ConnectionError`` (the
      command may have run: never retried), futures not yet written fail with ``_NotSent``
      (retried on a fresh link).

    Timeouts (one timer per link, no timer per command): each command's future fails with
    ``_TimedOut`` (a timeout: ``StoreError`` '... timed out') once it has waited ``stall``
    seconds (the store's timeout) after its write; its entry stays in ``sent``, so its late
    reply is read and dropped, and later commands keep waiting for their own replies, each
    until its own deadline.  A server pause longer than the timeout (another client's slow
    script, a fork or fsync stall) so fails only the commands that really waited that long.
    The link itself is dropped (``_Stalled`` for what is left in ``sent``; the next call
    connects again) only when some command has timed out and nothing at all has been received
    for ``dead`` seconds (``max(3 x stall, _DEAD_MIN)``): a half-open TCP connection or a dead
    server.  The timer is set for the oldest command not yet timed out (or the dead deadline)
    and re-set when it fires.  An idle half-open TCP link is found by redis-py's TCP keepalive
    (on by default: 30 s idle, 3 probes 5 s apart) or by the first commands sent on it.
    """

    def __init__(self, conn: AbstractConnection, stall: float, dead: float) -> None:
        self.conn = conn
        self.loop = asyncio.get_running_loop()
        self.stall = stall
        self.dead = dead
        self.failed = False
        self._stream: asyncio.StreamReader = conn._reader  # type: ignore[assignment]
        self._writer: asyncio.StreamWriter = conn._writer  # type: ignore[assignment]
        self._parser = _hiredis_reader(conn)
        self._sent: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._expired = 0  # the oldest entries of sent whose commands timed out (see above)
        self._last_read = self.loop.time()
        self._queued: list[tuple[bytes, asyncio.Future[Any]]] = []
        self._watch: asyncio.TimerHandle | None = None  # None only while sent is empty
        self._task = self.loop.create_task(self._read_replies())

    def submit(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue one packed command; the future gets its reply (a ``ResponseError`` instance
        for an error reply), ``_TimedOut``, or the exception that ended the link."""
        future = self.loop.create_future()
        if not self._queued:
            self.loop.call_soon(self._flush)
        self._queued.append((packed, future))
        return future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        batch = [(packed, future) for packed, future in queued if not future.done()]
        if not batch:
            return
        transport = self._writer.transport
        if self.failed or transport.is_closing():
            for _, future in batch:
                _fail(future, _NotSent("connection closed before the command was written"))
            self._fail(RedisConnectionError("Connection closed by server."))
            return
        self._writer.write(b"".join(packed for packed, _ in batch))
        if transport.is_closing():  # the write itself failed: nothing of it was sent
            for _, future in batch:
                _fail(future, _NotSent("connection failed when the command was written"))
            self._fail(RedisConnectionError("Connection failed on write."))
            return
        now = self.loop.time()
        self._sent.extend((future, now) for _, future in batch)
        # The timer is set for an older command's deadline, unless nothing was outstanding or
        # only timed-out commands were (it is then set for the dead deadline, maybe later).
        due, watch = now + self.stall, self._watch
        if watch is None or watch.when() > due:
            if watch is not None:
                watch.cancel()
            self._watch = self.loop.call_at(due, self._check)

    def _check(self) -> None:
        """The watch timer: time out the commands that waited ``stall``, drop the link if it is
        dead, and set the timer for the next of these deadlines."""
        self._watch = None
        sent = self._sent
        if self.failed or not sent:
            return
        now = self.loop.time() + _TIMER_SLACK
        stall = self.stall
        expired = self._expired
        due: float | None = None
        for future, written in itertools.islice(sent, expired, None):
            if written + stall > now:
                due = written + stall
                break
            expired += 1
            if not future.done():
                future.set_exception(_TimedOut(f"no reply within {stall:g}s"))
        self._expired = expired
        if expired:  # timed-out commands still wait for their replies: is anything coming?
            dead_at = max(self._last_read, sent[0][1]) + self.dead
            if dead_at <= now:
                self._fail(_Stalled(f"nothing received for {self.dead:g}s: connection dropped"))
                return
            if due is None or dead_at < due:
                due = dead_at
        assert due is not None
        self._watch = self.loop.call_at(due, self._check)

    async def _read_replies(self) -> None:
        parser, stream, sent = self._parser, self._stream, self._sent
        gets, popleft, clock, push = parser.gets, sent.popleft, self.loop.time, _PUSH
        try:
            while True:
                data = await stream.read(_READ_SIZE)
                if not data:
                    raise RedisConnectionError("Connection closed by server.")
                self._last_read = clock()
                parser.feed(data)
                waiting = len(sent)
                while (reply := gets()) is not _NO_REPLY:
                    if type(reply) is push:  # RESP3 out-of-band data: no command's reply
                        continue
                    if not sent:
                        raise RedisConnectionError("a reply to no command: connection dropped")
                    future, _ = popleft()
                    if not future.done():
                        future.set_result(reply)
                if self._expired:  # the oldest answered first: timed-out ones among them
                    self._expired = max(0, self._expired - (waiting - len(sent)))
        except asyncio.CancelledError:
            self._fail(RedisConnectionError("Connection closed."))
            raise
        except Exception as exc:  # OSError, a protocol error, ...: the link is out of step
            error = exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(exc)
            self._fail(error)

    def _fail(self, exc: RedisConnectionError | RedisTimeoutError) -> None:
        if self.failed:
            return
        self.failed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        sent, self._sent = self._sent, collections.deque()
        self._expired = 0
        failure = _Stalled if isinstance(exc, _Stalled) else _MayHaveRun
        for future, _ in sent:
            _fail(future, failure(f"{exc} (the command may have run)"))
        queued, self._queued = self._queued, []
        for _, future in queued:
            _fail(future, _NotSent(str(exc)))
        if self._task is not asyncio.current_task():
            self._task.cancel()
        self._writer.transport.abort()  # nothing more is written or read on it
        # redis-py's own bookkeeping: the connection is not connected any more
        self.conn._close()  # type: ignore[no-untyped-call]

    def abort(self, reason: str) -> None:
        """Fail the link now (see ``_fail``): the socket is closed at once."""
        self._fail(RedisConnectionError(reason))

    async def close(self) -> None:
        self._fail(RedisConnectionError("the store is closed"))
        await self.conn.disconnect(nowait=True)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _hiredis_reader(conn: AbstractConnection) -> Any:
    """A reply parser configured as redis-py's own for ``conn`` (error replies as the same
    exception classes, returned not raised), answering ``_NO_REPLY`` while a reply is
    incomplete."""
    kwargs: dict[str, Any] = {
        "protocolError": InvalidResponse,
        "replyError": BaseParser.parse_error,
        "notEnoughData": _NO_REPLY,
    }
    if conn.encoder.decode_responses:
        kwargs["encoding"] = conn.encoder.encoding
        kwargs["errors"] = conn.encoder.encoding_errors
    return _hiredis.Reader(**kwargs)


class _DirectConnections:
    """Commands on a single server without redis-py's client layers (see ``RedisStore.script``).

    redis-py's ``Redis.execute_command`` costs about 0.1 ms of CPU per script call on top of
    the socket work: its ``Retry`` wrapper, the deprecation wrapper of ``evalsha``, a connection
    pool that records metrics and takes a lock per call, a task per socket write
    (``asyncio.wait_for`` for the write timeout) and a timeout context per read.  Here every
    command goes over ONE connection (a ``_Link``) with automatic pipelining: the commands that
    concurrent sessions issue in one event-loop iteration are written in one write and their
    replies read by one reader task, in order.  That saves a write, a wake-up of redis-server
    and most of redis-py's per-call Python for all but the first command of a batch (measured
    with ``loadtest.run``, 2 KB x 1 recipient, policy enforced, 4 interleaved runs: the gate's
    CPU per message 1.08 -> 0.76 ms, redis-server's 0.27 -> 0.17 ms).  The connection is
    redis-py's own (same class and URL options: TLS, unix sockets, AUTH, db, client name,
    connect timeout, TCP keepalive; its handshake) but always RESP2 and without redis-py's
    maintenance notifications, made without a socket read/write timeout: ``call`` and
    ``script`` bound every call by the store's timeout (the link's watch, see ``_Link``, and
    ``asyncio.timeout`` while retrying), and the connect is bounded by the same timeout (a
    handshake that is never answered fails the calls waiting on it, the next call connects
    anew), so ``RedisStore.run_script`` needs no timer per call.  See ``_Link`` for how no
    reply can reach the wrong caller, and when a link is given up.

    Retries: a command is retried (``_RETRIES`` times, after a few milliseconds, on a fresh
    connection) only when it was certainly never written: the connection could not be made,
    or it was found closed before or by the write.  A command written on a connection that
    then failed may have run, so it is never repeated (``ConnectionError``, ``StoreError`` for
    the caller).  A connection that the server closed while idle (e.g. a restart) is noticed by
    the reader task, so the next call connects again without an error (see the module
    docstring for the one loop iteration in which that is not so over TCP).  A connect that
    takes the timeout is not sent anything: a caller with time left retries on a new one.

    ``close`` during a connect: the callers waiting on it get ``StoreError`` (closed), and a
    connection that completes as the store closes is closed, not kept.
    """

    def __init__(self, pool: Any, backoff_cap: float, stall: float = 2.0) -> None:
        self._class = pool.connection_class
        # RESP2 whatever the URL says (``?protocol=3``): no server push can come unasked (such
        # as redis-py's maintenance notifications, on by default for RESP3 over TCP), and the
        # scripts' replies have the shapes their parsers expect.
        self._kwargs = {**pool.connection_kwargs, "socket_timeout": None, "protocol": 2}
        if "maint_notifications_config" in self._kwargs and _MaintConfig is not None:
            self._kwargs["maint_notifications_config"] = _MaintConfig(enabled=False)
            self._kwargs["maint_notifications_pool_handler"] = None
        self._backoff_cap = backoff_cap
        self._stall = stall
        self._dead = max(3 * stall, _DEAD_MIN)
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False

    def make(self) -> AbstractConnection:
        return self._class(**self._kwargs)  # type: ignore[no-any-return]

    async def _new_link(self) -> _Link:
        """A connected link; redis-py's whole connect (TCP or unix connect, TLS, and its
        handshake: HELLO/AUTH, CLIENT SETNAME, SELECT) bounded by the store's timeout, so a
        handshake that is never answered cannot hold up the calls that come after it."""
        conn = self.make()
        try:
            async with asyncio.timeout(self._stall):
                await conn.connect()  # type: ignore[no-untyped-call]
        except TimeoutError as exc:
            await conn.disconnect(nowait=True)
            raise _ConnectTimedOut(f"connecting timed out after {self._stall:g}s") from exc
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        return _Link(conn, self._stall, self._dead)

    async def link(self) -> _Link:
        """The live link of this event loop, connecting one if there is none (one connect at a
        time: concurrent callers wait for the same one)."""
        link = self._link
        if link is not None and not link.failed and link.loop is asyncio.get_running_loop():
            return link
        if self._closed:
            raise RedisConnectionError("the store is closed")
        connecting = self._connecting
        if connecting is None or connecting.get_loop() is not asyncio.get_running_loop():
            connecting = self._connecting = asyncio.get_running_loop().create_task(self._new_link())
            connecting.add_done_callback(self._connected)
        try:
            return await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The shared connect was cancelled (``close``), not this caller: a store error.
            task = asyncio.current_task()
            if connecting.cancelled() and task is not None and not task.cancelling():
                raise RedisConnectionError("the store is closed") from None
            raise

    def _connected(self, task: asyncio.Task[_Link]) -> None:
        if self._connecting is task:
            self._connecting = None
        if task.cancelled() or task.exception() is not None:
            return
        link = task.result()
        if self._closed:  # closed while this connect finished: do not keep it open
            link.abort("the store is closed")
        else:
            self._link = link

    async def execute(self, args: tuple[Any, ...]) -> Any:
        """The reply to one command (``ResponseError`` for an error reply), unbounded in time
        while it connects (callers bound it: ``RedisStore.run``, or ``call``)."""
        return await self._execute(self._pack(args))

    def _pack(self, args: tuple[Any, ...]) -> bytes:
        packed = _pack_args(args)
        if packed is None:
            packed = b"".join(self.make().pack_command(*args))
        return packed

    async def _execute(self, packed: bytes, attempt: int = 0) -> Any:
        """``execute``; ``attempt`` > 0: a retry (after the backoff) of a command not sent."""
        while True:
            if attempt:
                await asyncio.sleep(
                    min(self._backoff_cap, 0.005 * 2 ** (attempt - 1)) * random.random()
                )
            try:
                reply = await (await self.link()).submit(packed)
            except _MayHaveRun:
                raise
            except (_NotSent, RedisConnectionError, OSError) as exc:
                if attempt >= _RETRIES:
                    if isinstance(exc, _NotSent):
                        raise RedisConnectionError(str(exc)) from exc
                    raise
                attempt += 1
                continue
            if isinstance(reply, RedisError):
                raise reply
            return reply

    async def call(self, args: tuple[Any, ...]) -> Any:
        """``execute`` bounded by the store's timeout (``stall``) without a timer of its own
        when the link is up: a written command is answered, or failed as timed out
        (``_TimedOut``) once it waited ``stall``, by the link's watch (``_Link``).  Connecting,
        and retrying a command that was not sent, run under ``asyncio.timeout`` until the same
        deadline."""
        packed = self._pack(args)
        loop = asyncio.get_running_loop()
        link = self._link
        if link is None or link.failed or link.loop is not loop:
            async with asyncio.timeout(self._stall):
                return await self._execute(packed)
        start = loop.time()
        try:
            reply = await link.submit(packed)
        except _NotSent:
            async with asyncio.timeout_at(start + self._stall):
                return await self._execute(packed, 1)
        if isinstance(reply, RedisError):
            raise reply
        return reply

    async def script(self, sha: str, source: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA, loading the script first if the server does not have it (NOSCRIPT); bounded
        by the store's timeout as a whole (``call``)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        start = asyncio.get_running_loop().time()
        try:
            return await self.call(command)
        except NoScriptError:
            async with asyncio.timeout_at(start + self._stall):
                await self.execute(("SCRIPT", "LOAD", source))
                return await self.execute(command)

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        link, self._link = self._link, None
        if link is not None:
            await link.close()


class LuaScript(Protocol):
    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any: ...


class _DirectScript:
    """A script of a single-server store: ``await script(keys=[...], args=[...])`` runs it by
    EVALSHA (``_DirectConnections.script``); ``RedisStore.run_script`` uses its ``sha`` and
    ``source`` itself."""

    __slots__ = ("_direct", "sha", "source")

    def __init__(self, direct: _DirectConnections, source: str) -> None:
        self._direct = direct
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()

    def __call__(
        self, keys: Sequence[str] = (), args: Sequence[Any] = ()
    ) -> Coroutine[Any, Any, Any]:
        return self._direct.script(self.sha, self.source, keys, args)


class RedisStore:
    """The ``Store`` protocol on Redis or Redis Cluster; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        key_prefix: str = "mg",
        max_connections: int = MAX_CONNECTIONS,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Connect lazily to ``url``; ``ValueError`` if the URL or prefix is unusable.

        At most ``max_connections`` calls made through ``run`` are in flight (per node on a
        cluster); further calls wait for a free connection within their timeout.  On a single
        server ``run_script`` and ``command`` pipeline every call on one connection, unbounded
        in number (the sessions bound them).  ``on_close`` runs after the
        connections are closed (the factory stops an embedded redis-server with it).
        """
        if not timeout > 0:
            raise ValueError(f"[store] timeout must be positive, not {timeout!r}")
        parsed = StoreURL.parse(url)
        self.url = parsed.display
        self.cluster = parsed.cluster
        self.timeout = timeout
        self.keys = Keys(key_prefix)
        self._on_close = on_close
        self._closed = False
        self._slots = asyncio.Semaphore(max_connections)
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(
                ExponentialWithJitterBackoff(base=0.005, cap=min(0.05, timeout / 10)), _RETRIES
            ),
            "client_name": "mailguard",
            "max_connections": max_connections,
        }
        # redis-py's client, for the modules that issue plain commands; always inside ``run``.
        self.client: Redis | RedisCluster
        self._direct: _DirectConnections | None = None
        try:
            if parsed.cluster:
                # No full reinitialization after every 5th MOVED: redis-py does it by aclose(),
                # which closes connections other tasks are using, and a script already sent on
                # one runs again on the retry.  A MOVED still updates the slot it names.
                self.client = RedisCluster.from_url(parsed.url, reinitialize_steps=0, **options)
            else:
                self.client = Redis.from_url(parsed.url, **options)
                pool = self.client.connection_pool
                pool.connection_class = fast_packing(pool.connection_class)
                # redis-py passes unknown URL parameters to the connection class, which would
                # fail with TypeError on first use: build one (unconnected) now to find out.
                self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
                self._direct = _DirectConnections(pool, min(0.05, timeout / 10), timeout)
        except (ValueError, TypeError, RedisError, RedisClusterException) as exc:
            raise ValueError(f"[store] url {self.url!r}: {exc}") from exc
        self._auth_failure = self.script(lua_script("auth_failure"))
        self._auth_failures_count = self.script(lua_script("auth_failures_count"))

    def script(self, source: str) -> LuaScript:
        """A Lua script bound to this store: ``await script(keys=[...], args=[...])``.

        EVALSHA with a fallback to loading it (SCRIPT LOAD) on a single server, sent on the
        store's own connections (``_DirectConnections``).  On Redis Cluster every call is an
        EVAL instead (routed by the first key's slot, no NOSCRIPT round trip).  The
        broken connections once blamed on redis-py's EVALSHA fallback there came from calls
        routed before the cluster client was initialized; see ``run``.
        """
        if self.cluster:
            redis = self.client

            async def run(keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
                return await redis.eval(source, len(keys), *keys, *args)

            return run
        assert self._direct is not None
        return _DirectScript(self._direct, source)

    # ``command`` and ``run_script`` are plain functions returning the coroutine to await: one
    # coroutine frame less per store call on a single server (a few per message).

    def command(self, operation: str, *args: Any) -> Coroutine[Any, Any, Any]:
        """One Redis command (``await command("holds", "MGET", k1, k2)``), bounded like every
        call (``StoreError`` on failure or timeout): on a single server over the store's own
        connection (``run_script``), on a cluster through redis-py (routed by the keys' slot)."""
        direct = self._direct
        if direct is None:
            redis = self.client
            return self.run(operation, lambda: redis.execute_command(*args))
        return self._on_link(operation, direct.call, args)

    def run_script(
        self, operation: str, script: LuaScript, keys: Sequence[str], args: Sequence[Any]
    ) -> Coroutine[Any, Any, Any]:
        """``run(operation, lambda: script(keys=keys, args=args))`` for a script of this store,
        to await.

        On a single server the call is not wrapped in ``asyncio.timeout`` and the semaphore:
        the pipelined connection bounds it by the same timeout itself (``_DirectConnections.
        call``: one timer per connection instead of one per call, about 5 us of CPU per call
        less) and needs no connection per call in flight.  Failures and timeouts are
        ``StoreError`` as with ``run``."""
        direct = self._direct
        if direct is None:
            return self.run(operation, lambda: script(keys=keys, args=args))
        if type(script) is _DirectScript:
            return self._on_link(operation, direct.script, script.sha, script.source, keys, args)
        return self._on_link(operation, script, keys, args)

    async def _on_link(self, operation: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """``call(*args)``, a call on the single server's pipelined connection (which bounds its
        time itself), with every failure as ``StoreError`` as with ``run``."""
        if self._closed:
            raise StoreError(f"store {self.url}: {operation}: the store is closed")
        try:
            return await call(*args)
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._timed_out(operation) from exc
        except (RedisError, OSError) as exc:
            raise self._failed(operation, exc) from exc

    def _timed_out(self, operation: str) -> StoreError:
        return StoreError(f"store {self.url}: {operation} timed out after {self.timeout:g}s")

    def _failed(self, operation: str, exc: BaseException) -> StoreError:
        return StoreError(f"store {self.url}: {operation} failed: {exc}")

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r}{', cluster' if self.cluster else ''})"

    async def run(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """Run one store call bounded by the timeout; every failure becomes ``StoreError``."""
        if self._closed:
            raise StoreError(f"store {self.url}: {operation}: the store is closed")

        try:
            async with asyncio.timeout(self.timeout):  # no extra task, unlike wait_for
                async with self._slots:
                    if self.cluster:
                        # redis-py's RedisCluster routes a command issued before its lazy first
                        # initialize() (or after an internal reset) to a random node, which
                        # answers MOVED; so load the slot map first (a no-op once loaded, one
                        # load at a time).
                        await self.client.initialize()
                    return await call()
        except (TimeoutError, RedisTimeoutError) as exc:
            raise self._timed_out(operation) from exc
        except (RedisError, RedisClusterException, OSError) as exc:
            raise self._failed(operation, exc) from exc

    async def ping(self) -> None:
        await self.run("ping", self.client.ping)

    async def note_auth_failure(self, client: str, now: float, window: float) -> int:
        key = self.keys.auth_failures(client)
        args = [float_arg("now", now), _window_arg(window), uuid.uuid4().hex]
        result = await self.run_script("note_auth_failure", self._auth_failure, [key], args)
        return int(result)

    async def auth_failures(self, client: str, now: float, window: float) -> int:
        key = self.keys.auth_failures(client)
        args = [float_arg("now", now), _window_arg(window)]
        result = await self.run_script("auth_failures", self._auth_failures_count, [key], args)
        return int(result)

    async def close(self) -> None:
        """Close the connections, then run ``on_close`` (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._direct is not None:
                await self._direct.close()
            await self.client.aclose()
        finally:
            if self._on_close is not None:
                await self._on_close()
