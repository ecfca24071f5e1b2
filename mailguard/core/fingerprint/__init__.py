"""Message fingerprints: recognising "substantively similar" messages (issue 3).

Responsible for: the public API of the pure fingerprint core -- decoding (:mod:`.mime`, with
:mod:`.html`), normalization (:mod:`.normalize`), the fingerprint, similarity and LSH band keys
(:mod:`.sketch`) and the reference online clusterer (:mod:`.cluster`).
Must never: do I/O, read a clock or the environment, or keep state that changes results.
"""

from mailguard.core.fingerprint.cluster import BUCKET_CAP, MAX_CANDIDATES, Cluster, ClusterIndex
from mailguard.core.fingerprint.html import visible_text
from mailguard.core.fingerprint.mime import Extracted, extract
from mailguard.core.fingerprint.normalize import normalize_text, recipient_terms, tokens
from mailguard.core.fingerprint.sketch import (
    SIMILARITY_THRESHOLD,
    Fingerprint,
    band_keys,
    fingerprint,
    fingerprint_of,
    new_cluster_id,
    similarity,
)

__all__ = [
    "BUCKET_CAP",
    "MAX_CANDIDATES",
    "SIMILARITY_THRESHOLD",
    "Cluster",
    "ClusterIndex",
    "Extracted",
    "Fingerprint",
    "band_keys",
    "extract",
    "fingerprint",
    "fingerprint_of",
    "new_cluster_id",
    "normalize_text",
    "recipient_terms",
    "similarity",
    "tokens",
    "visible_text",
]
