"""The ``mailguard`` command line: ``serve``, ``milter``, ``check-config``, ``hash-password``,
``optin``,
``cluster``, ``inspect``.

Responsible for: argument parsing and exit statuses (0 success, 2 usage or config error).
Must never: hold logic a front end or the core should own; print a traceback for user errors.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path

from mailguard.clustercli import register as register_cluster
from mailguard.inspectcli import register as register_inspect
from mailguard.optin.cli import register as register_optin

DEFAULT_CONFIG = Path("/etc/mailguard/mailguard.toml")


def _serve(args: argparse.Namespace) -> int:
    from mailguard.gate.server import run

    return run(args.config)


def _milter(args: argparse.Namespace) -> int:
    from mailguard.milter import run

    return int(run(str(args.config), args.socket, args.timeout))


def _check_config(args: argparse.Namespace) -> int:
    from mailguard.config.load import ConfigError, load_config

    try:
        config = load_config(args.file)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        print(f"{len(exc.errors)} error(s) in {args.file}", file=sys.stderr)
        return 2
    import ssl

    from mailguard.gate.runtime import tls_context_of

    try:
        tls_context_of(config)
    except (OSError, ssl.SSLError) as exc:
        print(f"config error: {args.file}: server.tls_certificate/tls_key: {exc}", file=sys.stderr)
        return 2
    print(f"{args.file}: OK ({len(config.customers)} customer(s))")
    return 0


def _hash_password(args: argparse.Namespace) -> int:
    from argon2 import PasswordHasher

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("passwords differ", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("empty password refused", file=sys.stderr)
        return 2
    print(PasswordHasher().hash(password))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailguard", description="Outbound mail gate enforcing an Acceptable Use Policy."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the SMTP gate")
    serve.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    serve.set_defaults(func=_serve)
    milter = sub.add_parser("milter", help="serve the policy as a milter (Postfix, Sendmail)")
    milter.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="TOML config file")
    milter.add_argument("--socket", help="inet:PORT@HOST or unix:/path (default: [milter] listen)")
    milter.add_argument(
        "--timeout", type=float, help="seconds to wait for the policy (default: [milter] timeout)"
    )
    milter.set_defaults(func=_milter)
    check = sub.add_parser("check-config", help="validate a config file (exit 0 valid, 2 not)")
    check.add_argument("file", type=Path)
    check.set_defaults(func=_check_config)
    hashpw = sub.add_parser(
        "hash-password", help="print an argon2 hash for [[customer.user]] password_hash"
    )
    hashpw.set_defaults(func=_hash_password)
    register_optin(sub)
    register_cluster(sub)
    register_inspect(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
