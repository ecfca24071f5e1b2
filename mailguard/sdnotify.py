"""systemd readiness notification (sd_notify(3)) without libsystemd, for every daemon front end.

Responsible for: sending one state datagram (``READY=1``, ``STOPPING=1``, ``RELOADING=1``) to
``$NOTIFY_SOCKET`` when systemd set it (``Type=notify``); nothing otherwise.
Must never: raise (a failed notification is logged; the service keeps running).
"""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("mailguard")


def notify(state: str) -> None:
    """Send ``state`` to ``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace)."""
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    if target.startswith("@"):
        target = "\0" + target[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(state.encode(), target)
        except OSError as exc:
            log.warning("sd_notify failed: %s", exc)
