"""``open_store``: the ``Store`` a ``[store]`` section asks for.

Responsible for: choosing between the embedded redis-server (``url = "embedded"``: a private
child in ``{state_dir}/redis`` that the returned store owns, starts again if it dies, and stops
on ``close()``) and a
Redis server or cluster at a URL (see ``redis_store`` for the URL forms, ``?cluster=1`` included).
``open_admin_store`` is the same for admin commands, attaching to a running gate's embedded
redis-server instead of starting a second one.
Must never: keep a second reference to the store or the child.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from mailguard.config.schema import StoreConfig
from mailguard.store.embedded import EmbeddedRedis
from mailguard.store.redis_store import RedisStore

EMBEDDED = "embedded"


async def open_store(config: StoreConfig, state_dir: Path) -> RedisStore:
    """Open the configured store.

    For ``embedded`` this starts the redis-server child (and waits until it answers), raising
    ``EmbeddedRedisError`` (a ``StoreError``) with the reason if it cannot.  A URL store connects
    lazily: a server that is down now gives ``StoreError`` on each call until it is back.
    ``ValueError`` if the URL is unusable.
    """
    if config.url != EMBEDDED:
        return attach_store(config, None)
    embedded = EmbeddedRedis(state_dir, config.redis_server)
    await embedded.start()
    watchdog = asyncio.get_running_loop().create_task(embedded.keep_running())

    async def stop() -> None:
        watchdog.cancel()
        try:
            await watchdog
        except asyncio.CancelledError:
            pass
        except Exception:  # the watchdog failed: the child must be stopped all the same
            logging.getLogger("mailguard.store").exception("embedded redis-server watchdog")
        await embedded.stop()

    try:
        return RedisStore(
            embedded.url,
            timeout=config.timeout,
            key_prefix=config.key_prefix,
            on_close=stop,
        )
    except BaseException:
        await stop()
        raise


def attach_store(config: StoreConfig, url: str | None) -> RedisStore:
    """A store on a redis-server this process does not own: ``url`` (e.g. a running
    embedded redis-server: a gate worker's main process's, or a gate's for an admin command),
    or with ``url`` None the configured URL."""
    return RedisStore(url or config.url, timeout=config.timeout, key_prefix=config.key_prefix)


async def open_admin_store(config: StoreConfig, state_dir: Path) -> RedisStore:
    """The store for an admin command run beside a gate.

    For ``embedded``, the running gate's redis-server when it answers (a second embedded child
    on the same state directory is refused), else a new child; otherwise as ``open_store``.
    """
    from mailguard.store.base import StoreError

    if config.url == EMBEDDED:
        running = EmbeddedRedis(state_dir, config.redis_server)
        if running.socket_path.exists():
            attached = attach_store(config, running.url)
            try:
                await attached.ping()
            except StoreError:
                await attached.close()
            else:
                return attached
    return await open_store(config, state_dir)
