"""Online clustering of fingerprints into campaigns: the reference model for the store.

Responsible for: the exact algorithm that assigns each message (of one customer) a cluster id,
in memory.  The store implements the same algorithm as one atomic script and is tested against
this class as the model, so every step below is normative, including the tie-breaks.

State (per customer)
    clusters  id -> (rep, created, last_seen): ``rep`` is the fingerprint of the message that
              founded the cluster; ``created`` the time it was founded; ``last_seen`` the latest
              time a message was assigned to it.  A cluster is *alive* at ``now`` iff
              ``now - last_seen <= window``; dead clusters are never matched or revived.
    buckets   band key -> (touched, ids): ``ids`` is a list of cluster ids, most recently used
              first, at most ``bucket_cap`` long; ``touched`` is the latest time the bucket was
              written.  A bucket with ``now - touched > window`` is empty.

``assign(fp, now)``
    1. ``keys = band_keys(fp)`` (32 keys for a sketch, 1 for an exact fingerprint).
    2. Votes: for every key, every id in its bucket whose cluster is alive gets one vote per
       key it appears under.
    3. Candidates: the voted ids ordered by (more votes, earlier ``created``, smaller id), of
       which only the first ``max_candidates`` are considered.
    4. Verification: ``s = similarity(fp, rep)`` for each candidate; those with
       ``s >= threshold`` match.
    5. If any match, the winner is the match with the highest ``s``, then the earliest
       ``created``, then the smallest id.  ``last_seen = max(last_seen, now)``; in every
       (non-expired) bucket of ``keys`` that holds the winner, the winner moves to the front
       and ``touched = max(touched, now)``.  Return the winner's id.
    6. Otherwise a cluster is founded: ``id = new_cluster_id(fp, now)``, ``rep = fp``,
       ``created = last_seen = now`` (replacing any record with that id).  For every key of
       ``keys``: drop from its bucket the ids of dead clusters and ``id`` itself, put ``id`` in
       front, keep the first ``bucket_cap`` ids, and set ``touched = max(touched, now)``.
       Return ``id``.

Only founding fingerprints are indexed, so a cluster costs one fingerprint and 32 bucket entries
however many messages it has; matches are verified against the founder, so a cluster cannot
drift.  Buckets are written only through the keys of the message at hand (step 5 touches the
buckets the message shares with the founder), so every key a script uses is in its KEYS.  The
price: a band of the founder that no message has shared for ``window`` seconds expires, and no
longer finds the cluster, although the cluster lives on through its other bands; copies of a
campaign share most bands with its founder, so this only matters for sparse traffic.
Dead clusters, expired buckets and bucket entries of dead clusters may be deleted at any time
without changing any result (they are never candidates, and dead entries are dropped before a
bucket is truncated), which is what lets the store expire every key ``window`` after its last
write.  The model does so every ``_SWEEP_EVERY`` assignments (with ``now`` non-decreasing).

For the store's script.  Defaults: ``threshold = SIMILARITY_THRESHOLD`` (0.66), ``bucket_cap =
BUCKET_CAP`` (8), ``max_candidates = MAX_CANDIDATES`` (16); ``window`` is the longest rule
window.  The caller passes ``fp.to_bytes()``, ``band_keys(fp)``, ``now`` and the id a new cluster
would get (``new_cluster_id(fp, now)``, computed in Python).  Per cluster the script stores the
founder's serialized fingerprint (260 or 12 bytes), ``created``, ``last_seen`` and, per band, the
latest time a message was assigned to it through that band's bucket; a bucket stores its ids and
a time, and its ``touched`` is the largest of that time and its ids' times for its band (equal
to the ``touched`` above, so a match rewrites one record instead of every bucket; the script's
header shows why).  (Band keys
derive from the serialized bytes: band ``i`` is ``"%02x" % i`` and the hex of bytes
``4 + 8i .. 4 + 8i + 7``; an exact fingerprint's one key is ``"x"`` and the hex of bytes 4..11.)
Similarity needs no floating point: two sketches (kind byte 1) match iff at least
``ceil(threshold * 128)`` (85) of their 128 big-endian 16-bit lanes (bytes 4..259) are equal;
two exact fingerprints (kind byte 2) iff their digests are equal; different kinds never.  Ties
in step 5 compare the count of equal lanes, which orders exactly as ``similarity`` does.
This model keeps a sketch's band keys as the band's 8 bytes read as an integer, in one table per
band (the same keys, without building 32 strings per message), and a bucket as a list
``[touched, id, ...]``.
Must never: read a clock (time is the ``now`` argument), do I/O, or use randomness.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any

from mailguard.core.fingerprint.sketch import (
    BANDS,
    SIMILARITY_THRESHOLD,
    Fingerprint,
    new_cluster_id,
    similarity,
)

BUCKET_CAP = 8
MAX_CANDIDATES = 16
_SWEEP_EVERY = 4096
# A sketch's band keys, as the model keeps them: band i's 8 bytes read as an integer, in the
# i-th of BANDS tables (the same keys as band_keys, one C call instead of 32 strings).
_BAND_VALUES = struct.Struct(f">{BANDS}Q")


@dataclass(slots=True)
class Cluster:
    """One campaign: its founding fingerprint and times (see the module docstring)."""

    id: str
    rep: Fingerprint
    created: float
    last_seen: float


# A bucket is a list: its ``touched`` time, then its ids, most recently used first (a list
# literal costs a tenth of an object with attributes, and a new cluster writes 32 buckets).
_Bucket = list[Any]  # [touched, id, id, ...]
_IDS = itemgetter(slice(1, None))


class ClusterIndex:
    """In-memory online clusterer for one customer (algorithm in the module docstring)."""

    def __init__(
        self,
        window: float,
        threshold: float = SIMILARITY_THRESHOLD,
        *,
        bucket_cap: int = BUCKET_CAP,
        max_candidates: int = MAX_CANDIDATES,
    ) -> None:
        if window < 0 or bucket_cap < 1 or max_candidates < 1:
            raise ValueError("window must be >= 0, bucket_cap and max_candidates >= 1")
        self.window = window
        self.threshold = threshold
        self.bucket_cap = bucket_cap
        self.max_candidates = max_candidates
        self._clusters: dict[str, Cluster] = {}
        # Buckets by band key: one table per band of a sketch (keyed by the band's integer)
        # and one for exact fingerprints (keyed by the digest).
        self._bands: list[dict[Any, _Bucket]] = [{} for _ in range(BANDS)]
        self._exact: list[dict[Any, _Bucket]] = [{}]
        self._since_sweep = 0

    def cluster(self, cluster_id: str) -> Cluster | None:
        """The stored record of a cluster (alive or not yet swept), if any."""
        return self._clusters.get(cluster_id)

    def alive(self, now: float) -> list[str]:
        """Ids of the clusters alive at ``now``, oldest first."""
        live = [c for c in self._clusters.values() if now - c.last_seen <= self.window]
        return [c.id for c in sorted(live, key=lambda c: (c.created, c.id))]

    def bucket(self, key: str) -> list[str]:
        """The ids in the bucket of a band key (:func:`.sketch.band_keys`), expired or not."""
        if key.startswith("x"):
            found = self._exact[0].get(bytes.fromhex(key[1:]))
        else:
            found = self._bands[int(key[:2], 16)].get(int(key[2:], 16))
        return found[1:] if found is not None else []

    def _live(self, cluster_id: str, now: float) -> Cluster | None:
        found = self._clusters.get(cluster_id)
        if found is None or now - found.last_seen > self.window:
            return None
        return found

    def assign(self, fp: Fingerprint, now: float) -> str:
        """The cluster id of a message with fingerprint ``fp`` arriving at ``now``."""
        self._since_sweep += 1
        if self._since_sweep >= _SWEEP_EVERY:
            self.sweep(now)
        tables: list[dict[Any, _Bucket]]
        keys: tuple[Any, ...]
        if fp.kind == "sketch":
            tables, keys = self._bands, _BAND_VALUES.unpack(fp.data)
        else:
            tables, keys = self._exact, (fp.data,)
        window = self.window
        found: list[_Bucket | None] = list(map(dict.get, tables, keys))
        buckets = [b for b in found if b is not None and now - b[0] <= window]
        clusters = self._clusters
        best: tuple[float, float, str] | None = None  # (-score, created, id): smallest wins
        if buckets:
            voters = list(chain.from_iterable(map(_IDS, buckets)))
            voted = set(voters)  # (usually one id: Counter costs more than this)
            live = [
                cluster
                for cluster in map(clusters.get, voted)
                if cluster is not None and now - cluster.last_seen <= window
            ]
            if len(live) > 1:
                live.sort(key=lambda c: (-voters.count(c.id), c.created, c.id))
            for candidate in live[: self.max_candidates]:
                score = similarity(fp, candidate.rep)
                if score >= self.threshold:
                    entry = (-score, candidate.created, candidate.id)
                    if best is None or entry < best:
                        best = entry
        if best is not None:
            winner_id = best[2]
            winner = clusters[winner_id]
            winner.last_seen = max(winner.last_seen, now)
            for bucket in buckets:
                if bucket[1] != winner_id:
                    if winner_id not in bucket:
                        continue
                    bucket.remove(winner_id)
                    bucket.insert(1, winner_id)
                if now > bucket[0]:
                    bucket[0] = now
            return winner_id
        cluster_id = new_cluster_id(fp, now)
        clusters[cluster_id] = Cluster(cluster_id, fp, now, now)
        cap = self.bucket_cap
        for table, key, current in zip(tables, keys, found, strict=True):
            if current is None or now - current[0] > window:  # missing or expired
                table[key] = [now, cluster_id]
                continue
            kept = [
                other
                for other in current[1:]
                if other != cluster_id and self._live(other, now) is not None
            ]
            current[1:] = [cluster_id, *kept[: cap - 1]]
            current[0] = max(current[0], now)
        return cluster_id

    def sweep(self, now: float) -> None:
        """Forget dead clusters, expired buckets and dead entries (never changes results)."""
        self._since_sweep = 0
        self._clusters = {
            cid: c for cid, c in self._clusters.items() if now - c.last_seen <= self.window
        }
        for table in (*self._bands, *self._exact):
            for key, bucket in list(table.items()):
                bucket[1:] = [cid for cid in bucket[1:] if cid in self._clusters]
                if now - bucket[0] > self.window or len(bucket) == 1:
                    del table[key]
