"""``python -m mailguard.milter ARGS`` is ``mailguard milter ARGS``."""

import sys

from mailguard.cli import main

raise SystemExit(main(["milter", *sys.argv[1:]]))
