"""``mailguard optin add|import|export|revoke|show``: opt-in records from the command line.

Responsible for: the ``optin`` subcommand tree (``register`` adds it to ``mailguard``'s
parser), turning options and files into calls on ``OptInStore`` and the outcome into messages
and exit statuses: 0 done, 2 a user or configuration error (bad option, bad file, unknown
customer, no such record to show), 1 the store failed.  The store is the one the configuration
names (``open_store``); with ``url = "embedded"`` and the gate running, the CLI attaches to the
gate's redis-server through its socket instead of starting a second one.
Must never: print a traceback for a user error, import anything from a file with errors unless
``--skip-bad`` is given, or leave a half-written export file behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Final, TypeVar

from mailguard.config.load import ConfigError, load_config
from mailguard.optin.records import (
    FORMATS,
    FieldError,
    Format,
    OptInFileError,
    OptInRecord,
    Outcome,
    ParsedFile,
    RecordError,
    format_of,
    format_timestamp,
    normalize_list_id,
    normalize_recipient,
    parse_file,
    parse_timestamp,
    record_from_fields,
    show,
)
from mailguard.optin.store import ImportReport, OptInStore
from mailguard.store.base import StoreError
from mailguard.store.factory import open_admin_store

DEFAULT_CONFIG: Final = Path("/etc/mailguard/mailguard.toml")
OK: Final = 0
STORE_FAILED: Final = 1
USER_ERROR: Final = 2
MAX_SHOWN: Final = 50  # bad rows / kept records listed before "... and N more"

PROG: Final = "mailguard optin"

T = TypeVar("T")


class UserError(Exception):
    """A mistake of the user's: the message is printed as is and the exit status is 2."""


# ---------------------------------------------------------------------------------------------
# The parser


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``optin`` and its subcommands to ``mailguard``'s subparsers (``set_defaults(func)``
    on each, like the other commands)."""
    optin = subparsers.add_parser(
        "optin",
        help="manage confirmed opt-in records (closed-loop lists, the confirmation on file)",
        description="Confirmed opt-in records: the evidence that a recipient subscribed to a "
        "customer's list.  Bulk mail past the threshold needs one for every recipient.",
    )
    sub = optin.add_subparsers(dest="optin_command", required=True, metavar="COMMAND")

    def command(
        name: str, help_: str, func: Callable[[argparse.Namespace], int]
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_, description=help_)
        parser.add_argument(
            "--config",
            type=Path,
            default=DEFAULT_CONFIG,
            help=f"TOML config (default {DEFAULT_CONFIG})",
        )
        parser.add_argument("--customer", required=True, metavar="ID", help="[[customer]] id")
        parser.set_defaults(func=func)
        return parser

    list_help = (
        "List-Id of the list (default: the customer's default list, for mail without List-Id)"
    )

    add = command("add", "add (or replace) one recipient's opt-in record", run_add)
    add.add_argument("--recipient", required=True, metavar="ADDR")
    add.add_argument(
        "--confirmed-at", required=True, metavar="TS", help="e.g. 2024-05-01T12:00:00Z"
    )
    add.add_argument("--source-ip", required=True, metavar="IP", help="where it was requested from")
    add.add_argument("--list-id", default="", metavar="L", help=list_help)
    add.add_argument(
        "--evidence", default="", metavar="E", help="confirmation Message-ID, path or URL"
    )
    add.add_argument("--requested-at", default="", metavar="TS", help="when it was requested")

    imp = command("import", "import a CSV or JSON Lines file of opt-in records", run_import)
    imp.add_argument("file", metavar="FILE", help="FILE.csv or FILE.jsonl (- for standard input)")
    imp.add_argument("--format", choices=FORMATS, help="default: from the file name")
    imp.add_argument(
        "--skip-bad", action="store_true", help="import the good rows of a file with bad ones"
    )
    imp.add_argument(
        "--replace",
        action="store_true",
        help="replace stored records that differ (default: keep them and report them)",
    )
    imp.add_argument(
        "--list-id",
        metavar="L",
        help="list of the rows without list_id (rows may not name another)",
    )

    exp = command("export", "write the customer's records (revoked ones too) to a file", run_export)
    exp.add_argument("--list-id", metavar="L", help="only this list (default: every list)")
    exp.add_argument("--format", choices=FORMATS, help="default: from -o's name, else csv")
    exp.add_argument("-o", "--output", metavar="OUT", help="default: standard output")

    rev = command("revoke", "revoke a recipient's record (an unsubscribe), at once", run_revoke)
    rev.add_argument("--recipient", required=True, metavar="ADDR")
    rev.add_argument("--list-id", default="", metavar="L", help=list_help)
    rev.add_argument("--at", default="", metavar="TS", help="when (default: now)")

    shw = command("show", "show a recipient's records", run_show)
    shw.add_argument("--recipient", required=True, metavar="ADDR")
    shw.add_argument("--list-id", metavar="L", help="only this list (default: every list)")


def build_parser() -> argparse.ArgumentParser:
    """A ``mailguard`` parser holding only ``optin`` (for tests, and until it is wired in)."""
    parser = argparse.ArgumentParser(prog="mailguard")
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``mailguard optin ...`` with ``build_parser`` (what ``mailguard.cli.main`` does)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------------
# Handlers


def run_add(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)

    def prepare() -> OptInRecord:
        fields = {
            "recipient": args.recipient,
            "confirmed_at": args.confirmed_at,
            "source_ip": args.source_ip,
            "list_id": args.list_id,
            "evidence": args.evidence,
            "requested_at": args.requested_at,
        }
        try:
            return record_from_fields(fields, customer=args.customer, imported_at=now)
        except RecordError as exc:
            raise UserError("\n".join(_option_error("add", p) for p in exc.problems)) from None

    async def action(store: OptInStore, record: OptInRecord) -> int:
        outcome = await store.add(record)
        where = _where(record.recipient, record.list_id, record.customer)
        if outcome is Outcome.KEPT_REVOKED:
            stored = await store.get(record.customer, record.list_id, record.recipient)
            revoked = stored.revoked_at if stored is not None else None
            raise UserError(
                f"{PROG} add: {where} was revoked"
                f"{' at ' + format_timestamp(revoked) if revoked else ''}, after this "
                "confirmation: a new subscription needs a newer --confirmed-at"
            )
        print(f"{outcome.value}: {where}")
        return OK

    return _session(args, prepare, action)


def run_import(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)
    source = "<stdin>" if args.file == "-" else args.file

    def prepare() -> ParsedFile:
        fmt: Format | None = args.format or format_of(args.file)
        if fmt is None:
            raise UserError(
                f"{PROG} import: cannot tell the format of {show(args.file)}: name it .csv or "
                ".jsonl, or give --format csv|jsonl"
            )
        if args.list_id is not None:
            _check_list_id("import", args.list_id)
        return parse_file(
            _read_input(args.file),
            fmt=fmt,
            source=source,
            customer=args.customer,
            imported_at=now,
            list_id=args.list_id,
            skip_bad=args.skip_bad,
        )

    async def action(store: OptInStore, parsed: ParsedFile) -> int:
        report = await store.import_records(parsed.records, replace=args.replace)
        for line in _capped([str(e) for e in parsed.skipped], "more problem(s)"):
            print(line, file=sys.stderr)
        _print_report(source, report, skipped=len({e.line for e in parsed.skipped}))
        missing = sum(1 for r in parsed.records if not r.evidence)
        if missing:
            print(
                f"note: {missing} record(s) have no evidence (the AUP wants the confirmation "
                "kept on file: its Message-ID, or a path or URL to it)",
                file=sys.stderr,
            )
        return OK

    return _session(args, prepare, action)


def run_export(args: argparse.Namespace) -> int:
    fmt: Format = args.format or (format_of(args.output) if args.output else None) or "csv"
    to_stdout = args.output in (None, "-")

    def prepare() -> str | None:
        return None if args.list_id is None else _check_list_id("export", args.list_id)

    async def action(store: OptInStore, list_id: str | None) -> int:
        lines = store.export(args.customer, list_id, fmt)
        if to_stdout:
            try:
                count = await _write_lines(lines, sys.stdout.buffer)
                sys.stdout.buffer.flush()
            except BrokenPipeError:  # e.g. piped into head: not an error
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return OK
        else:
            count = await _export_to_file(lines, Path(args.output))
        records = count - (1 if fmt == "csv" else 0)
        print(
            f"exported {records} record(s) to {'stdout' if to_stdout else args.output}",
            file=sys.stderr,
        )
        return OK

    return _session(args, prepare, action)


def run_revoke(args: argparse.Namespace) -> int:
    now = datetime.now(UTC)

    def prepare() -> tuple[str, str, datetime]:
        try:
            at = parse_timestamp(args.at, "at") if args.at else now
            return normalize_recipient(args.recipient), normalize_list_id(args.list_id), at
        except FieldError as exc:
            raise UserError(_option_error("revoke", exc)) from None

    async def action(store: OptInStore, what: tuple[str, str, datetime]) -> int:
        recipient, list_id, at = what
        result = await store.revoke(args.customer, list_id, recipient, at)
        where = _where(recipient, list_id, args.customer)
        if result.record is None:
            print(f"no opt-in record for {where}: nothing to revoke", file=sys.stderr)
        elif result.record.revoked_at is not None:
            state = "revoked" if result.changed else "already revoked"
            print(f"{state}: {where} at {format_timestamp(result.record.revoked_at)}")
        return OK

    return _session(args, prepare, action)


def run_show(args: argparse.Namespace) -> int:
    def prepare() -> tuple[str, str | None]:
        try:
            recipient = normalize_recipient(args.recipient)
            return recipient, None if args.list_id is None else normalize_list_id(args.list_id)
        except FieldError as exc:
            raise UserError(_option_error("show", exc)) from None

    async def action(store: OptInStore, what: tuple[str, str | None]) -> int:
        recipient, list_id = what
        if list_id is None:
            records = await store.find(args.customer, recipient)
        else:
            record = await store.get(args.customer, list_id, recipient)
            records = [] if record is None else [record]
        if not records:
            where = (
                f"{recipient} in any list of customer {args.customer}"
                if list_id is None
                else _where(recipient, list_id, args.customer)
            )
            raise UserError(f"{PROG} show: no opt-in record for {where}")
        print("\n\n".join(_describe(r) for r in records))
        return OK

    return _session(args, prepare, action)


# ---------------------------------------------------------------------------------------------
# Shared


def _session(
    args: argparse.Namespace,
    prepare: Callable[[], T],
    action: Callable[[OptInStore, T], Awaitable[int]],
) -> int:
    """Load the config and check the customer, ``prepare`` (check the input: no store needed),
    open the store, run ``action``, close the store; map errors to messages and statuses."""
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return USER_ERROR
    known = [c.id for c in config.customers]
    if args.customer not in known:
        listed = ", ".join(show(k) for k in known) if known else "none"
        return _user_error(
            f"{PROG}: --customer {show(args.customer)}: no [[customer]] with this id in "
            f"{args.config} (known: {listed})"
        )
    try:
        prepared = prepare()
    except UserError as exc:
        return _user_error(str(exc))
    except OptInFileError as exc:
        return _file_errors(exc)

    async def run() -> int:
        try:
            store = await open_admin_store(config.store, config.server.state_dir)
        except ValueError as exc:
            return _user_error(f"config error: {args.config}: store.url: {exc}")
        except StoreError as exc:
            return _store_error(exc)
        try:
            return await action(OptInStore(store), prepared)
        except StoreError as exc:
            return _store_error(exc)
        finally:
            with contextlib.suppress(StoreError, OSError):
                await store.close()

    try:
        return asyncio.run(run())
    except UserError as exc:
        return _user_error(str(exc))


def _read_input(name: str) -> bytes:
    try:
        if name == "-":
            return sys.stdin.buffer.read()
        return Path(name).read_bytes()
    except OSError as exc:
        raise UserError(f"{PROG} import: cannot read {name}: {exc.strerror or exc}") from None


async def _write_lines(lines: AsyncIterator[str], out: IO[bytes]) -> int:
    count = 0
    async for line in lines:
        out.write(line.encode("utf-8"))
        count += 1
    return count


async def _export_to_file(lines: AsyncIterator[str], path: Path) -> int:
    """Write to a temporary file next to ``path`` and rename it: never a partial export."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    except OSError as exc:
        raise UserError(f"{PROG} export: cannot write {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "wb") as out:
            count = await _write_lines(lines, out)
        os.replace(temporary, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise UserError(f"{PROG} export: cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return count


def _print_report(source: str, report: ImportReport, *, skipped: int) -> None:
    parts = [f"{report.added} added", f"{report.updated} updated", f"{report.unchanged} unchanged"]
    if report.kept:
        parts.append(f"{report.kept} kept (differ from the stored records; --replace overwrites)")
    if report.kept_revoked:
        parts.append(f"{report.kept_revoked} kept revoked (unsubscribed after that confirmation)")
    if skipped:
        parts.append(f"{skipped} bad row(s) skipped")
    print(f"{source}: {report.total} record(s): {', '.join(parts)}")
    notes = []
    for outcome, record in report.not_written:
        why = "kept revoked" if outcome is Outcome.KEPT_REVOKED else "kept (differs)"
        notes.append(f"  {why}: {_where(record.recipient, record.list_id, record.customer)}")
    for line in _capped(notes, "more"):
        print(line)


def _file_errors(exc: OptInFileError) -> int:
    for line in _capped([str(e) for e in exc.errors], "more problem(s)"):
        print(line, file=sys.stderr)
    lines = {e.line for e in exc.errors}
    summary = f"{len(exc.errors)} problem(s)"
    if not exc.fatal:
        summary += f" on {len(lines)} line(s)"
    hint = ""
    if not exc.fatal and exc.good_rows:
        hint = f" (--skip-bad imports the {exc.good_rows} good row(s))"
    source = exc.errors[0].source if exc.errors else "file"
    print(f"{source}: {summary}; nothing imported{hint}", file=sys.stderr)
    return USER_ERROR


def _capped(lines: list[str], what: str) -> list[str]:
    if len(lines) <= MAX_SHOWN:
        return lines
    return [*lines[:MAX_SHOWN], f"... and {len(lines) - MAX_SHOWN} {what}"]


def _describe(record: OptInRecord) -> str:
    def time(moment: datetime | None) -> str:
        return "-" if moment is None else format_timestamp(moment)

    rows = [
        ("recipient", record.recipient),
        ("customer", record.customer),
        ("list_id", _list_name(record.list_id)),
        ("status", "confirmed" if record.active else "revoked"),
        ("confirmed_at", time(record.confirmed_at)),
        ("source_ip", record.source_ip),
        ("requested_at", time(record.requested_at)),
        ("evidence", record.evidence or "-"),
        ("imported_at", time(record.imported_at)),
        ("revoked_at", time(record.revoked_at)),
    ]
    return "\n".join(f"{name + ':':<14}{value}" for name, value in rows)


def _list_name(list_id: str) -> str:
    return list_id or "(default)"


def _where(recipient: str, list_id: str, customer: str) -> str:
    where = f"list {list_id}" if list_id else "the default list"
    return f"{recipient} in {where} of customer {customer}"


def _option_error(command: str, problem: FieldError) -> str:
    return f"{PROG} {command}: --{problem.field.lstrip('-').replace('_', '-')}: {problem.message}"


def _check_list_id(command: str, value: str) -> str:
    try:
        return normalize_list_id(value)
    except FieldError as exc:
        raise UserError(f"{PROG} {command}: --list-id: {exc.message}") from None


def _user_error(message: str) -> int:
    print(message, file=sys.stderr)
    return USER_ERROR


def _store_error(exc: StoreError) -> int:
    print(f"{PROG}: {exc}", file=sys.stderr)
    return STORE_FAILED
