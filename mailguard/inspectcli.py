"""``mailguard inspect CUSTOMER``: a customer's live campaigns and recent refusals.

Responsible for: printing, for an admin, each campaign with a committed send within the
customer's bulk window (distinct recipients, last send, whether it is bulk) and the last
refusals of the AUP rules with their reasons and numbers.
Must never: change state.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from mailguard.config.load import ConfigError, load_config
from mailguard.store.base import StoreError
from mailguard.store.factory import open_admin_store
from mailguard.store.inspection import Inspection

DEFAULT_CONFIG = Path("/etc/mailguard/mailguard.toml")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "inspect", help="show a customer's live campaigns and recent refusals"
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    parser.add_argument("--refusals", type=int, default=20, help="how many refusals to show")
    parser.add_argument("customer", help="customer id")
    parser.set_defaults(func=run)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


async def _show(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    customer = next((c for c in config.customers if c.id == args.customer), None)
    if customer is None:
        known = ", ".join(c.id for c in config.customers) or "none"
        print(
            f"mailguard inspect: no [[customer]] {args.customer!r} in {args.config} "
            f"(known: {known})",
            file=sys.stderr,
        )
        return 2
    limits = customer.limits(config.policy)
    store = await open_admin_store(config.store, config.server.state_dir)
    try:
        view = Inspection(store)
        now = time.time()
        campaigns = await view.campaigns(customer.id, now, limits.bulk_window)
        refusals = await view.refusals(customer.id, args.refusals)
    finally:
        await store.close()
    server = "yes" if customer.bulk_sender else "some networks" if customer.bulk_networks else "no"
    print(
        f"customer {customer.id}: bulk past {limits.bulk_recipients} recipients, "
        f"mail bomb past {limits.mailbomb_messages} messages; list server: {server}"
    )
    print(f"\ncampaigns with mail in the last {limits.bulk_window / 3600:g}h: {len(campaigns)}")
    if campaigns:
        print(f"{'campaign':<18} {'recipients':>10}  {'bulk':<5} {'last send':<21} bulk until")
        for c in campaigns:
            bulk = (
                "yes" if c.bulk_until is not None or c.recipients > limits.bulk_recipients else "no"
            )
            print(
                f"{c.campaign:<18} {c.recipients:>10}  {bulk:<5} {_when(c.last_send):<21} "
                f"{_when(c.bulk_until)}"
            )
    print(f"\nrecent refusals: {len(refusals)}")
    for r in refusals:
        print(f"{_when(r.get('ts'))}  {r.get('rule')}  {r.get('reply')}")
        print(
            f"    tx={r.get('tx')} from=<{r.get('mail_from')}> campaign={r.get('campaign')} "
            f"numbers={r.get('numbers')}"
        )
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_show(args))
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"mailguard inspect: store: {exc}", file=sys.stderr)
        return 1
