"""``python -m mailguard.milter --config FILE --socket SPEC``: the milter until ``mailguard milter``
is registered in the CLI.

Responsible for: argument parsing only.
Must never: hold logic ``server.run`` owns.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mailguard.milter.server import DEFAULT_TIMEOUT


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailguard milter", description="Serve mailguard's policy as a milter."
    )
    parser.add_argument("--config", required=True, help="configuration file (TOML)")
    parser.add_argument(
        "--socket",
        default="inet:8890@127.0.0.1",
        help="libmilter socket: inet:PORT@HOST, inet6:PORT@HOST or unix:/path",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="seconds to wait for the policy store at end of message before tempfailing "
        "(keep below the MTA's milter timeouts)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mailguard.milter.server import run

    return run(args.config, args.socket, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
