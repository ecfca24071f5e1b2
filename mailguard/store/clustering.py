"""Online clustering of messages into campaigns in the store (issue 3, item 4).

Responsible for: :class:`ClusterStore`, which assigns each message of a customer a cluster
("campaign") id with exactly the algorithm of :class:`mailguard.core.fingerprint.ClusterIndex`
(whose module docstring is normative: votes from LSH buckets, candidates verified against each
cluster's founding fingerprint, the documented tie-breaks), run as ONE Lua script
(``lua/cluster_assign.lua``) so that assignment is atomic: two gates that see the first two
copies of a new campaign at the same moment cannot found two clusters.
Must never: read a clock (``now`` comes in, and the script never calls TIME), decide policy, or
let a Redis exception escape (``RedisStore.run`` turns every failure into ``StoreError``).

* **Similarity in Lua.**  The script counts equal lanes exactly as ``sketch.similarity`` does
  (equal 16-bit lanes of two sketches; 128 or 0 for exact digests; 0 across kinds) and compares
  the count with :func:`lanes_needed` ``(threshold)``, an integer, so no float is compared in Lua
  that Python would compare differently: ``equal >= lanes_needed(t)`` iff ``equal / 128 >= t``.
* **Ids.**  A founded cluster's id is ``new_cluster_id(fp, now)``, computed here and passed in;
  the script uses it only if it founds.
* **Bounded memory.**  Every call deletes up to ``purge`` (16) dead clusters, oldest first, so
  their records cannot pile up: a call founds at most one.  Buckets are rewritten without dead
  ids whenever a cluster is founded in them and expire ``window`` after their last write, like
  every key the script writes (``PEXPIRE``, a real-time safety net; the logical expiry is the
  ``touched`` / ``last_seen`` time stored in the value, on the caller's clock).  Deleting a dead
  cluster never changes a result unless a later call's ``now`` is so far behind (a gate whose
  clock lags) that the cluster would be alive again at it: results equal ``ClusterIndex``'s
  exactly for non-decreasing ``now``, and with ``purge=0`` for any order of times.
* **Replays.**  Running a call again after a lost reply (``RedisStore`` retries connection
  errors) returns the cluster the first run founded or joined, which the same fingerprint
  matches again (its founder with similarity 1): only a cluster founded in between that is
  more similar to it could win instead.
* **Keys** (one customer's keys share the hash tag ``{customer}``, so the script runs unchanged on
  Redis Cluster; every key it touches is in its KEYS)::

      {prefix}:{{customer}}:cust:cl:rec   HASH id -> '>dd' (created, last_seen) + rep bytes
                                          + '>d' per band (latest assignment through it)
      {prefix}:{{customer}}:cust:cl:seen  ZSET id -> last_seen (finds dead clusters)
      {prefix}:{{customer}}:cust:cl:bk    HASH band field -> '>d' stored + ids (16 chars, MRU first)

  A band field is :func:`bucket_field` of a band key of ``sketch.band_keys`` (9 bytes: the band's
  index and its 8 bytes, or ``x`` and an exact fingerprint's digest).  A bucket's ``touched``
  (the model's) is the largest of its stored time and its ids' band times for it, so a message
  that joins a cluster rewrites the cluster's record and no bucket (unless the winner has to
  move to the front of one); the script's header shows why this equals ``ClusterIndex``.  A
  cluster costs one record (~530 bytes) and up to 32 bucket entries (fields of one hash, deleted
  with the cluster when it is purged).  The script keeps ``bk`` a hash table, not a listpack
  (which Redis uses for up to ``hash-max-listpack-entries`` fields, 16 clusters by default):
  reading 32 fields from a listpack scans it once per field, ~60k instructions per message for
  one cluster and ~600k for ten, against ~1k per field in a hash table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mailguard.core.fingerprint.cluster import BUCKET_CAP, MAX_CANDIDATES
from mailguard.core.fingerprint.sketch import (
    LANES,
    SIMILARITY_THRESHOLD,
    Fingerprint,
    new_cluster_id,
)
from mailguard.store.redis_store import RedisStore, float_arg, lua_script

CLUSTERS = "cl"
PURGE_PER_CALL = 16
MAX_PURGE = 1000  # the script unpacks the deleted ids onto Lua's stack
_KEY_CACHE = 4096  # customers whose key names are kept (building them costs ~15 us)
_ID = re.compile(r"^[0-9a-f]{16}$")


def lanes_needed(threshold: float) -> int:
    """The fewest equal lanes (of ``LANES``) with ``similarity >= threshold``; ``LANES + 1``: none.

    ``threshold * LANES`` is exact (``LANES`` is a power of two), so ``ceil`` of it is the exact
    boundary: for every count ``c`` in ``0..LANES``,
    ``c >= lanes_needed(t)`` iff ``c / LANES >= t``.
    """
    threshold = float(threshold)
    if math.isnan(threshold):
        raise ValueError("threshold must be a number, not nan")
    if threshold > 1:
        return LANES + 1
    if threshold <= 0:
        return 0
    return math.ceil(threshold * LANES)


@dataclass(frozen=True, slots=True)
class ClusterKeys:
    """The keys of one customer's clusters (see the layout in the module docstring)."""

    records: str
    seen: str
    buckets: str  # a hash: bucket_field(band key) -> bucket

    @classmethod
    def of(cls, store: RedisStore, customer: str) -> ClusterKeys:
        """``ValueError`` if ``customer`` is empty."""
        key = store.keys.customer_key
        return cls(
            key(customer, CLUSTERS, "rec"),
            key(customer, CLUSTERS, "seen"),
            key(customer, CLUSTERS, "bk"),
        )

    def script_keys(self, fp: Fingerprint) -> list[str]:
        """KEYS of the script: records, seen, buckets (the same for every fingerprint)."""
        return [self.records, self.seen, self.buckets]


def bucket_field(band: str) -> bytes:
    """The field of the bucket hash for a band key of ``sketch.band_keys`` (what the script
    derives from the fingerprint's bytes itself)."""
    if band.startswith("x"):
        return b"x" + bytes.fromhex(band[1:])
    return bytes.fromhex(band)


class ClusterStore:
    """Per-customer online clustering on a ``RedisStore`` (see the module docstring).

    ``window`` (seconds, > 0): a cluster is alive while ``now - last_seen <= window``, i.e. it
    takes in similar messages until it has been silent for longer than the window; keys expire
    ``window`` after their last write.  ``bucket_cap``, ``max_candidates`` and ``threshold`` are
    those of ``ClusterIndex``; ``purge`` bounds how many dead clusters one call deletes.
    """

    def __init__(
        self,
        store: RedisStore,
        window: float,
        *,
        bucket_cap: int = BUCKET_CAP,
        max_candidates: int = MAX_CANDIDATES,
        threshold: float = SIMILARITY_THRESHOLD,
        purge: int = PURGE_PER_CALL,
    ) -> None:
        """``ValueError`` for a window that is not positive and finite, or bad limits."""
        window = float(window)
        if not (math.isfinite(window) and window > 0):
            raise ValueError(f"window must be a positive number of seconds, not {window!r}")
        for name, value, low, high in (
            ("bucket_cap", bucket_cap, 1, 1000),
            ("max_candidates", max_candidates, 1, 1000),
            ("purge", purge, 0, MAX_PURGE),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, not {value!r}")
        self.store = store
        self.window = window
        self.bucket_cap = bucket_cap
        self.max_candidates = max_candidates
        self.threshold = float(threshold)
        self.purge = purge
        self._window = float_arg("window", window)
        self._need = str(lanes_needed(threshold))
        self._limits = [str(bucket_cap), str(max_candidates), str(purge)]
        self._assign = store.script(lua_script("cluster_assign"))
        self._keys: dict[str, ClusterKeys] = {}

    def keys(self, customer: str) -> ClusterKeys:
        """The key names of ``customer``'s clusters; ``ValueError`` if it is empty."""
        found = self._keys.get(customer)
        if found is None:
            found = ClusterKeys.of(self.store, customer)
            if len(self._keys) >= _KEY_CACHE:
                self._keys.clear()
            self._keys[customer] = found
        return found

    async def assign(self, customer: str, fp: Fingerprint, now: float) -> str:
        """The cluster id of ``customer``'s message with fingerprint ``fp`` arriving at ``now``.

        ``ValueError`` for an empty customer or a non-finite ``now``; ``StoreError`` if the store
        fails (after a timeout the script may have run; repeating the call returns the same id).
        """
        keys, args = self.script_call(customer, fp, now)
        raw = await self.store.run_script("cluster_assign", self._assign, keys, args)
        return decode_id(raw[0])

    def script_call(
        self, customer: str, fp: Fingerprint, now: float
    ) -> tuple[list[str], list[str | bytes]]:
        """KEYS and ARGV of ``lua/cluster_assign.lua`` for this message (also used by
        ``counting.CampaignDecider``, which runs the same script body)."""
        now_s = float_arg("now", now)
        new_id = new_cluster_id(fp, float(now))
        if not _ID.match(new_id):  # the script stores ids at a fixed width
            raise ValueError(f"unexpected cluster id format {new_id!r}")
        keys = self.keys(customer).script_keys(fp)
        args: list[str | bytes] = [now_s, self._window, fp.to_bytes(), self._need, new_id]
        args += self._limits
        return keys, args


def decode_id(raw: bytes | str) -> str:
    """A cluster id as the script returns it."""
    return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)
