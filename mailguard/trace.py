"""The trace header both doors add to a message they let through: ``X-Mailguard``.

Responsible for: its name and value (``tx=ID campaign=ID|- decision=accept``), so that the gate
(which also prepends its own ``Received:``, being a relay hop) and the milter (whose MTA adds
the ``Received:``) mark an accepted message the same way, and a recipient's admin can find the
transaction in the decision log by ``tx``.
Must never: carry anything the client sent (the value is made of ids mailguard made).
"""

from __future__ import annotations

TRACE_HEADER = "X-Mailguard"


def trace_value(tx_id: str, campaign: str | None) -> str:
    """The header's value for transaction ``tx_id`` counted in ``campaign`` (None: no rules)."""
    return f"tx={tx_id} campaign={campaign or '-'} decision=accept"
