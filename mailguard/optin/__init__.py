"""Confirmed opt-in records (Hextet AUP 3: closed-loop lists, the confirmation kept on file).

``records`` is the pure record type with its validation, the CSV / JSON Lines formats and the
merge rules of an import; ``store`` keeps records in Redis (one hash per customer and list);
``cli`` is ``mailguard optin add|import|export|revoke|show``.
This package must never decide whether a message may be sent: the policy asks
``OptInStore.has_confirmed`` and decides.
"""
