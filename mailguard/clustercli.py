"""``mailguard cluster``: assign RFC 5322 files to campaigns, exactly as the gate does.

Responsible for: reading messages (files in the order given, a directory's files in name order,
mbox files message by message) and printing ``NAME<TAB>CLUSTER_ID`` for each, using the gate's
own fingerprint and the store's clustering script on a private embedded store (a temporary
state directory, so runs do not share state with a gate or each other).
Must never: write anything but standard output and its temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mailguard.config.schema import CampaignLimits, StoreConfig
from mailguard.core.fingerprint import fingerprint
from mailguard.store.base import StoreError
from mailguard.store.clustering import ClusterStore
from mailguard.store.factory import open_store
from mailguard.store.redis_store import RedisStore


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "cluster",
        help="print FILE<TAB>CLUSTER_ID for messages, with the gate's fingerprint and clustering",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--customer", default="cli", help="customer id the messages belong to")
    parser.add_argument(
        "--window",
        type=float,
        default=max(CampaignLimits().bulk_window, CampaignLimits().mailbomb_window),
        help="seconds a campaign is remembered after its last message (default: 24h)",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="message files, directories, mboxes")
    parser.set_defaults(func=run)


def messages(paths: list[Path]) -> Iterator[tuple[str, bytes]]:
    """(name, message bytes) in order; an mbox's messages are named ``FILE:N`` (1-based)."""
    for path in paths:
        if path.is_dir():
            yield from messages(sorted(p for p in path.iterdir() if p.is_file()))
        elif _is_mbox(path):
            for i, msg in enumerate(mailbox.mbox(path, create=False), start=1):
                yield f"{path}:{i}", msg.as_bytes()
        else:
            yield str(path), path.read_bytes()


def _is_mbox(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(5) == b"From "


async def _run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="mailguard-cluster-") as state:
        store = await open_store(StoreConfig(), Path(state))
        try:
            assert isinstance(store, RedisStore)
            clusters = ClusterStore(store, args.window)
            for name, data in messages(args.paths):
                cluster = await clusters.assign(args.customer, fingerprint(data), time.time())
                print(f"{name}\t{cluster}", flush=True)
        finally:
            await store.close()
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_run(args))
    except FileNotFoundError as exc:
        print(f"mailguard cluster: {exc.filename}: no such file", file=sys.stderr)
        return 2
    except (IsADirectoryError, PermissionError, mailbox.Error) as exc:
        print(f"mailguard cluster: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"mailguard cluster: store: {exc}", file=sys.stderr)
        return 1
